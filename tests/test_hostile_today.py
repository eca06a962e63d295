"""Hostile tests of the day's changes: the compiled gather, deferred clean verdicts,
manifest parts in the store, and the image walker."""

from __future__ import annotations

import numpy as np
import pytest

from nipype_nibtrack import digest

PADDED = [
    np.dtype([('a', 'u1'), ('b', '>f8')], align=True),
    np.dtype([('a', 'u1'), ('b', '<f8')], align=True),
    np.dtype({'names': ['a', 'b'], 'formats': ['u1', '>i4'], 'offsets': [0, 5], 'itemsize': 12}),
    np.dtype({'names': ['a'], 'formats': ['u1'], 'offsets': [3], 'itemsize': 7}),
    np.dtype([('r', [('x', 'u1'), ('y', '<i2')], 2)], align=True),  # padding in a subarray
]


def _with_padding(dtype: np.dtype, shape: tuple, fill: int) -> np.ndarray:
    """Records with the same field values and padding bytes set to ``fill``."""
    raw = np.full(int(np.prod(shape)) * dtype.itemsize, fill, np.uint8)
    arr = raw.view(dtype).reshape(shape)
    for name in dtype.names:
        arr[name] = np.zeros((), dtype[name])  # fields: zeros; padding: fill
    return arr


@pytest.mark.parametrize('dtype', PADDED, ids=str)
@pytest.mark.parametrize('layout', ['C', 'F', 'reversed'])
def test_a_record_digest_ignores_padding_and_the_kernel(monkeypatch, dtype, layout):
    # Padding bytes are no content: copies (numpy's, the kernel's, a byte swap) leave
    # them as they find them, so digests hashed whatever the path left there.
    digests = set()
    for fill in (0, 0xAB):
        arr = _with_padding(dtype, (6, 7, 3), fill)
        arr = {'C': arr, 'F': np.asfortranarray(arr), 'reversed': arr[::-1, :, ::-1]}[layout]
        for kernel in (digest._kernel, None):
            monkeypatch.setattr(digest, '_kernel', kernel)
            digests.add((digest.array_digest(arr, 'F'), digest.array_digest(arr, 'C')))
    assert len(digests) == 1


# --------------------------------------------------------------------------- the store

import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import nibabel as nib  # noqa: E402

import nipype_nibtrack as nt  # noqa: E402
from nipype_nibtrack import store as store_module  # noqa: E402
from nipype_nibtrack.store import Store  # noqa: E402


def _flip_last_voxel_keeping_times(path: str) -> None:
    """A tool editing its input in the store in place and setting its times back."""
    st = os.stat(path)
    with open(path, 'r+b') as f:
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize('ext', ['.nii', '.img'])
def test_a_large_entry_edited_with_its_mtime_set_back_is_never_handed_out(tmp_path, ext):
    # Files above verify_max_bytes were trusted by (inode, mtime), which os.utime sets back
    store = Store(tmp_path / 'store', verify_max_bytes=1000)
    data = np.arange(4000, dtype='f4').reshape(10, 20, 20)
    img = nib.Nifti1Image(data, np.eye(4))
    path = nt.as_filename(img, formats=[ext], store=store)
    _flip_last_voxel_keeping_times(path)
    again = nt.as_filename(img, formats=[ext], store=store)
    assert np.array_equal(np.asanyarray(nib.load(again).dataobj), data)


def test_a_large_untouched_entry_is_still_trusted_without_reading_it(tmp_path, monkeypatch):
    # the seal must record the ctime the file keeps, else every large reuse re-hashes
    store = Store(tmp_path / 'store', verify_max_bytes=1000)
    img = nib.Nifti1Image(np.arange(4000, dtype='f4').reshape(10, 20, 20), np.eye(4))
    path = nt.as_filename(img, store=store)
    hashed = []
    real = store_module._file_xxh3
    monkeypatch.setattr(store_module, '_file_xxh3', lambda *a: hashed.append(a) or real(*a))
    assert store.lookup(nt.image_digest(img), os.path.basename(path)) == Path(path)
    assert hashed == []


# --------------------------------------------------------------------------- the walker


def key_total(x):
    """Sum of the voxels of every image key of the dict ``x`` (run by a Function node)."""
    keys = [k for key in x for k in (key if isinstance(key, tuple) else (key,))]
    return float(sum(k.get_fdata().sum() for k in keys if hasattr(k, 'dataobj')))


def _key_node(value, base_dir):
    sys.path.insert(0, os.path.dirname(__file__))
    import nipype_fixtures as nf

    return nf.function_node(key_total, value, base_dir, 'keys')


KEYED = {
    'image key': lambda img, other: {img: 1},
    'two image keys': lambda img, other: {img: 1, other: 2},
    'tuple key': lambda img, other: {(img, 'T1'): 'x'},
    'nested': lambda img, other: {'inner': {img: 1}},
}


@pytest.mark.parametrize('kind', list(KEYED))
def test_an_edit_of_an_image_used_as_a_dict_key_reruns_the_node(kind, tmp_path):
    # nipype walks a dict's values and takes its keys as text: an image key hashed as
    # its address, so an edit kept the hash and the cache served the result from before
    img = nib.Nifti1Image(np.zeros((3, 3, 3), 'f4'), np.eye(4))
    other = nib.Nifti1Image(np.zeros((3, 3, 3), 'f4'), np.eye(4))
    value = KEYED[kind](img, other)
    node = _key_node(value, tmp_path)
    before = node.inputs.get_hashval()[1]
    if kind != 'nested':
        assert node.run().outputs.total == 0
    img.get_fdata()[1, 1, 1] = 5
    assert _key_node(value, tmp_path).inputs.get_hashval()[1] != before
    if kind != 'nested':
        assert _key_node(value, tmp_path).run().outputs.total == 5


def test_a_dict_keyed_by_images_hashes_as_their_files(tmp_path):
    path = str(tmp_path / 'a.nii')
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), 'f4'), np.eye(4)), path)
    other = str(tmp_path / 'b.nii')
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), 'f4'), np.eye(4)), other)
    hashes = [
        _key_node({nt.load(name): 1}, tmp_path).inputs.get_hashval()[1]
        for name in (path, path, other)
    ]
    assert hashes[0] == hashes[1] != hashes[2]
