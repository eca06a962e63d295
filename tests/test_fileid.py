"""File identities, and when they may stand for content."""

import os
import shutil
import time
from pathlib import Path

import nibabel as nib
from nibabel.testing import data_path

import nipype_nibtrack as nt
from nipype_nibtrack.fileid import RACY_NS, FileId, all_settled, path_id


def test_identity_changes_with_an_in_place_rewrite_even_when_mtime_is_restored(tmp_path):
    path = tmp_path / 'a.nii'
    path.write_bytes(b'x' * 100)
    before = path_id(path)
    os.utime(path, ns=(before.mtime_ns, before.mtime_ns))
    time.sleep(0.01)
    with open(path, 'r+b') as fobj:
        fobj.write(b'y')
    os.utime(path, ns=(before.mtime_ns, before.mtime_ns))
    after = path_id(path)
    assert after.mtime_ns == before.mtime_ns and after.size == before.size
    assert after != before  # ctime moved: it cannot be restored by hand


def test_fresh_identities_are_not_settled_old_ones_are(tmp_path):
    path = tmp_path / 'a'
    path.write_text('x')
    fresh = path_id(path)
    assert not fresh.settled()
    assert fresh.settled(fresh.ctime_ns + RACY_NS)
    assert all_settled([None, FileId(0, 0, 0, 0, 0)])
    assert not all_settled([FileId(0, 0, 0, 0, 0), fresh])


def test_rewrite_right_after_a_check_is_seen(tmp_path):
    """A file written moments ago is re-read at every check: no memo can go stale."""
    for i in range(20):
        path = shutil.copy(os.path.join(data_path, 'anatomical.nii'), tmp_path / f'a{i}.nii')
        img = nib.load(path)
        assert not nt.is_dirty(img)
        with open(path, 'r+b') as fobj:
            fobj.seek(148)  # descrip
            fobj.write(b'rewritten at once')
        assert nt.dirty_reason(img) == "header differs from the file's"


def test_mark_clean_on_a_fresh_file_then_a_same_size_rewrite(tmp_path):
    path = shutil.copy(os.path.join(data_path, 'anatomical.nii'), tmp_path / 'a.nii')
    img = nib.load(path)
    img.header['descrip'] = b'declared clean'
    nt.mark_clean(img)
    assert not nt.is_dirty(img)
    data = bytearray(Path(path).read_bytes())
    data[-1] ^= 0xFF  # one voxel byte, same size
    with open(path, 'r+b') as fobj:
        fobj.write(data)
    assert nt.dirty_reason(img) == 'file changed on disk since marked clean'
