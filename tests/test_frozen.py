"""The private copy answers are computed on (nipype_nibtrack.frozen).

Every part of the image an answer reads must be the copy's own: an edit of the image
after the copy was taken, through any reference the user holds, must not reach it; and
the copy must be registered nowhere.
"""

from __future__ import annotations

import copy
import gc
import os
import pickle
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import nipype_nibtrack as nt
from nipype_nibtrack import provenance, state
from nipype_nibtrack.fileid import RACY_NS
from nipype_nibtrack.frozen import freeze, frozen_of
from nipype_nibtrack.recheck import image_key
from nipype_nibtrack.rules import cleanliness
from nipype_nibtrack.snapshot import data_origin, snapshot


@pytest.fixture(scope='module')
def settled(tmp_path_factory) -> Path:
    """A settled file, never written again: each test loads its own image of it."""
    path = tmp_path_factory.mktemp('frozen') / 'x.nii'
    data = np.arange(4 * 5 * 6, dtype='i2').reshape(4, 5, 6)
    img = nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1]))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b'a comment'))
    nib.save(img, path)
    time.sleep(RACY_NS / 1e9 + 0.05)
    return path


@pytest.fixture
def loaded(settled: Path):
    return nt.load(settled)


def _swap_structarr(img):
    img.header._structarr = img.header._structarr.copy()


EDITS = {
    'header field': lambda img: img.header.__setitem__('descrip', b'edited'),
    'header bytes in place': lambda img: img.header.structarr['pixdim'].__setitem__(1, 9.0),
    'header array replaced': _swap_structarr,
    'header replaced': lambda img: setattr(img, '_header', nib.Nifti1Header()),
    'extension added': lambda img: img.header.extensions.append(
        nib.nifti1.Nifti1Extension(6, b'more')
    ),
    'extension content': lambda img: setattr(img.header.extensions[0], '_raw', b'other'),
    'extension list cleared': lambda img: img.header.extensions.clear(),
    'affine in place': lambda img: img.affine.__setitem__((0, 3), 5.0),
    'affine replaced': lambda img: setattr(img, '_affine', np.eye(4)),
    'proxy offset': lambda img: setattr(img.dataobj, '_offset', 0),
    'proxy scaling': lambda img: setattr(img.dataobj, '_slope', 3.0),
    'proxy file': lambda img: setattr(img.dataobj, 'file_like', '/elsewhere.nii'),
    'proxy replaced': lambda img: setattr(img, '_dataobj', np.zeros((4, 5, 6))),
    'file map name': lambda img: setattr(img.file_map['image'], 'filename', '/other.nii'),
    'file map replaced': lambda img: setattr(img, 'file_map', {}),
    'dtype alias': lambda img: img.set_data_dtype('compat'),
    'cache filled': lambda img: img.get_fdata(),
    'marked dirty': nt.mark_dirty,
    'marked clean': nt.mark_clean,
}


@pytest.mark.parametrize('edit', EDITS)
def test_no_edit_of_the_image_after_the_copy_reaches_the_copy(loaded, edit):
    frozen = freeze(loaded)
    before = image_key(frozen.image), snapshot(frozen.image), frozen.record.__dict__.copy()
    assert before[0] == frozen.key == image_key(loaded)
    EDITS[edit](loaded)
    assert (image_key(frozen.image), snapshot(frozen.image)) == before[:2]
    assert frozen.record.__dict__ == before[2]
    assert cleanliness(frozen.image).reason is None  # the copy still holds the file's state


def test_an_extension_held_as_a_mutable_object_is_copied(loaded):
    content = bytearray(b'mutable comment')
    loaded.header.extensions.append(nib.nifti1.Nifti1Extension(6, content))
    frozen = freeze(loaded)
    key = frozen.key
    content[:7] = b'CHANGED'
    assert image_key(frozen.image) == key != image_key(loaded)


def test_the_copy_is_registered_nowhere_and_names_the_image_s_own_objects(loaded):
    frozen = freeze(loaded)
    twin = frozen.image
    assert provenance._records.get(id(twin)) is None
    assert id(twin) not in state._answers
    assert nt.resolve_memoised(twin).path == loaded.get_filename()
    assert id(twin) in state._answers  # asked about, it is an image like any other
    assert data_origin(twin.dataobj) is loaded.dataobj is not twin.dataobj
    assert provenance.record_of(twin) is frozen.record is not provenance.record_of(loaded)
    assert provenance.source_record(twin) is provenance.record_of(loaded) is frozen.source
    assert provenance.record_of(twin).holds_dataobj(twin.dataobj)
    assert freeze(twin).image is twin  # a private copy freezes to itself


def test_a_clean_verdict_of_the_copy_is_filed_in_the_image_s_record(loaded):
    frozen = freeze(loaded)
    provenance.record_of(loaded).verdict = None
    assert cleanliness(frozen.image).reason is None
    assert provenance.record_of(loaded).verdict is not None
    assert cleanliness(loaded, defer_files=True).pending is not None  # recalled


@pytest.mark.parametrize('how', ['deepcopy', 'copy', 'pickle'])
def test_copies_and_pickles_of_the_copy_are_plain_images(loaded, how):
    twin = freeze(loaded).image
    other = {
        'deepcopy': copy.deepcopy,
        'copy': copy.copy,
        'pickle': lambda img: pickle.loads(pickle.dumps(img)),
    }[how](twin)
    assert not set(provenance.PRIVATE_SLOTS) & set(vars(other))
    assert frozen_of(other) is None
    assert provenance.source_record(other) is provenance.record_of(other)
    assert freeze(other).image is not other


def _relative(img):
    here = os.getcwd()
    os.chdir(os.path.dirname(img.get_filename()))
    try:
        return nib.load('x.nii')
    finally:
        os.chdir(here)


NOT_FROZEN = {
    'array image': lambda img: nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4)),
    'filled cache': lambda img: (img.get_fdata(), img)[1],
    'held file': lambda img: nib.load(img.get_filename(), keep_file_open=True),
    'relative proxy name': _relative,
    'in-memory file': lambda img: nib.Nifti1Image.from_bytes(img.to_bytes()),
    'MGH': lambda img: nib.MGHImage(np.zeros((2, 2, 2), 'f4'), np.eye(4)),
}


@pytest.mark.parametrize('case', NOT_FROZEN)
def test_images_without_remembered_answers_are_not_copied(loaded, case):
    assert freeze(NOT_FROZEN[case](loaded)) is None


def test_no_private_copy_outlives_the_answer_it_was_made_for(loaded, tmp_path):
    """Answers, verdicts and states keep the image's own objects, never the copy."""
    store = nt.Store(tmp_path / 'store')
    nt.resolve_memoised(loaded, store=store)
    nt.is_dirty_memoised(loaded)
    loaded.header['descrip'] = b'edited'
    nt.resolve_memoised(loaded, store=store)
    nt.check_image_memoised(loaded, ['.nii'])
    gc.collect()
    alive = [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, nib.Nifti1Image) and frozen_of(obj) is not None
    ]
    assert alive == []
