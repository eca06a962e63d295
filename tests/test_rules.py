"""Clean or dirty: every format, a corpus of mutations, no-ops, and random sequences.

The worst bug is a false clean: an image reported clean whose file does not hold
exactly what the image holds. Every mutation below changes content and must be dirty;
after ``as_filename`` the written file, reloaded, must hold exactly the mutated content
(``assert_same_content``: data bitwise, header fields, extensions; the affine exactly
for NIfTI-2 and to float32 rounding for NIfTI-1 and MGH, which store float32).
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nipype_nibtrack as nt
from tests.conftest import (
    SPATIAL_FORMATS,
    FormatCase,
    assert_same_content,
    build_format,
    data_offset,
    file_hashes,
    flip_byte,
    header_patch,
    reload_exact,
    replace_file,
    rewrite_in_place,
    store_files,
    touch,
    value_bits,
    visible_data,
)

NIFTI1 = ('nifti1', 'nifti1_gz', 'nifti1_pair', 'nifti1_pair_gz')
NIFTI2 = ('nifti2', 'nifti2_gz', 'nifti2_pair')
NIFTI = NIFTI1 + NIFTI2
SINGLE_NIFTI = ('nifti1', 'nifti1_gz', 'nifti2', 'nifti2_gz')
ANALYZE = ('analyze', 'spm99', 'spm99_mat', 'spm2', 'spm2_mat')
MGH = ('mgh', 'mgz')
MINC1 = ('minc1', 'minc1_4d')
MINC2 = ('minc2', 'minc2_small')
PARREC = ('parrec', 'parrec_varscale')
AFNI = ('afni', 'afni_scaled')
WRITABLE = NIFTI + ANALYZE + MGH
VOLUME = WRITABLE + MINC1 + MINC2 + PARREC + AFNI
ALL = (*VOLUME, 'cifti2')
WITH_EXTENSIONS = ('nifti1', 'nifti1_gz', 'nifti2', 'nifti2_pair')
SCALED = ('nifti1', 'nifti2_pair', 'spm99_mat', 'spm2_mat')  # no exact zeros after scaling
WITH_ZEROS = (*(f for f in WRITABLE if f not in SCALED), 'parrec', 'afni')
WITH_NAN = ('nifti1_pair', 'nifti2_gz', 'spm99', 'mgh')
INTEGER_DATA = ('nifti1_gz', 'nifti1_pair_gz', 'nifti2', 'analyze', 'spm2', 'mgz')
FOUR_D = ('nifti1_gz', 'nifti2', 'mgz', 'parrec', 'parrec_varscale', 'afni')
NON_CANONICAL = tuple(f for f in VOLUME if f != 'afni_scaled')  # scaled+tlrc is RAS
HELD_OPEN = ('nifti1', 'nifti1_gz', 'nifti2_gz', *PARREC, *MINC2)


# --------------------------------------------------------------------------- helpers


@dataclass
class Ctx:
    """What a mutation may need: the format case and a scratch directory."""

    case: FormatCase
    tmp: Path


def _voxel(img: Any, zero: bool = False) -> tuple[int, ...]:
    """A voxel that is finite (and +0.0 when ``zero``) in what the user sees."""
    data = visible_data(img)
    mask = (data == 0) & ~np.signbit(data) if zero else np.isfinite(data)
    found = np.argwhere(mask)
    assert len(found), 'builder should have made such a voxel'
    return tuple(int(i) for i in found[len(found) // 2])


def _nan_voxel(img: Any) -> tuple[int, ...]:
    found = np.argwhere(np.isnan(visible_data(img)))
    assert len(found), 'builder should have put a NaN in this file'
    return tuple(int(i) for i in found[0])


def _edit_cache(img: Any) -> Any:
    img.get_fdata()[_voxel(img)] += 1
    return img


def _has_field(header: Any, key: str) -> bool:
    return hasattr(header, 'keys') and key in set(header.keys())


def _set_descrip(img: Any, value: bytes = b'edited by a test') -> Any:
    header = img.nifti_header if isinstance(img, nib.Cifti2Image) else img.header
    if _has_field(header, 'descrip'):
        header['descrip'] = value
    elif isinstance(img, nib.MGHImage):
        header['flip_angle'] = float(header['flip_angle']) + 0.25
    else:
        _edit_cache(img)
    return img


def _data_with(img: Any, edit: Callable[[np.ndarray], None]) -> np.ndarray:
    """A copy of the visible data, edited, in a dtype the header can hold exactly."""
    arr = np.array(visible_data(img))
    edit(arr)
    for dtype in (img.get_data_dtype(), arr.dtype, np.dtype(np.float32)):
        with np.errstate(all='ignore'):
            cast = arr.astype(dtype)
        if not np.array_equal(value_bits(cast), value_bits(arr)):
            continue
        try:
            getattr(img, 'nifti_header', img.header).set_data_dtype(dtype)
        except Exception:  # MGH stores no float64
            continue
        return cast
    raise _NoExactDtype(f'{type(img.header).__name__} cannot hold these values')


class _NoExactDtype(Exception):
    pass


def _replace_dataobj(img: Any, arr: np.ndarray) -> Any:
    img.uncache()
    img._dataobj = arr  # no public API replaces the data of an image in place
    return img


def _bump(arr: np.ndarray, voxel: tuple[int, ...]) -> None:
    arr[voxel] += 1


def _wider_dtype(img: Any) -> np.dtype:
    current = img.get_data_dtype()
    for cand in (np.float64, np.float32, np.int32):
        cand = np.dtype(cand)
        if cand.str[1:] == current.str[1:] or (cand.kind == 'i' and current.kind == 'f'):
            continue
        try:
            img.header.copy().set_data_dtype(cand)
        except Exception:
            continue
        return cand
    raise AssertionError(f'no wider dtype for {current}')


def _nifti_header_class(case: FormatCase) -> type:
    return nib.load(case.path).header_class


# --------------------------------------------------------------------------- mutations


def m_descrip(img, ctx):
    img.header['descrip'] = b'edited descrip'
    return img


def m_cal_max(img, ctx):
    img.header['cal_max'] = 1234.5
    return img


def m_intent(img, ctx):
    img.header.set_intent('t test', (12.0,), name='tstat')
    return img


def m_xyzt_units(img, ctx):
    current = img.header.get_xyzt_units()
    img.header.set_xyzt_units('micron' if current[0] != 'micron' else 'meter', 'msec')
    return img


def m_dim_info(img, ctx):
    img.header.set_dim_info(freq=1, phase=0, slice=2)
    return img


def m_toffset(img, ctx):
    img.header['toffset'] = 3.5
    return img


def m_aux_file(img, ctx):
    img.header['aux_file'] = b'aux'
    return img


def m_time_zoom(img, ctx):
    zooms = list(img.header.get_zooms())
    zooms[3] = zooms[3] * 2 + 0.5
    img.header.set_zooms(zooms)
    return img


def m_mgh_fields(img, ctx):
    img.header['flip_angle'] = 0.5
    img.header['te'] = 12.25
    return img


def m_extension_add(img, ctx):
    header = img.nifti_header if isinstance(img, nib.Cifti2Image) else img.header
    header.extensions.append(nib.nifti1.Nifti1Extension('comment', b'added by a test'))
    return img


def m_extension_edit_in_place(img, ctx):
    ext = img.header.extensions[0]
    ext._raw = ext.content + b' edited'  # what editing a bytes extension in place amounts to
    return img


def m_extension_code_in_place(img, ctx):
    ext = img.header.extensions[0]
    ext.code = 6 if ext.code != 6 else 4
    return img


def m_extension_remove(img, ctx):
    del img.header.extensions[0]
    return img


def m_affine_1e9(img, ctx):
    img.affine[0, 3] += 1e-9
    return img


def m_affine_offdiag_1e9(img, ctx):
    img.affine[0, 1] += 1e-9
    return img


def m_affine_within_allclose(img, ctx):
    # within np.allclose's tolerance (nibabel does not update the header), beyond float32's
    img.affine[1, 1] *= 1 + 2e-6
    return img


def m_set_sform(img, ctx):
    new = img.affine.copy()
    new[:3, 3] += [1.5, -2.25, 0.75]
    img.set_sform(new, code='mni')
    return img


def m_set_qform(img, ctx):
    new = np.diag([*img.header.get_zooms()[:3], 1.0])
    new[:3, 3] = [-4.0, 5.5, 7.25]
    img.set_qform(new, code='scanner')
    return img


def m_dtype_wider(img, ctx):
    img.set_data_dtype(_wider_dtype(img))
    return img


def m_dtype_compat(img, ctx):
    img.set_data_dtype('compat')
    return img


def m_dtype_smallest(img, ctx):
    img.set_data_dtype('smallest')
    return img


def m_fdata_edit(img, ctx):
    return _edit_cache(img)


def m_fdata_float32_edit(img, ctx):
    img.get_fdata(dtype=np.float32)[_voxel(img)] += 1
    return img


def m_neg_zero(img, ctx):
    voxel = _voxel(img, zero=True)
    img.get_fdata()[voxel] = -0.0
    return img


def m_nan_into_cache(img, ctx):
    img.get_fdata()[_voxel(img)] = np.nan
    return img


def m_nan_payload_cache(img, ctx):
    voxel = _nan_voxel(img)
    other = np.array([0x7FF8000000000123], np.uint64).view(np.float64)[0]
    img.get_fdata()[voxel] = other  # a NaN that float32 cannot hold
    return img


def m_nan_payload_dataobj(img, ctx):
    voxel = _nan_voxel(img)
    arr = np.asanyarray(img.dataobj)
    arr = arr.astype(arr.dtype.newbyteorder('='))  # native order: the bit flipped is the payload's
    flat = arr.view(np.uint32 if arr.dtype.itemsize == 4 else np.uint64)
    flat[voxel] ^= 1  # same NaN, another payload, native dtype
    assert np.isnan(arr[voxel])
    return _replace_dataobj(img, arr)


def m_dataobj_ndarray(img, ctx):
    voxel = _voxel(img)
    return _replace_dataobj(img, _data_with(img, lambda a: _bump(a, voxel)))


def m_dataobj_other_file(img, ctx):
    arr = _data_with(img, lambda a: _bump(a, _voxel(img)))
    other = ctx.tmp / 'other.nii'
    nib.save(nib.Nifti1Image(arr, np.eye(4)), other)
    img.uncache()
    img._dataobj = nib.load(other).dataobj
    return img


def m_set_filename_then_edit(img, ctx):
    name = Path(img.get_filename()).name
    img.set_filename(str(ctx.tmp / f'elsewhere_{name}'))
    return _set_descrip(img)


def m_to_filename_then_edit(img, ctx):
    name = Path(img.get_filename()).name
    nib.save(img, ctx.tmp / f'saved_{name}')
    return _set_descrip(img, b'edited after save')


def m_slicer(img, ctx):
    return img.slicer[1:]


def m_canonical(img, ctx):
    out = nib.as_closest_canonical(img)
    assert out is not img, 'expected a non-identity reorientation'
    return out


def m_reorient_flip(img, ctx):
    ornt = np.array([[0, -1], [1, 1], [2, 1]])
    return img.as_reoriented(ornt)


def m_disk_header(img, ctx):
    case = ctx.case
    case.allow_disk_edits()
    if case.family in ('nifti1', 'nifti2', 'analyze'):
        hdr_file = Path(img.file_map.get('header', img.file_map['image']).filename)
        rewrite_in_place(hdr_file, header_patch(img.header_class, descrip=b'changed on disk'))
    elif case.family == 'mgh':
        # Pxyz_c (the centre) of the MGH header: the file's affine moves
        offset = nib.freesurfer.mghformat.header_dtype.fields['Pxyz_c'][1]
        rewrite_in_place(case.path, flip_byte(offset + 1))
    elif case.family == 'parrec':
        rewrite_in_place(case.path, lambda raw: raw.replace(b'Konvertertest', b'Konvertertext'))
    elif case.family == 'afni':
        rewrite_in_place(case.path, lambda raw: raw.replace(b"'#0~", b"'#Z~", 1))
    return img


def m_disk_header_mtime_restored(img, ctx):
    ctx.case.allow_disk_edits()
    hdr_file = Path(img.file_map.get('header', img.file_map['image']).filename)
    st = hdr_file.stat()
    rewrite_in_place(hdr_file, header_patch(img.header_class, descrip=b'changed on disk'))
    os.utime(hdr_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    return img


def m_disk_data_cache_filled(img, ctx):
    ctx.case.allow_disk_edits()
    img.get_fdata()
    path, offset = data_offset(ctx.case)
    rewrite_in_place(path, flip_byte(offset + 1))
    return img


def m_replaced_while_held(img, ctx):
    case = ctx.case
    case.allow_disk_edits()
    img.dataobj[(0,) * img.ndim]  # the proxy opens its file now and keeps it open
    if case.family == 'minc2':
        new = ctx.tmp / 'replacement.mnc'
        shutil.copy(case.path, new)
        with h5py.File(new, 'r+') as f:
            image = f['minc-2.0/image/0/image']
            image[(0,) * image.ndim] = image[(0,) * image.ndim] + 1
        os.replace(new, case.path)
    else:
        path, offset = data_offset(case)
        replace_file(path, flip_byte(offset + 1))
    return img


def m_to_bytes(img, ctx):
    img.to_bytes()
    return img


def m_byteswap_header(img, ctx):
    img._header = img.header.as_byteswapped()  # no public API swaps in place
    return img


def m_parrec_info(img, ctx):
    img.header.general_info['exam_name'] = 'edited exam'
    return img


def m_afni_info(img, ctx):
    img.header.info['BRICK_LABS'] = 'edited~' + img.header.info.get('BRICK_LABS', '')
    return img


def m_cifti_descrip(img, ctx):
    img.nifti_header['descrip'] = b'edited cifti'
    return img


def m_cifti_matrix(img, ctx):
    img.header.matrix.metadata = nib.cifti2.Cifti2MetaData({'Provenance': 'edited'})
    return img


@dataclass(frozen=True)
class Mutation:
    name: str
    apply: Callable[[Any, Ctx], Any]
    formats: tuple[str, ...]
    load_kwargs: tuple = ()
    check: Callable[[Any, Any], None] | None = None


def _check_field(key: str) -> Callable[[Any, Any], None]:
    def check(out: Any, img: Any) -> None:
        assert np.array_equal(out.header[key], img.header[key])

    return check


def _check_dtype(out: Any, img: Any) -> None:
    assert out.get_data_dtype() == img.get_data_dtype()


_COMPAT = {np.dtype(t).str[1:] for t in (np.uint8, np.int16, np.int32, np.float32)}


def _check_alias(out: Any, img: Any) -> None:
    # The alias is resolved when written: 'compat' to a type Analyze reads, 'smallest' to
    # the narrowest integer type holding the values (a scaled image may keep its stored
    # integers and scaling: exact, and Analyze-compatible too)
    got = out.get_data_dtype()
    if img._dtype_alias == 'compat':
        assert got.str[1:] in _COMPAT
    else:
        values = visible_data(img)
        assert got.kind in 'iu'
        smaller = [
            t
            for t in (np.uint8, np.int8, np.int16, np.uint16, np.int32)
            if np.dtype(t).itemsize < got.itemsize
        ]
        assert not any(
            np.iinfo(t).min <= values.min() and values.max() <= np.iinfo(t).max for t in smaller
        )


def _check_qform(out: Any, img: Any) -> None:
    got, got_code = out.header.get_qform(coded=True)
    want, want_code = img.header.get_qform(coded=True)
    assert got_code == want_code
    assert np.allclose(got, want, atol=1e-5)


def _check_sform(out: Any, img: Any) -> None:
    got, got_code = out.header.get_sform(coded=True)
    assert got_code == img.header.get_sform(coded=True)[1]
    assert np.array_equal(got.astype(np.float32), img.affine.astype(np.float32))


def _check_endianness(out: Any, img: Any) -> None:
    # Byte order says how values are stored, not what they are; it is kept when the
    # image is written in its own class (pairs and Analyze become NIfTI-1 files)
    if type(out) is type(img):
        assert out.header.endianness == img.header.endianness


MUTATIONS = (
    Mutation('header_descrip', m_descrip, NIFTI + ANALYZE, check=_check_field('descrip')),
    Mutation('header_cal_max', m_cal_max, NIFTI + ANALYZE, check=_check_field('cal_max')),
    Mutation('header_intent', m_intent, NIFTI, check=_check_field('intent_name')),
    Mutation('header_xyzt_units', m_xyzt_units, NIFTI, check=_check_field('xyzt_units')),
    Mutation('header_dim_info', m_dim_info, NIFTI, check=_check_field('dim_info')),
    Mutation('header_toffset', m_toffset, NIFTI, check=_check_field('toffset')),
    Mutation('header_aux_file', m_aux_file, NIFTI + ANALYZE, check=_check_field('aux_file')),
    Mutation('header_time_zoom', m_time_zoom, FOUR_D),
    Mutation('header_mgh_fields', m_mgh_fields, MGH, check=_check_field('te')),
    Mutation('extension_added', m_extension_add, (*NIFTI, 'cifti2')),
    Mutation('extension_edited_in_place', m_extension_edit_in_place, WITH_EXTENSIONS),
    Mutation('extension_code_in_place', m_extension_code_in_place, WITH_EXTENSIONS),
    Mutation('extension_removed', m_extension_remove, WITH_EXTENSIONS),
    Mutation('affine_in_place_1e-9', m_affine_1e9, VOLUME),
    Mutation('affine_offdiag_in_place_1e-9', m_affine_offdiag_1e9, VOLUME),
    Mutation('affine_within_allclose', m_affine_within_allclose, VOLUME),
    Mutation('set_sform', m_set_sform, NIFTI, check=_check_sform),
    Mutation('set_qform', m_set_qform, NIFTI, check=_check_qform),
    # MGH's widest type is float32: the float32 .mgh has nothing wider
    Mutation(
        'dtype_wider', m_dtype_wider, tuple(f for f in WRITABLE if f != 'mgh'), check=_check_dtype
    ),
    Mutation('dtype_alias_compat', m_dtype_compat, NIFTI, check=_check_alias),
    Mutation('dtype_alias_smallest', m_dtype_smallest, INTEGER_DATA[:3], check=_check_alias),
    Mutation('fdata_edited', m_fdata_edit, ALL),
    Mutation('fdata_float32_edited', m_fdata_float32_edit, ALL),
    Mutation('negative_zero_in_cache', m_neg_zero, WITH_ZEROS),
    Mutation('nan_in_cache', m_nan_into_cache, ALL),
    Mutation('nan_payload_in_cache', m_nan_payload_cache, WITH_NAN),
    Mutation('nan_payload_in_dataobj', m_nan_payload_dataobj, WITH_NAN),
    Mutation('dataobj_ndarray', m_dataobj_ndarray, (*VOLUME, 'cifti2')),
    Mutation('dataobj_other_file', m_dataobj_other_file, WRITABLE),
    Mutation('set_filename_then_edit', m_set_filename_then_edit, ALL),
    Mutation('to_filename_then_edit', m_to_filename_then_edit, (*WRITABLE, 'cifti2')),
    # nibabel cannot slice a MINC image whose first axis is time
    Mutation('slicer', m_slicer, tuple(f for f in VOLUME if f != 'minc1_4d')),
    Mutation('as_closest_canonical', m_canonical, NON_CANONICAL),
    Mutation('reoriented_flip', m_reorient_flip, VOLUME),
    Mutation('disk_header_rewritten', m_disk_header, (*WRITABLE, *PARREC, *AFNI)),
    Mutation('disk_header_mtime_restored', m_disk_header_mtime_restored, NIFTI + ANALYZE),
    Mutation(
        'disk_data_rewritten_cache_filled', m_disk_data_cache_filled, (*WRITABLE, *PARREC, *AFNI)
    ),
    Mutation(
        'file_replaced_while_held',
        m_replaced_while_held,
        HELD_OPEN,
        load_kwargs=(('keep_file_open', True),),
    ),
    Mutation('to_bytes', m_to_bytes, SINGLE_NIFTI + MGH),
    Mutation('header_byteswapped', m_byteswap_header, NIFTI + ANALYZE, check=_check_endianness),
    Mutation('parrec_general_info', m_parrec_info, PARREC),
    Mutation('afni_header_info', m_afni_info, AFNI),
    Mutation('cifti_nifti_header', m_cifti_descrip, ('cifti2',)),
    Mutation('cifti_matrix_in_place', m_cifti_matrix, ('cifti2',)),
)

CORPUS = [
    pytest.param(fmt, mutation, id=f'{mutation.name}-{fmt}')
    for mutation in MUTATIONS
    for fmt in mutation.formats
]


def _load_kwargs(mutation: Mutation, case: FormatCase) -> dict:
    kwargs = dict(mutation.load_kwargs)
    if case.family not in ('nifti1', 'nifti2', 'analyze', 'mgh', 'cifti2'):
        kwargs.pop('keep_file_open', None)  # PAR/REC and MINC2 hold their file anyway
    return kwargs


# --------------------------------------------------------------------------- tests


def test_corpus_is_large():
    assert len(MUTATIONS) >= 30
    assert {f for m in MUTATIONS for f in m.formats} == set(SPATIAL_FORMATS)


@pytest.mark.parametrize('plain', [False, True], ids=['nibtrack_load', 'nibabel_load'])
def test_fresh_image_is_clean_and_resolves_to_its_file(format_case, plain, store):
    img = format_case.load(plain=plain)
    reason = nt.dirty_reason(img)
    if format_case.family == 'gifti':
        assert reason is not None and 'GIFTI' in reason
        return
    if plain and format_case.family == 'minc1':
        # data memory-mapped at load, no descriptor: by design only a load record proves it
        assert reason is not None and 'nipype_nibtrack.load' in reason
        return
    assert reason is None
    assert not nt.is_dirty(img)
    res = nt.resolve(img)
    assert res.action == 'original'
    assert res.path == os.path.abspath(img.get_filename())
    assert Path(res.path) in format_case.files
    assert store_files(store) == []


@pytest.mark.parametrize('name', ['analyze', 'spm99', 'spm99_mat'])
def test_own_class_load_is_clean(name, tmp_path):
    """Loaded with the class that wrote it (nibabel.load picks SPM2), still clean."""
    case = build_format(name, tmp_path)
    img = case.own_class.from_filename(case.path)
    assert nt.dirty_reason(img) is None
    assert nt.as_filename(img) == str(case.path)


@pytest.mark.parametrize('klass', [nib.Spm99AnalyzeImage, nib.Spm2AnalyzeImage])
@pytest.mark.parametrize('rotated', [False, True])
def test_spm_mat_written_whenever_affine_set(klass, rotated, tmp_path):
    """nibabel writes a .mat for any SPM image with an affine, rotations or not."""
    affine = nib.load(nib.testing.data_path / 'example4d.nii.gz').affine
    affine = affine if rotated else np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(klass(np.zeros((2, 3, 4), np.int16), affine), tmp_path / 'a.img')
    assert (tmp_path / 'a.mat').exists()
    nib.save(klass(np.zeros((2, 3, 4), np.int16), None), tmp_path / 'b.img')
    assert not (tmp_path / 'b.mat').exists()


def test_gifti_is_dirty_and_written_as_gifti(tmp_path, store):
    img = build_format('gifti', tmp_path).load()
    assert nt.is_dirty(img)
    res = nt.resolve(img)
    assert res.action == 'written' and res.path.endswith('.gii')
    assert_same_content(nib.load(res.path), img)
    with pytest.raises(ValueError, match='gii'):
        nt.as_filename(img, formats=('.nii',))


@pytest.mark.parametrize(('fmt', 'mutation'), CORPUS)
def test_mutation_is_dirty_and_written_exactly(fmt, mutation, tmp_path, store):
    case = build_format(fmt, tmp_path / 'src')
    ctx = Ctx(case, tmp_path / 'work')
    ctx.tmp.mkdir()
    img = case.load(**_load_kwargs(mutation, case))
    assert nt.dirty_reason(img) is None
    img = mutation.apply(img, ctx)
    reason = nt.dirty_reason(img)
    assert reason is not None, f'{mutation.name} on {fmt}: false clean'
    before = file_hashes(case.files)
    res = nt.resolve(img)
    assert res.action == 'written', res
    assert res.reason == reason
    assert file_hashes(case.files) == before, 'as_filename modified the source files'
    out = reload_exact(res.path)
    assert_same_content(out, img)
    if mutation.check is not None:
        mutation.check(out, img)
    if not case.disk_edits:
        case.assert_unchanged()


def test_minc1_plain_load_reason_names_the_memory_map(tmp_path):
    case = build_format('minc1', tmp_path)
    reason = nt.dirty_reason(nib.load(case.path))
    assert 'cannot prove' in reason and 'nipype_nibtrack.load' in reason
    assert nt.dirty_reason(nt.load(case.path)) is None


def test_minc1_loaded_then_file_replaced_is_dirty(tmp_path):
    case = build_format('minc1', tmp_path)
    img = nt.load(case.path)
    replace_file(case.path, lambda raw: raw)  # same bytes, another inode
    assert nt.is_dirty(img)


# --------------------------------------------------------------------------- no-ops


def _noop_get_fdata(img, case):
    img.get_fdata()
    return img


def _noop_read_header(img, case):
    str(img.header)
    if hasattr(img.header, 'get_zooms'):
        img.header.get_zooms()
    if getattr(img, 'affine', None) is not None:
        np.asarray(img.affine).sum()
    return img


def _noop_pickle(img, case):
    return pickle.loads(pickle.dumps(img))


def _noop_deepcopy(img, case):
    return copy.deepcopy(img)


def _noop_uncache(img, case):
    img.get_fdata()
    img.uncache()
    return img


def _noop_touch(img, case):
    for path in case.files:
        touch(path)
    return img


def _noop_resave_copy(img, case):
    """nib.save to a copy of the same file name elsewhere, then reload the source."""
    other = case.path.parent.parent / 'copy'
    other.mkdir(exist_ok=True)
    nib.save(img, other / case.path.name)
    return case.load()


def _noop_same_value(img, case):
    data = img.get_fdata()
    voxel = _voxel(img)
    data[voxel] = float(data[voxel])
    return img


def _noop_asanyarray_edit(img, case):
    arr = np.asanyarray(img.dataobj)
    if not isinstance(img.dataobj, np.ndarray) and arr.flags.writeable:
        arr[(0,) * arr.ndim] += 1  # a copy-on-write map or a copy: not the image
    return img


NOOPS = {
    'get_fdata': (_noop_get_fdata, ALL),
    'read_header': (_noop_read_header, ALL),
    'pickle_round_trip': (_noop_pickle, (*WRITABLE, *AFNI, 'cifti2')),
    'deepcopy': (_noop_deepcopy, (*WRITABLE, *AFNI, 'cifti2')),
    'uncache': (_noop_uncache, ALL),
    'touch': (_noop_touch, tuple(f for f in ALL if f not in MINC1)),
    'save_copy_then_reload': (_noop_resave_copy, (*WRITABLE, 'cifti2')),
    'same_value_written': (_noop_same_value, ALL),
    'edit_asanyarray_result': (_noop_asanyarray_edit, ALL),
}


@pytest.mark.parametrize(
    ('fmt', 'noop'),
    [pytest.param(f, n, id=f'{n}-{f}') for n, (_, fmts) in NOOPS.items() for f in fmts],
)
def test_noop_leaves_image_clean(fmt, noop, tmp_path, store):
    case = build_format(fmt, tmp_path / 'src')
    img = case.load()
    img = NOOPS[noop][0](img, case)
    assert nt.dirty_reason(img) is None
    assert nt.as_filename(img) == os.path.abspath(img.get_filename())
    assert store_files(store) == []
    case.assert_unchanged()


# --------------------------------------------------------------------------- random sequences

HYPO_FORMATS = ('nifti1', 'nifti1_pair_gz', 'nifti2_gz', 'spm2_mat', 'mgz', 'parrec', 'minc2')


@pytest.fixture(scope='module')
def built_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp('hypothesis-sources')
    return {name: build_format(name, root / name) for name in HYPO_FORMATS}


def _at(img: Any, i: int) -> tuple[int, ...]:
    return tuple(min(i, n - 1) for n in img.shape)


class _Run:
    """A sequence of operations on one image, remembering whether content changed."""

    def __init__(self, case: FormatCase, img: Any):
        self.case, self.img, self.changed, self.edits = case, img, False, 0

    # content changes, each irreversible: no later operation brings the content back
    def affine_up(self, k: int) -> None:
        self.img.affine[k % 3, 3] += 1e-9 * (1 + k)
        self.changed = True

    def descrip(self, k: int) -> None:
        self.edits += 1
        _set_descrip(self.img, b'edit %d' % self.edits)
        self.changed = True

    def extension(self, k: int) -> None:
        if hasattr(self.img.header, 'extensions'):
            self.edits += 1
            ext = nib.nifti1.Nifti1Extension('comment', b'added %d' % self.edits)
            self.img.header.extensions.append(ext)
            self.changed = True

    def voxel_up(self, k: int) -> None:
        # always the same voxel, always up
        self.img.get_fdata()[_at(self.img, 1)] += 1 + k
        self.changed = True

    def voxel_nan(self, k: int) -> None:
        self.img.get_fdata()[_at(self.img, 2)] = np.nan
        self.changed = True

    def replace_data(self, k: int) -> None:
        voxel = _at(self.img, 1)
        try:
            arr = _data_with(self.img, lambda a: _bump(a, voxel))
        except _NoExactDtype:
            return
        _replace_dataobj(self.img, arr)
        self.changed = True

    # no-ops
    def fdata(self, k: int) -> None:
        self.img.get_fdata()

    def header_read(self, k: int) -> None:
        str(self.img.header)

    def same_descrip(self, k: int) -> None:
        if _has_field(self.img.header, 'descrip'):
            self.img.header['descrip'] = self.img.header['descrip']

    def same_voxel(self, k: int) -> None:
        data = self.img.get_fdata()
        data[_at(self.img, 3)] = float(data[_at(self.img, 3)])

    def same_dtype(self, k: int) -> None:
        if _has_field(
            self.img.header, 'descrip'
        ):  # Analyze family: set_data_dtype of the same type
            self.img.header.set_data_dtype(self.img.get_data_dtype())

    def touch(self, k: int) -> None:
        touch(self.case.files[k % len(self.case.files)])

    def copy(self, k: int) -> None:
        if self.case.family in ('parrec', 'minc2'):
            return  # they hold file handles: neither pickled nor deep-copied
        self.img = (copy.deepcopy if k % 2 else lambda i: pickle.loads(pickle.dumps(i)))(self.img)


OPS = [name for name in vars(_Run) if not name.startswith('_')]


@settings(
    deadline=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    fmt=st.sampled_from(HYPO_FORMATS),
    plain=st.booleans(),
    ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 5)), max_size=6),
)
def test_random_sequences_never_false_clean(built_cases, tmp_path, fmt, plain, ops):
    case = built_cases[fmt]
    run = _Run(case, case.load(plain=plain))
    for step, (op, k) in enumerate(ops):
        getattr(run, op)(k)
        if run.changed:  # checked after every step: each prefix is a sequence too
            assert nt.is_dirty(run.img), f'false clean after {ops[: step + 1]}'
    dirty = nt.is_dirty(run.img)
    store = nt.Store(tmp_path / f'store-{len(ops)}-{hash(tuple(ops)) & 0xFFFF}')
    res = nt.resolve(run.img, store=store)
    if not dirty:
        assert res.action == 'original'
        assert res.path == os.path.abspath(run.img.get_filename())
    assert_same_content(reload_exact(res.path), run.img)
    case.assert_unchanged()


@pytest.mark.parametrize(
    'fields',
    [{'pixdim': [0, 2, 2, 2, 1, 1, 1, 1]}, {'sform_code': 99}, {'bitpix': 8}],
    ids=['qfac_zero', 'bad_sform_code', 'wrong_bitpix'],
)
def test_file_nibabel_repairs_on_load_is_dirty(fields, tmp_path, store):
    """A tool reads the raw header, not nibabel's repaired one: such a file is no proof."""
    case = build_format('nifti1_pair', tmp_path)
    rewrite_in_place(case.files[1], header_patch(nib.nifti1.Nifti1PairHeader, **fields))
    img = nt.load(case.path)
    assert 'repaired' in nt.dirty_reason(img)
    out = reload_exact(nt.as_filename(img))
    assert_same_content(out, img)
    assert nt.dirty_reason(nt.load(nt.as_filename(img))) is None


# ----------------------------------------------------------- headers re-read, exact values


def test_header_rewritten_through_a_shared_memory_map_is_seen(tmp_path, store):
    """A second write through a held r+ map moves neither size, mtime nor ctime."""
    path = tmp_path / 'mapped.nii'
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
    mapped = np.memmap(path, mode='r+')
    descrip = 148  # offset of descrip in a NIfTI-1 header
    mapped[descrip] = ord('A')  # first write: the page becomes dirty, mtime moves once
    old = time.time() - 10
    os.utime(path, (old, old))
    time.sleep(1.1)  # settled: the reference may now be memoised
    img = nt.load(path)
    assert nt.as_filename(img) == str(path)
    before = os.stat(path)
    mapped[descrip] = ord('B')  # second write through the same dirty page
    after = os.stat(path)
    if (before.st_mtime_ns, before.st_ctime_ns) != (after.st_mtime_ns, after.st_ctime_ns):
        pytest.skip('this file system moved the timestamps: the memo cannot be fooled here')
    assert nt.dirty_reason(img) == "header differs from the file's"
    out = nt.as_filename(img)
    assert nib.load(out).header['descrip'].tobytes().startswith(b'A')
    del mapped


def test_parrec_info_edits_below_print_precision_are_seen(tmp_path):
    case = build_format('parrec', tmp_path)
    img = nt.load(case.path)
    old = np.get_printoptions()
    try:
        np.set_printoptions(precision=2)
        img.header.general_info['angulation'] = img.header.general_info['angulation'] + 1e-9
        assert nt.dirty_reason(img) == "header differs from the file's"
    finally:
        np.set_printoptions(**old)


@pytest.mark.parametrize('fmt', ['afni', 'minc1', 'minc2', 'parrec'])
def test_zoom_edits_of_1e_12_are_seen(fmt, tmp_path):
    case = build_format(fmt, tmp_path)
    img = nt.load(case.path)
    zooms = img.header.get_zooms()
    img.header._zooms = (zooms[0] + 1e-12, *zooms[1:])  # SpatialHeader keeps them here
    assert nt.is_dirty(img)


def test_afni_attribute_float_edit_is_seen(tmp_path):
    case = build_format('afni', tmp_path)
    img = nt.load(case.path)
    img.header.info['BRICK_FLOAT_FACS'] = [f + 1e-300 for f in img.header.info['BRICK_FLOAT_FACS']]
    assert nt.is_dirty(img)


# ------------------------------------------------------------------ trust: random sequences


class _TrustRun(_Run):
    """Adds what a hostile user does around an image: chdir, overrides, threads, copies."""

    def __init__(self, case: FormatCase, img: Any, origin: Path, away: Path, link: Path | None):
        super().__init__(case, img)
        self.origin, self.away, self.forced = origin, away, False
        self.link, self.repointed = link, False

    def repoint_link(self, k: int) -> None:
        # the loaded path went through this link: now it leads to no such file
        if self.link is not None:
            os.remove(self.link)
            os.symlink(self.away, self.link)
            self.repointed = True

    def restore_link(self, k: int) -> None:
        if self.link is not None:
            os.remove(self.link)
            os.symlink(self.origin, self.link)
            self.repointed = False

    def chdir_away(self, k: int) -> None:
        os.chdir(self.away)

    def chdir_back(self, k: int) -> None:
        os.chdir(self.origin)

    def force_dirty(self, k: int) -> None:
        nt.mark_dirty(self.img)
        self.forced = True

    def truthful_mark_clean(self, k: int) -> None:
        # the user's word is trusted: only declare clean what is clean (through a
        # re-pointed link the file is not there: mark_clean refuses, tested elsewhere)
        if not self.changed and not self.repointed and os.getcwd() == str(self.origin):
            nt.mark_clean(self.img)
            self.forced = False

    def thread_edit(self, k: int) -> None:
        worker = threading.Thread(target=self.affine_up, args=(k,))
        worker.start()
        nt.is_dirty(self.img)  # checked while the other thread may be editing
        worker.join()

    def any_copy(self, k: int) -> None:
        if self.repointed:
            return  # held files are re-opened by path: refused, tested elsewhere
        how = (copy.copy, copy.deepcopy, lambda i: pickle.loads(pickle.dumps(i)))[k % 3]
        self.img = how(self.img)


TRUST_OPS = [name for name in vars(_TrustRun) if not name.startswith('_')] + [
    op for op in OPS if op != 'copy'
]
READS_DATA = {'voxel_up', 'voxel_nan', 'replace_data', 'fdata', 'same_voxel'}
NEUTRAL_KWARGS = [{}, {'mmap': False}, {'keep_file_open': True}]
CONTENT_KWARGS = {'parrec': [{'scaling': 'fp'}, {'strict_sort': True}]}


@settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    fmt=st.sampled_from(HYPO_FORMATS),
    plain=st.booleans(),
    relative=st.booleans(),
    kwargs_index=st.integers(0, 4),
    via_link=st.booleans(),
    ops=st.lists(st.tuples(st.sampled_from(TRUST_OPS), st.integers(0, 5)), max_size=7),
)
def test_random_trust_sequences_hand_out_what_the_image_holds(
    built_cases, tmp_path_factory, fmt, plain, relative, kwargs_index, via_link, ops
):
    case = built_cases[fmt]
    choices = NEUTRAL_KWARGS + ([] if plain else CONTENT_KWARGS.get(case.family, []))
    kwargs = choices[kwargs_index % len(choices)]
    if case.family == 'parrec':
        kwargs = {k: v for k, v in kwargs.items() if k != 'keep_file_open'}
    here = os.getcwd()
    origin = case.path.parent
    away = tmp_path_factory.mktemp('away')
    link = None
    if via_link:  # links/link/../<origin>/<file>: the kernel's file, not the text's
        relative = False
        link = tmp_path_factory.mktemp('links') / 'link'
        os.symlink(origin, link)
    try:
        os.chdir(origin)
        if via_link:
            name = os.path.join(link, '..', origin.name, case.path.name)
        else:
            name = case.path.name if relative else case.path
        img = (nib.load if plain else nt.load)(name, **kwargs)
        run = _TrustRun(case, img, origin, away, link)
        run.changed = bool(kwargs) and any(k in ('scaling', 'strict_sort') for k in kwargs)
        nt.is_dirty(run.img)  # the package sees it here first
        for step, (op, k) in enumerate(ops):
            if op in READS_DATA and plain and relative and os.getcwd() != str(origin):
                continue  # nibabel itself cannot read a relative name from elsewhere
            if op in READS_DATA and run.repointed:
                continue  # nor a name whose link leads nowhere now
            getattr(run, op)(k)
            if run.changed or run.forced:
                assert nt.is_dirty(run.img), f'false clean after {ops[: step + 1]}'
        store = nt.Store(tmp_path_factory.mktemp('store'))
        try:
            res = nt.resolve(run.img, store=store)
        except nt.ImageReadError:
            # only when the image's data object reads another file by name than its own
            assert (os.getcwd() == str(away) and relative and plain) or run.repointed
            os.chdir(origin)
            run.restore_link(0)
            res = nt.resolve(run.img, store=store)
        if res.action == 'original':
            assert not (run.changed or run.forced)
        os.chdir(origin)  # read what the image holds where its proxy reads its file
        run.restore_link(0)
        assert_same_content(reload_exact(res.path), run.img)
    finally:
        os.chdir(here)
    case.assert_unchanged()


# ------------------------------------------------------------- rechecks of clean verdicts


def _restore_times(path: Path, st: os.stat_result) -> None:
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


RECHECKED = {
    'nii': (nib.Nifti1Image, 'a.nii', 'a.nii', nib.Nifti1Header),
    'nii.gz': (nib.Nifti1Image, 'a.nii.gz', 'a.nii.gz', nib.Nifti1Header),
    'nifti2': (nib.Nifti2Image, 'a.nii', 'a.nii', nib.Nifti2Header),
    'pair': (nib.Nifti1Pair, 'a.img', 'a.hdr', nib.nifti1.Nifti1PairHeader),
    'spm2': (nib.Spm2AnalyzeImage, 'a.img', 'a.hdr', nib.spm2analyze.Spm2AnalyzeHeader),
}


@pytest.mark.parametrize('kind', RECHECKED)
@pytest.mark.parametrize('fresh', [False, True], ids=['settled', 'fresh'])
def test_a_remembered_clean_verdict_sees_header_rewrites(kind, fresh, tmp_path, store):
    """Rewritten in place, timestamps put back: only the re-read header bytes tell."""
    from nipype_nibtrack.provenance import record_of

    klass, name, header_name, header_class = RECHECKED[kind]
    path, header_file = tmp_path / name, tmp_path / header_name
    nib.save(klass(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4)), path)
    if not fresh:
        for file in tmp_path.iterdir():
            os.utime(file, (time.time() - 10,) * 2)
        time.sleep(1.1)
    img = nt.load(path)
    assert nt.dirty_reason(img) is None
    assert record_of(img).verdict is not None  # remembered: the next check is a recheck
    assert nt.as_filename(img) == str(path)
    st = os.stat(header_file)
    field = 'descrip' if 'descrip' in header_class.template_dtype.names else 'db_name'
    rewrite_in_place(header_file, header_patch(header_class, **{field: b'rewritten'}))
    _restore_times(header_file, st)
    assert nt.is_dirty(img)
    assert nt.resolve(img).action == 'written'


def _simple(tmp_path: Path) -> Any:
    path = tmp_path / 'simple.nii'
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4), np.float32), np.eye(4)), path)
    img = nt.load(path)
    assert nt.dirty_reason(img) is None
    return img


def test_a_remembered_verdict_is_not_carried_to_copies(tmp_path):
    from nipype_nibtrack.provenance import record_of

    img = _simple(tmp_path)
    assert record_of(img).verdict is not None
    assert record_of(copy.deepcopy(img)).verdict is None


@pytest.mark.parametrize(
    'edit',
    [
        lambda img: setattr(img.dataobj, '_offset', img.dataobj._offset + 4),
        lambda img: img.affine.__setitem__((0, 3), img.affine[0, 3] + 1e-12),
        lambda img: img.header.__setitem__('descrip', b'x'),
        lambda img: img.set_data_dtype('compat'),
        lambda img: img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b'n')),
        lambda img: img.get_fdata().__setitem__((0, 0, 0), 1),
        lambda img: img.set_filename(str(img.get_filename()) + '.other.nii'),
        lambda img: nt.mark_dirty(img),
    ],
    ids=['proxy', 'affine', 'header', 'alias', 'extension', 'cache', 'filename', 'mark_dirty'],
)
def test_a_remembered_verdict_sees_image_edits(edit, tmp_path):
    img = _simple(tmp_path)
    edit(img)
    assert nt.is_dirty(img)
