"""image_digest: equal content gives equal digests anywhere; any change changes it."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nipype_nibtrack import image_digest
from nipype_nibtrack.digest import data_digest, edited_cache, update_with_array
from tests.conftest import SPATIAL_FORMATS, build_format

HEX = set('0123456789abcdef')


def _image(seed: int = 0, shape=(4, 5, 6), dtype='f4') -> nib.Nifti1Image:
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(shape) * 100).astype(dtype)
    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    affine[:3, 3] = [-10, 20, 5.5]
    return nib.Nifti1Image(data, affine)


def test_digest_is_32_hex_characters():
    digest = image_digest(_image())
    assert len(digest) == 32 and set(digest) <= HEX


@pytest.mark.parametrize('fmt', SPATIAL_FORMATS)
def test_two_loads_of_a_file_have_one_digest(fmt, tmp_path):
    case = build_format(fmt, tmp_path)
    first, second = case.load(), case.load(plain=True)
    assert first is not second
    assert image_digest(first) == image_digest(second)
    first.get_fdata()  # filling the cache without editing it is no change
    assert image_digest(first) == image_digest(second)


@pytest.mark.parametrize('fmt', ['nifti1', 'nifti2_gz', 'mgz', 'spm2_mat', 'afni', 'cifti2'])
def test_copies_have_the_digest_of_the_original(fmt, tmp_path):
    img = build_format(fmt, tmp_path).load()
    want = image_digest(img)
    assert image_digest(copy.deepcopy(img)) == want
    assert image_digest(pickle.loads(pickle.dumps(img))) == want


def test_memory_layout_does_not_change_the_digest():
    img = _image()
    data = np.asarray(img.dataobj)
    fortran = nib.Nifti1Image(np.asfortranarray(data), img.affine)
    strided = np.empty((8, 10, 12), data.dtype)[::2, ::2, ::2]
    strided[...] = data
    assert not strided.flags.c_contiguous and not strided.flags.f_contiguous
    digests = {image_digest(i) for i in (img, fortran, nib.Nifti1Image(strided, img.affine))}
    assert len(digests) == 1


def test_update_with_array_feeds_values_not_layout():
    import xxhash

    arr = np.arange(60, dtype='>i2').reshape(3, 4, 5)
    hashes = set()
    for variant in (arr, np.asfortranarray(arr), arr.copy(), arr[:, :, :].view()):
        hasher = xxhash.xxh3_128()
        update_with_array(hasher, variant)
        hashes.add(hasher.hexdigest())
    assert len(hashes) == 1


_SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np, nibabel as nib
    from nipype_nibtrack import image_digest
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((4, 5, 6)) * 100).astype('f4')
    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    affine[:3, 3] = [-10, 20, 5.5]
    out = {'memory': image_digest(nib.Nifti1Image(data, affine))}
    out['file'] = image_digest(nib.load(sys.argv[1]))
    print(json.dumps(out))
    """
)


def test_digest_is_the_same_in_another_process(tmp_path):
    case = build_format('nifti1_gz', tmp_path)
    run = subprocess.run(
        [sys.executable, '-c', _SUBPROCESS, str(case.path)],
        capture_output=True,
        text=True,
        check=True,
    )
    there = json.loads(run.stdout)
    assert there['memory'] == image_digest(_image())
    assert there['file'] == image_digest(nib.load(case.path))


# --------------------------------------------------------------------------- changes


def _variants() -> dict[str, nib.Nifti1Image]:
    out = {}

    def fresh() -> nib.Nifti1Image:
        img = _image()
        img.header.extensions.append(nib.nifti1.Nifti1Extension('comment', b'original'))
        return img

    out['base'] = fresh()
    img = fresh()
    img.header['descrip'] = b'x'
    out['header_field'] = img
    img = fresh()
    img.header.extensions.append(nib.nifti1.Nifti1Extension('comment', b'more'))
    out['extension_added'] = img
    img = fresh()
    img.header.extensions[0]._raw = b'origina1'  # same length, one byte
    out['extension_edited'] = img
    img = fresh()
    img.header.extensions[0].code = 4
    out['extension_code'] = img
    for i in range(3):
        for j in range(4):
            img = fresh()
            img.affine[i, j] = np.nextafter(img.affine[i, j], np.inf)  # one ulp
            out[f'affine_{i}{j}'] = img
    img = fresh()
    img.dataobj[1, 2, 3] = np.nextafter(img.dataobj[1, 2, 3], np.inf)
    out['one_voxel_one_ulp'] = img
    for name, value in (('zero', 0.0), ('negative_zero', -0.0), ('nan', np.nan)):
        img = fresh()
        img.dataobj[0, 0, 0] = value
        out[f'voxel_{name}'] = img
    img = fresh()
    img.dataobj[0, 0, 0] = np.array([0x7FC00001], np.uint32).view(np.float32)[0]
    out['voxel_nan_payload'] = img
    img = fresh()
    img.set_data_dtype(np.float64)
    out['dtype'] = img
    img = fresh()
    img.set_data_dtype('compat')
    out['dtype_alias'] = img
    img = fresh()
    out['pair_class'] = nib.Nifti1Pair(img.dataobj, img.affine, img.header)
    img = fresh()
    out['nifti2_class'] = nib.Nifti2Image(img.dataobj, img.affine, img.header)
    img = fresh()
    out['reshaped'] = nib.Nifti1Image(np.asarray(img.dataobj).reshape(5, 4, 6), img.affine)
    return out


def test_every_change_changes_the_digest():
    variants = _variants()
    digests = {name: image_digest(img) for name, img in variants.items()}
    assert len(set(digests.values())) == len(digests), {
        d: [n for n in digests if digests[n] == d]
        for d in digests.values()
        if list(digests.values()).count(d) > 1
    }


@pytest.mark.parametrize('fmt', ['nifti1', 'nifti1_pair', 'mgh', 'parrec', 'minc2', 'afni_scaled'])
def test_cache_edits_change_the_digest_of_a_file_image(fmt, tmp_path):
    img = build_format(fmt, tmp_path).load()
    before = image_digest(img)
    data = img.get_fdata()
    assert edited_cache(img) is None
    voxel = tuple(np.argwhere(np.isfinite(data))[0])
    data[voxel] = -0.0 if data[voxel] == 0 and not np.signbit(data[voxel]) else 0.0
    changed = image_digest(img)
    assert changed != before
    data[voxel] = np.nan
    assert image_digest(img) not in (before, changed)


def test_data_digest_is_memoised_per_file_identity(tmp_path):
    case = build_format('nifti1_pair', tmp_path)
    img = nib.load(case.path)
    first = data_digest(img.dataobj)
    assert data_digest(img.dataobj) == first
    # rewrite one voxel in place: the identity (mtime, ctime) moves, the memo follows
    from tests.conftest import data_offset, flip_byte, rewrite_in_place

    path, offset = data_offset(case)
    rewrite_in_place(path, flip_byte(offset + 3))
    assert data_digest(img.dataobj) != first


def test_gifti_digest_follows_its_arrays(tmp_path):
    img = build_format('gifti', tmp_path).load()
    before = image_digest(img)
    assert image_digest(build_format('gifti', tmp_path / 'again').load()) == before
    img.darrays[0].data[0, 0] += 1
    assert image_digest(img) != before


# --------------------------------------------------------------------------- property

_DTYPES = st.sampled_from(['u1', 'i2', '>i2', 'i4', 'f4', '>f4', 'f8'])
_SHAPES = hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=4)


@st.composite
def _content(draw):
    dtype = np.dtype(draw(_DTYPES))
    shape = draw(_SHAPES)
    elements = None
    if dtype.kind == 'f':
        elements = st.floats(width=dtype.itemsize * 8, allow_nan=True, allow_infinity=False)
    data = draw(hnp.arrays(dtype, shape, elements=elements))
    zooms = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=3, max_size=3))
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = draw(st.lists(st.sampled_from([0.0, -1.5, 7.25]), min_size=3, max_size=3))
    return data, affine


def _perturb(draw, data, affine):
    data, affine = data.copy(), affine.copy()
    kind = draw(st.sampled_from(['none', 'layout', 'voxel', 'affine', 'dtype', 'nan_sign']))
    if kind == 'layout':
        data = np.asfortranarray(data)
    elif kind == 'voxel':
        index = tuple(draw(st.integers(0, n - 1)) for n in data.shape)
        raw = data.view(np.dtype(f'u{data.dtype.itemsize}'))
        raw[index] ^= draw(st.sampled_from([0, 1, 1 << (8 * data.dtype.itemsize - 1)]))
    elif kind == 'affine':
        i, j = draw(st.integers(0, 2)), draw(st.integers(0, 3))
        affine[i, j] += draw(st.sampled_from([0.0, 1e-12, 1e-3]))
    elif kind == 'dtype':
        with np.errstate(invalid='ignore', over='ignore'):
            data = data.astype(draw(_DTYPES))
    elif kind == 'nan_sign' and data.dtype.kind == 'f':
        data = np.where(data == 0, -data, data).astype(data.dtype)  # 0.0 -> -0.0
    return data, affine


def _same_content(a, b) -> bool:
    (da, aa), (db, ab) = a, b
    return (
        da.dtype.newbyteorder('<') == db.dtype.newbyteorder('<')  # byte order is not content
        and da.shape == db.shape
        and np.ascontiguousarray(da, da.dtype.newbyteorder('<')).tobytes()
        == np.ascontiguousarray(db, db.dtype.newbyteorder('<')).tobytes()
        and aa.tobytes() == ab.tobytes()
    )


@settings(deadline=None, max_examples=100)
@given(data=st.data())
def test_digest_equal_iff_content_equal(data):
    a = data.draw(_content())
    b = _perturb(data.draw, *a)
    digest_a = image_digest(nib.Nifti1Image(*a))
    digest_b = image_digest(nib.Nifti1Image(*b))
    assert (digest_a == digest_b) == _same_content(a, b)


# --------------------------------------------------------------------------- canonical order


_LAYOUT = st.sampled_from(['C', 'F', 'T', 'step', 'swap'])


def _laid_out(values: np.ndarray, layout: str) -> np.ndarray:
    """The same values in another memory layout (or byte order)."""
    if layout == 'F':
        return np.asfortranarray(values)
    if layout == 'T':  # a transposed view of a C array: F-contiguous only if 1-D
        return np.ascontiguousarray(np.moveaxis(values, 0, -1)).transpose(
            -1, *range(values.ndim - 1)
        )
    if layout == 'step':  # a strided view
        big = np.zeros((values.shape[0] * 2, *values.shape[1:]), values.dtype)
        big[::2] = values
        return big[::2]
    if layout == 'swap':
        return values.astype(values.dtype.newbyteorder('>'))
    return np.ascontiguousarray(values)


@settings(deadline=None, max_examples=80)
@given(
    values=hnp.arrays(
        st.sampled_from(['f4', 'i2', 'u1', 'f8', 'c8']),
        hnp.array_shapes(min_dims=1, max_dims=5, max_side=9),
    ),
    layout=_LAYOUT,
)
def test_blocks_are_the_fortran_bytes_whatever_the_layout(values, layout):
    from nipype_nibtrack.digest import array_digest, f_blocks

    laid = _laid_out(values, layout)
    little = values.astype(values.dtype.newbyteorder('<'))
    assert b''.join(bytes(b) for b in f_blocks(laid)) == little.tobytes(order='F')
    assert array_digest(laid, 'F') == array_digest(values, 'F')


@settings(deadline=None, max_examples=30)
@given(
    values=hnp.arrays(
        st.sampled_from(['<f4', '>f4', '<i2', '>i4', 'u1']),
        hnp.array_shapes(min_dims=3, max_dims=4, min_side=1, max_side=7),
    ),
    gz=st.booleans(),
    slope=st.sampled_from([1.0, 0.5]),
)
def test_a_file_streamed_hashes_like_its_values_in_memory(tmp_path_factory, values, gz, slope):
    """Raw values read from the file in blocks hash like np.asanyarray of the proxy."""
    from nipype_nibtrack.digest import array_digest

    folder = tmp_path_factory.mktemp('stream')
    img = nib.Nifti1Image(values, np.eye(4))
    img.header.set_slope_inter(slope, 0.0)
    path = folder / ('x.nii.gz' if gz else 'x.nii')
    nib.save(img, path)
    proxy = nib.load(path).dataobj
    raw = data_digest(proxy, None, 'F', raw=True)
    assert raw == array_digest(proxy.get_unscaled(), 'F')
    assert data_digest(proxy, None, 'F') == array_digest(np.asanyarray(proxy), 'F')
    assert data_digest(proxy, 'f8', 'F') == array_digest(np.asanyarray(proxy, 'f8'), 'F')


def test_a_truncated_file_raises_eoferror_while_streamed(tmp_path):
    path = tmp_path / 'short.nii'
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), 'f4'), np.eye(4)), path)
    with open(path, 'r+b') as f:
        f.truncate(1000)
    img = nib.load(path)
    img.header['descrip'] = b'edited'
    with pytest.raises(EOFError):
        image_digest(img)
