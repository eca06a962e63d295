"""The compiled gather and numpy's fallback give Fortran-ordered bytes of any layout."""

from __future__ import annotations

import multiprocessing
import os
import threading

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from nipype_nibtrack import digest
from nipype_nibtrack.digest import array_digest, f_blocks, gather, numpy_gather

try:
    from nipype_nibtrack._gather import gather as _kernel
except ImportError:  # installed without a C compiler: CI installs one, so there it fails
    if os.environ.get('CI', '').lower() == 'true':
        raise
    pytest.skip('nipype_nibtrack._gather is not built', allow_module_level=True)

_DTYPES = [
    'u1', 'i1', '?', '<i2', '>i2', '<u2', '<f2', '>f2', '<f4', '>f4', '<i4', '>u4',
    '<f8', '>f8', '<i8', '<c8', '>c8', '<c16', '>c16', 'S3', 'S5', '>U2',
    [('R', 'u1'), ('G', 'u1'), ('B', 'u1')],  # RGB: '|V3'
    [('a', '>i2'), ('b', '<f4')],
    'V7',
]  # fmt: skip


def _fortran(arr: np.ndarray) -> bytes:
    return arr.tobytes(order='F')


def _kernel_bytes(arr: np.ndarray) -> bytes:
    out = np.empty(arr.nbytes, np.uint8)
    assert _kernel(arr, out) == arr.nbytes
    return out.tobytes()


def _numpy_bytes(arr: np.ndarray) -> bytes:
    return numpy_gather(arr, np.empty(arr.nbytes, np.uint8)).tobytes()


@st.composite
def _layouts(draw) -> np.ndarray:
    """An array of any dtype and shape (1-D to 7-D, empty and 1-long axes included), seen
    through any view: C, F, transposed, stepped, reversed, offset, broadcast."""
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=7, min_side=0, max_side=6))
    if draw(st.booleans()):  # some larger arrays: several tiles, odd edges
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=70))
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.frombuffer(draw(st.binary(min_size=size, max_size=size)), np.uint8)
    arr = raw.view(dtype).reshape(shape) if size else np.zeros(shape, dtype)
    if draw(st.booleans()):
        arr = np.asfortranarray(arr)
    if draw(st.booleans()):
        arr = arr.transpose(draw(st.permutations(range(arr.ndim))))
    view = []
    for n in arr.shape:
        start = draw(st.integers(0, max(0, n - 1)))
        step = draw(st.sampled_from([1, 1, 2, 3, -1, -2]))
        view.append(slice(start, None, step) if step > 0 else slice(None, start, step))
    arr = arr[tuple(view)]
    if arr.ndim < 7 and draw(st.booleans()):  # a zero stride: a broadcast axis
        axis = draw(st.integers(0, arr.ndim))
        arr = np.broadcast_to(
            np.expand_dims(arr, axis),
            (*arr.shape[:axis], draw(st.integers(0, 5)), *arr.shape[axis:]),
        )
    return arr


@settings(deadline=None, max_examples=400)
@given(arr=_layouts())
def test_the_kernel_and_numpy_give_the_fortran_bytes(arr):
    want = _fortran(arr)
    assert _kernel_bytes(arr) == want
    assert _numpy_bytes(arr) == want


def _little(arr: np.ndarray) -> np.ndarray:
    return arr.astype(arr.dtype.newbyteorder('<'))


@settings(deadline=None, max_examples=150)
@given(arr=_layouts(), limit=st.sampled_from([None, 7, 64, 1000]))
def test_blocks_and_digests_follow_values_not_layout(monkeypatch_module, arr, limit):
    """Blocks are the little-endian Fortran bytes with or without the kernel, in slabs of
    any size (a small limit cuts arrays into many); so are digests."""
    want = _fortran(_little(arr))
    digests = set()
    for kernel in (_kernel, None):
        monkeypatch_module.setattr(digest, '_kernel', kernel)
        if limit is not None:
            monkeypatch_module.setattr(digest, '_GATHER_BYTES', max(limit, arr.itemsize))
        assert b''.join(bytes(b) for b in f_blocks(arr)) == want
        for order in 'CF':
            digests.add((order, array_digest(arr, order)))
        monkeypatch_module.undo()
    for order in 'CF':
        digests.add((order, array_digest(np.array(arr, order=order), order)))
    assert len(digests) == 2


@pytest.fixture(scope='module')
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_digest_definition_is_unchanged():
    """A stored key is a digest: these values must never change (DIGEST_VERSION 2)."""
    arr = np.arange(2 * 3 * 4, dtype='<f4').reshape(2, 3, 4)
    want = 'c812133a02a8663ff3d4b5b58818165e'  # measured on the numpy-only digest
    assert digest.DIGEST_VERSION == 2
    assert array_digest(arr, 'C') == '98bd277c88ddafd0535ada92688acdd8'
    assert array_digest(arr, 'F') == want
    assert array_digest(np.asfortranarray(arr), 'F') == want
    assert array_digest(arr.astype('>f4'), 'F') == want
    assert array_digest(arr[:, ::-1][:, ::-1], 'F') == want
    hasher = xxhash.xxh3_128()
    hasher.update(repr(('<f4', (2, 3, 4))).encode())
    hasher.update(arr.tobytes(order='F'))
    assert hasher.hexdigest() == want


@pytest.mark.parametrize('shape', [(40, 30, 20, 3), (300, 200), (3, 70, 50, 9)])
@pytest.mark.parametrize('dtype', ['<f4', '>i2', 'u1', '<c16', '|V3'])
def test_views_with_offsets_and_read_only_buffers(shape, dtype):
    base = np.random.default_rng(0).integers(0, 255, (*shape, np.dtype(dtype).itemsize), 'u1')
    arr = base.view(dtype)[..., 0]
    views = [
        arr[1:, 2:-1],
        arr[::-1, 1::3],
        np.moveaxis(arr, 0, -1)[..., 1:],
        np.frombuffer(arr.tobytes(), dtype).reshape(shape)[:, ::2],  # read-only
    ]
    for view in views:
        assert _kernel_bytes(view) == _fortran(view)
        assert b''.join(bytes(b) for b in f_blocks(view)) == _fortran(_little(view))


@pytest.mark.parametrize('dtype', ['u1', '<i2', '<f4', '>f8', '<c16', '|V3', 'V7'])
def test_column_groups_of_several_axes(dtype):
    """Source axes that continue each other (a block of a C-ordered 4-D image, a reversed
    one, broadcast axes) are one run of columns of a tile, each column with its own
    output offset: larger than a tile, with edges, in any direction."""
    base = np.random.default_rng(5).integers(0, 255, (70, 9, 11, 17, np.dtype(dtype).itemsize))
    arr = base.astype('u1').view(dtype)[..., 0]
    views = [
        arr[:, :, 3:7, :],  # columns: 4 x 17 items in a row
        arr[:, 2:5],  # columns: 3 x 11 x 17
        arr[::-1, ::-1, ::-1, ::-1],  # negative strides throughout
        arr[:, :, ::-1, ::-1][:, 1:, 2:9],
        np.broadcast_to(arr[:, :1, :1, :1], (70, 4, 5, 6)),  # zero strides continue
        arr.transpose(1, 0, 2, 3)[:, :, 4:6],
    ]
    for view in views:
        assert _kernel_bytes(view) == _fortran(view)


@pytest.mark.parametrize('dtype', ['<f4', '>f8', '<i2', '<c8'])
def test_unaligned_items(dtype):
    raw = np.random.default_rng(4).integers(0, 255, 8 * 16 * 40 + 1, 'u1')
    arr = np.frombuffer(raw.data, dtype, count=8 * 16 * 40 // np.dtype(dtype).itemsize, offset=1)
    assert not arr.flags.aligned
    for view in (arr.reshape(-1, 16).T, arr.reshape(-1, 8, 4)[::-1, 1:, ::2], arr[::3]):
        assert _kernel_bytes(view) == _fortran(view)


def test_memory_mapped_arrays(tmp_path):
    path = tmp_path / 'data.bin'
    values = np.random.default_rng(1).random((50, 60, 70), dtype=np.float32)
    values.tofile(path)
    for mode in ('r', 'c', 'r+'):
        mapped = np.memmap(path, np.float32, mode, shape=values.shape)
        for view in (mapped, mapped[::2, 5:, ::-3], mapped.transpose(2, 0, 1)):
            assert _kernel_bytes(view) == _fortran(np.asarray(view))
            assert array_digest(view, 'F') == array_digest(np.array(view), 'F')
        del mapped


def test_the_destination_must_hold_the_bytes():
    arr = np.zeros((4, 5), 'f4')
    with pytest.raises(ValueError, match='holds 79 bytes'):
        _kernel(arr, np.empty(79, np.uint8))
    with pytest.raises(BufferError):
        _kernel(arr, bytes(80))  # read-only
    with pytest.raises(ValueError, match='not C-contiguous'):
        _kernel(arr, np.empty((10, 16), np.uint8)[:, ::2])
    assert gather(arr, np.empty(80, np.uint8)).tobytes() == arr.tobytes(order='F')
    huge = np.broadcast_to(np.zeros((), 'f8'), (2**20, 2**20, 2**10))  # 8 PiB, no memory
    with pytest.raises(ValueError, match=f'the source {huge.nbytes}'):
        _kernel(huge, np.empty(8, np.uint8))
    scalar = np.array(3.5, '>f8')
    assert _kernel_bytes(scalar) == scalar.tobytes()


def test_datetimes_gather_and_objects_refuse():
    arr = np.arange(12).astype('datetime64[s]').reshape(3, 4).T
    assert gather(arr, np.empty(arr.nbytes, np.uint8)).tobytes() == _fortran(arr)
    # the bytes of an object array are pointers, not content: no digest, in any layout
    objects = np.array([[1, 'x'], [None, 2.0]], object)
    for layout in (objects, objects.T, np.asfortranarray(objects)):
        with pytest.raises(TypeError):
            array_digest(layout, 'F')


def test_concurrent_gathers_from_threads():
    """The GIL is released while copying: digests computed at once in threads are right."""
    rng = np.random.default_rng(2)
    arrays = [rng.random((64, 48, 40, 4), dtype='f4')[:, ::-1, 1:, ::2] for _ in range(6)]
    arrays += [np.moveaxis(rng.integers(0, 9, (30, 80, 70), 'i2'), 0, -1) for _ in range(2)]
    want = [array_digest(np.asfortranarray(a), 'F') for a in arrays]
    got: dict[int, list] = {}
    barrier = threading.Barrier(len(arrays))

    def work(i):
        barrier.wait()
        got[i] = [array_digest(arrays[i], 'F') for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(arrays))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(got[i] == [want[i]] * 5 for i in range(len(arrays)))


def _digest_in_child(arr: np.ndarray) -> str:
    return array_digest(arr, 'F')


def test_a_spawned_process_gets_the_same_digest():
    arr = np.random.default_rng(3).random((33, 44, 55)).astype('>f8').transpose(1, 2, 0)[::2]
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        theirs = pool.apply(_digest_in_child, (arr,))
    assert theirs == array_digest(arr, 'F') == array_digest(np.asfortranarray(arr), 'F')
