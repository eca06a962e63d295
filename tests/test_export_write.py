"""The dirty-write path: voxels hashed once, written by two buffers, checked as written.

Blocks are made tiny here (``digest.BLOCK_BYTES``), so that small images go through
the many-block path a 256^3 image takes: copies taking turns, a writer thread, the
data digest's hasher adopted as the manifest's hash of the voxel part.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xxhash
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import nipype_nibtrack as nt
from nipype_nibtrack import digest as digest_mod
from nipype_nibtrack import export as export_mod
from nipype_nibtrack.export import _HashingFile, choose_target
from nipype_nibtrack.store import Store, StoreError

store_mod = importlib.import_module('nipype_nibtrack.store')
resolve_mod = importlib.import_module('nipype_nibtrack.resolve')

_EXTS = ['.nii', '.nii.gz', '.img', '.mgh', '.mgz']
_DTYPES = ['u1', 'i2', '<i4', '>i2', 'f4', '>f4', 'f8', 'c8', 'i8']


@contextlib.contextmanager
def _no_complex_warning():
    with warnings.catch_warnings():  # complex values without imaginary parts, to MGH
        warnings.simplefilter('ignore', np.exceptions.ComplexWarning)
        yield


def _nib_save_bytes(img, data, ext: str, tmp: Path, dtype) -> dict[str, bytes]:
    """What ``nib.save`` writes for the same content in the same dtype.

    (nibabel's MGH conversion of a NIfTI header says float32 whatever the data: the
    export keeps the image's own dtype when MGH stores it, as exact and smaller.)
    """
    target = choose_target(img, (ext,))
    header = target.klass.header_class.from_header(img.header)
    header.set_data_dtype(dtype)
    if target.klass is nib.MGHImage and len(img.shape) == 4:
        header['tr'] = img.header.get_zooms()[3]  # nibabel's conversion drops TR
    theirs = tmp / f'theirs{ext}'
    with _no_complex_warning():
        nib.save(target.klass(data, img.affine, header), theirs)
    names = [theirs] + ([theirs.with_suffix('.hdr')] if ext == '.img' else [])
    return {p.suffix: p.read_bytes() for p in names}


def _claims_hold(entry: Path) -> None:
    """Every file of the entry has a hash in its manifest, and it is that of its bytes,
    recomputed here from the manifest's own description (whole file, or parts)."""
    (manifest,) = entry.glob('.*.json')
    data = json.loads(manifest.read_text())
    for name, size in data['files'].items():
        raw = (entry / name).read_bytes()
        assert len(raw) == size
        claims = 0
        if name in data['xxh3']:
            assert data['xxh3'][name] == xxhash.xxh3_128(raw).hexdigest(), name
            claims += 1
        if name in data.get('parts', {}):
            parts = data['parts'][name]
            ends = [start for start, _, _ in parts[1:]] + [len(raw)]
            assert parts[0][0] == 0
            for (start, seed, hexdigest), end in zip(parts, ends, strict=True):
                want = xxhash.xxh3_128(bytes.fromhex(seed) + raw[start:end]).hexdigest()
                assert want == hexdigest, (name, start)
            claims += 1
        assert claims, f'{name} has no hash in its manifest'


@pytest.fixture(params=[True, False], ids=['two threads', 'one thread'])
def tiny_blocks(request, monkeypatch):
    monkeypatch.setattr(digest_mod, 'BLOCK_BYTES', 96)
    monkeypatch.setattr(export_mod, '_spare_core', lambda: request.param)
    return request.param


@settings(deadline=None, max_examples=80)
@given(
    dtype=st.sampled_from(_DTYPES),
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=7),
    layout=st.sampled_from(['C', 'F', 'strided']),
    ext=st.sampled_from(_EXTS),
    block=st.sampled_from([16, 96, 1 << 22]),
    parallel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_written_files_are_nib_save_bytes_and_match_key_and_manifest(
    tmp_path_factory, dtype, shape, layout, ext, block, parallel, seed
):
    """Any dtype, shape, layout and format: the file is what nib.save writes for the
    same content, its key is the image's digest, its manifest hashes its bytes."""
    tmp = tmp_path_factory.mktemp('w')
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 100, (*shape, 2)).astype(dtype)
    data = values[..., 0] if layout == 'strided' else np.asarray(values[..., 0], order=layout)
    img = nib.Nifti1Image(data, np.diag([2.0, 3.0, 4.0, 1.0]), dtype=data.dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(digest_mod, 'BLOCK_BYTES', block)
        mp.setattr(export_mod, '_spare_core', lambda: parallel)
        try:
            path = Path(nt.as_filename(img, formats=[ext], store=Store(tmp / 'store')))
        except ValueError:  # MGH holds no int64, complex or more than 4 dimensions
            assume(False)
        assert path.parent.name == nt.image_digest(img)
    theirs = _nib_save_bytes(img, data, ext, tmp, nib.load(path).get_data_dtype())
    for suffix, raw in theirs.items():
        assert path.with_suffix(suffix).read_bytes() == raw, suffix
    _claims_hold(path.parent)
    back = np.asanyarray(nib.load(path).dataobj)
    with _no_complex_warning():
        assert back.tobytes() == np.asarray(data, back.dtype).tobytes()


@pytest.mark.parametrize('ext', ['.nii', '.img'])
def test_uncompressed_voxels_are_hashed_once_by_parts(ext, tmp_path, tiny_blocks):
    """The voxel part of an uncompressed file is hashed as the data digest hashes it.

    (MGH stores big-endian values: its bytes are not the digest's, it is hashed whole.)
    """
    img = nib.Nifti1Image(np.arange(3 * 4 * 5, dtype='f4').reshape(3, 4, 5), np.eye(4))
    path = Path(nt.as_filename(img, formats=[ext], store=Store(tmp_path)))
    image = path.with_suffix('.img') if ext == '.img' else path
    manifest = json.loads((path.parent / f'.{image.name}.json').read_text())
    parts = manifest['parts'][image.name]
    seed = bytes.fromhex(parts[-1][1] if ext == '.img' else parts[1][1])
    assert seed == digest_mod._seed(np.dtype('f4'), (3, 4, 5))
    assert image.name not in manifest['xxh3']
    _claims_hold(path.parent)


def test_a_failing_write_stores_nothing(tmp_path, tiny_blocks, monkeypatch):
    """No space left, raised writing the third block (by the writer thread, or by this
    one): a StoreError, no entry, nothing left in tmp/; the next try writes it whole."""
    real = _HashingFile.write_hashed
    calls = []

    def full(self, data):
        calls.append(len(data))
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real(self, data)

    monkeypatch.setattr(_HashingFile, 'write_hashed', full)
    store = Store(tmp_path)
    img = nib.Nifti1Image(np.arange(1000, dtype='f4').reshape(10, 10, 10), np.eye(4))
    with pytest.raises(StoreError, match='Free space'):
        nt.as_filename(img, store=store)
    assert len(calls) == 3
    assert list((tmp_path / 'tmp').iterdir()) == []
    assert not list((tmp_path / 'objects').rglob('*.nii'))
    monkeypatch.setattr(_HashingFile, 'write_hashed', real)
    path = nt.as_filename(img, store=store)
    assert np.array_equal(nib.load(path).get_fdata(), img.get_fdata())
    _claims_hold(Path(path).parent)


def test_an_image_edited_between_blocks_is_never_stored_under_its_old_key(
    tmp_path, tiny_blocks, monkeypatch
):
    """An edit landing between the digest and the copy of a later block: refused, then
    written again from the image as it is."""
    data = np.zeros((8, 8, 8), 'f4')
    img = nib.Nifti1Image(data, np.eye(4))
    real = _HashingFile.write_hashed
    edits = []

    def edit_once(self, chunk):
        if not edits:
            edits.append(1)
            data[7, 7, 7] = 1  # a block not yet copied
        return real(self, chunk)

    monkeypatch.setattr(_HashingFile, 'write_hashed', edit_once)
    path = Path(nt.as_filename(img, store=Store(tmp_path)))
    assert path.parent.name == nt.image_digest(img)
    assert nib.load(path).get_fdata()[7, 7, 7] == 1
    entries = list((tmp_path / 'objects').glob('*/*'))
    assert [e.name for e in entries] == [path.parent.name]


@pytest.mark.parametrize(
    'damage',
    [
        lambda d, n: d['parts'][n][-1].__setitem__(2, '0' * 32),
        lambda d, n: d['parts'][n][-1].__setitem__(1, '00'),
        lambda d, n: d['parts'][n].reverse(),
        lambda d, n: d['parts'].__setitem__(n, [[0, 'zz', 'ab' * 16]]),
    ],
    ids=['voxel hash', 'seed', 'order', 'garbage'],
)
def test_a_manifest_with_wrong_parts_is_never_trusted(damage, tmp_path, monkeypatch):
    store = Store(tmp_path, verify_max_bytes=1 << 30)
    img = nib.Nifti1Image(np.arange(60, dtype='f4').reshape(3, 4, 5), np.eye(4))
    path = Path(nt.as_filename(img, store=store))
    manifest = path.parent / f'.{path.name}.json'
    data = json.loads(manifest.read_text())
    damage(data, path.name)
    manifest.write_text(json.dumps(data))
    monkeypatch.setattr(store_mod, '_verified', digest_mod._Memo())  # not checked yet
    assert store.lookup(path.parent.name, path.name) is None
    again = nt.resolve(img, store=store)
    assert again.action == 'written' and Path(again.path) == path
    _claims_hold(path.parent)


@pytest.mark.parametrize('shape', [(4,), (3, 4)])
def test_mgh_refuses_images_of_fewer_than_three_dimensions(shape, tmp_path):
    """MGH pads the shape to 3D: refused by name, not written padded (nor retried as if
    another thread kept editing the image, which the digest of the padded shape made)."""
    img = nib.Nifti1Image(np.zeros(shape, 'f4'), np.eye(4))
    with pytest.raises(ValueError, match=r'would get the shape \(.*\) instead of'):
        nt.as_filename(img, formats=['.mgh', '.mgz'], store=Store(tmp_path))
    assert nt.as_filename(img, formats=['.mgh', '.nii'], store=Store(tmp_path)).endswith('.nii')


def test_a_refusal_made_while_the_affine_was_edited_is_retried(tmp_path, monkeypatch):
    """Another thread editing the affine while a write is planned can make every target
    look unable to hold it (a header made from one affine, compared with the next):
    that is a change, planned again, never "cannot write this image exactly"."""
    img = nib.Nifti1Image(np.zeros((4, 4, 4), 'f4'), np.eye(4))
    real_holds, real_choose = export_mod._affine_holds, resolve_mod.choose_plan
    rounds = []

    def edited_meanwhile(reads, affine, klass):
        if len(rounds) == 1:  # the first planning: an edit lands in each target's check
            img.affine[0, 3] += 1.0
            return False
        return real_holds(reads, affine, klass)

    def counting(*args):
        rounds.append(1)
        return real_choose(*args)

    monkeypatch.setattr(export_mod, '_affine_holds', edited_meanwhile)
    monkeypatch.setattr(resolve_mod, 'choose_plan', counting)
    path = Path(nt.as_filename(img, store=Store(tmp_path)))
    assert len(rounds) == 2 and path.parent.name == nt.image_digest(img)
    written = nib.load(path)
    assert written.affine[0, 3] == img.affine[0, 3] == 1.0
    assert type(written) is nib.Nifti1Image


def test_a_preallocation_failing_for_another_reason_names_the_store_and_file(
    tmp_path, monkeypatch
):
    """fallocate failing with an errno the store does not map (an I/O error): the
    error names the file, and the store reports it in its own words, with its root."""
    import ctypes

    def failing(fd, mode, offset, nbytes):
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(export_mod, '_FALLOCATE', failing)
    store = Store(tmp_path / 'store')
    img = nib.Nifti1Image(np.arange(1000, dtype='f4').reshape(10, 10, 10), np.eye(4))
    with pytest.raises(StoreError, match='Input/output error') as err:
        nt.as_filename(img, store=store)
    message = str(err.value)
    assert f'in the image store at {store.root}' in message and 'reserving 4000 bytes' in message
    assert err.value.errno == errno.EIO
    with pytest.raises(OSError, match='Input/output error') as direct:  # outside a store
        export_mod.export_image(img, choose_target(img, None), tmp_path / 'out.nii')
    assert direct.value.filename == str(tmp_path / 'out.nii')
