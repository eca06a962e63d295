"""load keeps a weak record; mark_clean re-baselines; mark_dirty forces dirty."""

from __future__ import annotations

import gc
import os

import nibabel as nib
import numpy as np
import pytest

import nipype_nibtrack as nt
from nipype_nibtrack.provenance import record_of
from tests.conftest import (
    FORMATS,
    build_format,
    flip_byte,
    header_patch,
    rewrite_in_place,
    touch,
)


@pytest.mark.parametrize('fmt', FORMATS)
def test_load_returns_what_nibabel_returns(fmt, tmp_path):
    case = build_format(fmt, tmp_path)
    img = nt.load(case.path)
    plain = nib.load(case.path)
    assert type(img) is type(plain) is case.klass
    assert nt.image_digest(img) == nt.image_digest(plain)
    assert record_of(img).origin == 'load'
    assert record_of(plain) is None


def test_load_passes_keywords_and_records_the_rest(tmp_path):
    case = build_format('nifti1', tmp_path)
    img = nt.load(case.path, mmap=False, keep_file_open=False)
    assert not isinstance(np.asanyarray(img.dataobj), np.memmap)
    assert record_of(img).kwargs == {}  # only keywords that change what is read are kept


def test_record_is_weak(tmp_path):
    case = build_format('nifti1', tmp_path)
    img = nt.load(case.path)
    assert record_of(img) is not None
    from nipype_nibtrack import provenance

    key = id(img)
    del img
    gc.collect()
    assert key not in provenance._records


def test_records_do_not_leak_to_a_new_object_at_the_same_address(tmp_path):
    case = build_format('nifti1', tmp_path)
    for _ in range(20):
        img = nt.load(case.path)
        mark = record_of(img)
        del img
        other = nib.load(case.path)
        assert record_of(other) is None or record_of(other) is not mark
        del other


# --------------------------------------------------------------------------- mark_clean


def _edited(tmp_path, fmt='nifti1'):
    case = build_format(fmt, tmp_path)
    img = nt.load(case.path)
    img.header['descrip'] = b'cosmetic'
    assert nt.is_dirty(img)
    return case, img


def test_mark_clean_rebaselines(tmp_path):
    case, img = _edited(tmp_path)
    nt.mark_clean(img)
    assert nt.dirty_reason(img) is None
    assert nt.as_filename(img) == str(case.path)
    case.assert_unchanged()


@pytest.mark.parametrize(
    'edit',
    ['header', 'extension', 'affine', 'alias', 'cache', 'cache_filled_edited', 'dataobj'],
)
def test_edits_after_mark_clean_are_detected(edit, tmp_path):
    _, img = _edited(tmp_path)
    if edit == 'cache':
        img.get_fdata()
    nt.mark_clean(img)
    assert not nt.is_dirty(img)
    if edit == 'header':
        img.header['descrip'] = b'again'
    elif edit == 'extension':
        img.header.extensions[0]._raw = b'edited after mark_clean'
    elif edit == 'affine':
        img.affine[2, 3] += 1e-9
    elif edit == 'alias':
        img.set_data_dtype('compat')
    elif edit == 'cache':
        img.get_fdata()[5, 5, 5] += 1  # the cache was filled at mark_clean
    elif edit == 'cache_filled_edited':
        img.get_fdata()[5, 5, 5] += 1  # filled after mark_clean
    elif edit == 'dataobj':
        img._dataobj = np.asanyarray(img.dataobj)
    assert nt.is_dirty(img), edit


def test_mark_clean_of_an_array_image_tracks_in_place_edits(tmp_path):
    data = np.arange(24, dtype='f4').reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.eye(4))
    path = tmp_path / 'saved.nii'
    nib.save(img, path)  # the file now holds exactly the array: provably clean
    assert nt.dirty_reason(img) is None
    nt.mark_clean(img)
    assert nt.as_filename(img) == str(path)
    img.dataobj[1, 1, 1] = -1
    assert nt.dirty_reason(img) == 'data edited since marked clean'


@pytest.mark.parametrize('change', ['header', 'data', 'touch'])
def test_file_changes_after_mark_clean_are_detected(change, tmp_path):
    case, img = _edited(tmp_path, 'nifti1_pair')
    nt.mark_clean(img)
    if change == 'header':
        rewrite_in_place(case.files[1], header_patch(nib.nifti1.Nifti1PairHeader, descrip=b'disk'))
    elif change == 'data':
        rewrite_in_place(case.path, flip_byte(10))
    else:
        touch(case.path)  # a baseline declares the file as it was: any change of it counts
    assert 'since marked clean' in nt.dirty_reason(img)


def test_mark_clean_without_a_file_raises_clearly():
    img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    with pytest.raises(ValueError, match='has no file'):
        nt.mark_clean(img)


def test_mark_clean_of_a_missing_file_raises_clearly(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    img.set_filename(str(tmp_path / 'nowhere.nii'))
    with pytest.raises(ValueError, match='does not exist'):
        nt.mark_clean(img)


def test_mark_clean_of_bytes_image_raises_clearly(tmp_path):
    img = nib.Nifti1Image.from_bytes(build_format('nifti1', tmp_path).load().to_bytes())
    with pytest.raises(ValueError, match='has no file'):
        nt.mark_clean(img)


@pytest.mark.parametrize('value', [None, 3, 'a.nii', np.zeros(3)])
def test_overrides_reject_non_images(value):
    for override in (nt.mark_clean, nt.mark_dirty):
        with pytest.raises(TypeError, match=type(value).__name__):
            override(value)


# --------------------------------------------------------------------------- mark_dirty


@pytest.mark.parametrize('fmt', ['nifti1', 'mgz', 'parrec', 'minc1', 'cifti2'])
def test_mark_dirty_forces_dirty_until_mark_clean(fmt, tmp_path, store):
    case = build_format(fmt, tmp_path)
    img = nt.load(case.path)
    assert not nt.is_dirty(img)
    nt.mark_dirty(img)
    assert nt.dirty_reason(img) == 'marked dirty by the user'
    res = nt.resolve(img)
    assert res.action == 'written' and res.reason == 'marked dirty by the user'
    nt.mark_clean(img)
    assert not nt.is_dirty(img)
    assert nt.as_filename(img) == os.path.abspath(img.get_filename())


def test_mark_dirty_on_an_image_without_record():
    img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    nt.mark_dirty(img)
    assert nt.dirty_reason(img) == 'marked dirty by the user'
