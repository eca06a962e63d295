"""Content digests of images and of their voxel data.

Digests are xxh3-128 (xxhash): about 25 GB/s here, against 0.7 GB/s for md5. They
are content keys, not signatures: equal content gives equal digests in any process
or on any machine, and any change of header, extension, affine or voxel changes it.
Voxels are streamed in blocks, so no float64 copy of a proxy is ever made.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import xxhash
from nibabel.arrayproxy import ArrayProxy
from nibabel.brikhead import AFNIArrayProxy
from nibabel.gifti import GiftiImage

from .fileid import fd_id, path_id
from .opening import reading
from .snapshot import ProxySpec, private_proxy, proxy_spec, snapshot

try:
    from ._gather import gather as _kernel
except ImportError:  # installed without a C compiler: numpy_gather, several times slower
    _kernel = None

__all__ = [
    'DIGEST_VERSION',
    'array_digest',
    'data_digest',
    'edited_cache',
    'f_blocks',
    'gather',
    'held_cache',
    'image_digest',
    'numpy_gather',
    'proxy_blocks',
    'read_array',
    'update_with_array',
]

#: Version of the digest's definition: part of every digest, and of the store's layout.
DIGEST_VERSION = 2
_VERSION = b'nipype_nibtrack-digest-%d' % DIGEST_VERSION
#: Voxels are hashed in blocks of about this size: they fit in cache, and memory use
#: stays flat whatever the image's size.
BLOCK_BYTES = 1 << 22
#: A slab gathered into Fortran order at once: larger slabs read each cache line of a
#: C-ordered array fewer times; memory stays bounded by this.
_GATHER_BYTES = 4 * BLOCK_BYTES
#: Bytes of each run along the last axis a slab takes (4 cache lines: see _slabs).
#: Measured on a C-ordered 4096 x 4096 float32 array: 1 MiB slabs gather in 0.6x the
#: time of 16 MiB ones; a 256^3 one keeps its 16 MiB slabs (64 items of 4 bytes).
_RUN_BYTES = 256
#: ... unless the slab would be smaller than this (a 2 x 10^8 array: not 400 000 slabs)
_MIN_SLAB = 1 << 20
_TILE_BYTES = 1 << 17  # a tile of numpy's transposing gather: fits in L2
_TILE_ROWS = 8  # at least this many contiguous elements per inner loop
# What reading voxel data from a damaged, truncated or vanished file raises
READ_ERRORS = (OSError, EOFError, ValueError, zlib.error)


def _little(arr: np.ndarray) -> np.ndarray:
    """``arr`` with little-endian bytes, so that a digest does not depend on the machine."""
    if arr.dtype.isnative and sys.byteorder == 'little':
        return arr
    if arr.dtype.byteorder in ('<', '|') and arr.dtype.fields is None:
        return arr
    return arr.astype(arr.dtype.newbyteorder('<'))


def f_blocks(arr: np.ndarray, *, copy: bool = False) -> Iterator[np.ndarray]:
    """The values of ``arr`` in Fortran order, as contiguous blocks of bytes.

    The canonical traversal of every digest: the order in which NIfTI, Analyze and MGH
    store voxels, so that a file is hashed as it is read and an image as it is written.
    An F-contiguous array is cut into views (no copy unless ``copy``: then each block
    is a snapshot in a reused buffer); any other layout is gathered into one reused
    buffer of at most 16 MiB, a slab along its last axes at a time, by the compiled
    kernel ``nipype_nibtrack._gather`` (numpy's copies, about ten times slower, when
    it is not built). A block is valid until the next one is asked for.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.arange(24, dtype='<i4').reshape(2, 3, 4)
    >>> b''.join(bytes(b) for b in f_blocks(a)) == a.tobytes(order='F')
    True
    """
    arr = np.asanyarray(arr)
    if isinstance(arr, np.ma.MaskedArray) or type(arr) is not np.ndarray:
        arr = np.asarray(arr)
    if arr.ndim == 0 or arr.flags.f_contiguous:
        flat = _little(arr).reshape(-1, order='F').view(np.uint8)
        step = BLOCK_BYTES - BLOCK_BYTES % max(1, arr.dtype.itemsize)
        padding = _padding(arr.dtype)
        if padding is not None:  # the padding is zeroed in a copy, never in the array
            copy = True
        buffer = np.empty(min(step, flat.size), np.uint8) if copy else None
        for start in range(0, flat.size, step):
            part = flat[start : start + step]
            if buffer is not None:  # one buffer, reused: no page faults per block
                np.copyto(buffer[: part.size], part)
                part = _zero_padding(buffer[: part.size], arr.dtype.itemsize, padding)
            yield part
        return
    buffer = np.empty(max(min(arr.nbytes, _GATHER_BYTES), arr.dtype.itemsize), np.uint8)
    for part in _slabs(arr, buffer.size):  # pages of the buffer no slab needs stay unmapped
        block = _little_block(gather(part, buffer[: part.nbytes]), arr.dtype)
        yield _zero_padding(block, arr.dtype.itemsize, _padding(arr.dtype))


@functools.lru_cache(maxsize=256)
def _padding(dtype: np.dtype) -> np.ndarray | None:
    """The offsets of the bytes of a ``dtype`` item that no field covers, or None.

    Padding bytes of a record (``align=True``, explicit offsets) are no content: copies
    leave them as they find them, so a digest that read them would depend on the path the
    bytes took (compiled gather, numpy's copies, a byte swap). Digests hash them as zeros.

    >>> import numpy as np
    >>> _padding(np.dtype([('a', 'u1'), ('b', '<i2')], align=True)).tolist()
    [1]
    >>> _padding(np.dtype('<f4')) is None
    True
    """
    if dtype.fields is None:
        return None
    covered = np.zeros(dtype.itemsize, bool)
    _cover(dtype, 0, covered)
    return None if covered.all() else np.flatnonzero(~covered)


def _cover(dtype: np.dtype, offset: int, covered: np.ndarray) -> None:
    """Mark the bytes of ``dtype`` at ``offset`` that hold a field's value."""
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        inner = np.zeros(base.itemsize, bool)
        _cover(base, 0, inner)
        covered[offset : offset + dtype.itemsize] |= np.tile(inner, math.prod(shape))
    elif dtype.fields is not None:
        for field in dtype.fields.values():
            _cover(field[0], offset + field[1], covered)
    else:
        covered[offset : offset + dtype.itemsize] = True


def _zero_padding(block: np.ndarray, itemsize: int, padding: np.ndarray | None) -> np.ndarray:
    """``block`` (bytes of whole items, a buffer of ours) with its padding bytes zeroed."""
    if padding is not None:
        block.reshape(-1, itemsize)[:, padding] = 0
    return block


def _slabs(arr: np.ndarray, limit: int) -> Iterator[np.ndarray]:
    """Views of ``arr`` whose Fortran-ordered bytes follow each other, each <= ``limit``.

    A slab along the last axis takes at most :data:`_RUN_BYTES` of each run along it
    (the runs a C-ordered array's gather reads), unless that makes it smaller than
    :data:`_MIN_SLAB`: whole cache lines, and an output small enough to stay in cache
    until it is hashed, in few enough slabs that Python's loop costs nothing.
    """
    if arr.ndim == 0:
        yield arr
        return
    slab = arr[..., 0].nbytes
    if slab <= limit:
        step = limit // slab
        if arr.ndim > 1:
            step = min(step, max(-(-_RUN_BYTES // arr.itemsize), _MIN_SLAB // slab))
        for j in range(0, arr.shape[-1], step):
            yield arr[..., j : j + step]
        return
    for j in range(arr.shape[-1]):
        yield from _slabs(arr[..., j], limit)


def gather(arr: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Copy the bytes of ``arr``'s items in Fortran order into ``out`` (``arr.nbytes``
    contiguous bytes) and return ``out``; no byte swapping.

    The compiled kernel when it is built (blocked, at memory speed, GIL released),
    else numpy's copies in tiles that fit in cache: the same bytes either way.

    >>> import numpy as np
    >>> a = np.arange(6, dtype='>i2').reshape(2, 3)
    >>> gather(a, np.empty(12, np.uint8)).tobytes() == a.tobytes(order='F')
    True
    """
    if _kernel is not None and not arr.dtype.hasobject:  # pointers are no content
        try:
            _kernel(arr, out)
            return out
        except (BufferError, TypeError, ValueError):  # a dtype numpy exports no buffer of
            pass
    return numpy_gather(arr, out)


def numpy_gather(arr: np.ndarray, out: np.ndarray) -> np.ndarray:
    """:func:`gather` without the compiled kernel: numpy's copies, in tiles.

    A tile's reads and writes stay in cache: about three times faster than one
    transposing copy, still several times slower than the kernel.

    >>> import numpy as np
    >>> a = np.arange(6, dtype='f4').reshape(2, 3)[:, ::-1]
    >>> numpy_gather(a, np.empty(24, np.uint8)).tobytes() == a.tobytes(order='F')
    True
    """
    if arr.size == 0:
        return out
    dst = out.view(arr.dtype).reshape(arr.shape[::-1])  # C order of the reversed shape
    if arr.ndim < 2:
        dst[...] = arr
        return out
    rows = max(_TILE_ROWS, _TILE_BYTES // max(1, arr.nbytes // arr.shape[0]))
    for i in range(0, arr.shape[0], rows):
        dst[..., i : i + rows] = arr[i : i + rows].T
    return out


def _little_block(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A gathered block's bytes made little-endian, as :func:`_little` makes them."""
    typed = block.view(dtype)
    if dtype.fields is None and dtype.kind in 'biufc' and dtype.byteorder == '>':
        return typed.byteswap(inplace=True).view(np.uint8)  # a buffer of ours: in place
    return _little(typed).reshape(-1).view(np.uint8)


def update_with_array(hasher: Any, arr: np.ndarray, order: str = 'C') -> None:
    """Feed the bytes of ``arr`` in ``order`` to ``hasher``, a block at a time.

    The bytes fed do not depend on the memory layout, only on the values, shape,
    dtype and ``order``.

    Examples
    --------
    >>> import numpy as np, xxhash
    >>> a = np.arange(24, dtype='f4').reshape(2, 3, 4)
    >>> h1, h2 = xxhash.xxh3_128(), xxhash.xxh3_128()
    >>> update_with_array(h1, a)
    >>> update_with_array(h2, np.asfortranarray(a))
    >>> h1.hexdigest() == h2.hexdigest() == xxhash.xxh3_128(a.tobytes()).hexdigest()
    True
    """
    arr = np.asanyarray(arr)
    for block in f_blocks(arr.T if order == 'C' else arr):
        hasher.update(block)


class _Memo:
    """A small thread-safe LRU map (whose lock a forked child takes afresh)."""

    _every: weakref.WeakSet = weakref.WeakSet()

    def __init__(self, size: int = 512):
        self._data: OrderedDict = OrderedDict()
        self._size = size
        self._lock = threading.Lock()
        _Memo._every.add(self)

    @classmethod
    def _reset_after_fork(cls) -> None:
        # a lock held by another thread at fork() stays held forever in the child
        for memo in list(cls._every):
            memo._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)


os.register_at_fork(after_in_child=_Memo._reset_after_fork)
_proxy_digests = _Memo()


def _proxy_key(spec: ProxySpec | None, *variant: Any) -> tuple | None:
    """Memo key for a proxy's data: only for a known file whose identity has settled.

    A proxy holding a descriptor reads the file it holds, which may no longer be the one
    at its path: its key is the held file's identity, never the path's.
    """
    if spec is None or spec.path is None or spec.in_memory:
        return None
    try:
        ident = path_id(spec.path) if spec.fd is None else fd_id(spec.fd)
    except OSError:  # a closed descriptor
        return None
    if ident is None or not ident.settled():
        return None
    return (spec.kind, spec.path, spec.params, ident, spec.fd is not None, *variant)


def _dtype_key(dtype: np.dtype) -> str:
    # byte order is normalised (blocks are little-endian); a structured dtype (RGB) is
    # '|V3' in dtype.str: its fields must count too
    dtype = np.dtype(dtype).newbyteorder('<')
    return dtype.str if dtype.fields is None else repr(dtype.descr)


def _seed(dtype: np.dtype, shape: tuple) -> bytes:
    """What a data digest hashes before the voxels: their dtype and shape."""
    return repr((_dtype_key(dtype), tuple(int(n) for n in shape))).encode()


def _hasher(dtype: np.dtype, shape: tuple) -> Any:
    hasher = xxhash.xxh3_128()
    hasher.update(_seed(dtype, shape))
    return hasher


def array_digest(arr: np.ndarray, order: str = 'C') -> str:
    """Digest of an array's dtype, shape and values in ``order``, whatever its layout.

    >>> import numpy as np
    >>> a = np.arange(6.0).reshape(2, 3)
    >>> array_digest(a) == array_digest(np.asfortranarray(a)) != array_digest(a, 'F')
    True
    >>> array_digest(a, 'F') == array_digest(a.astype('>f8'), 'F')  # any byte order
    True
    """
    arr = np.asanyarray(arr)
    view = arr.T if order == 'C' else arr
    hasher = _hasher(arr.dtype, view.shape)
    for block in f_blocks(view):
        hasher.update(block)
    return hasher.hexdigest()


def _streams_file(dataobj: Any) -> bool:
    """True for a proxy whose stored values lie in its file in Fortran order."""
    return (
        isinstance(dataobj, ArrayProxy)
        and not isinstance(dataobj, AFNIArrayProxy)
        and dataobj.order == 'F'
    )


def proxy_blocks(dataobj: Any, dtype: Any = None, *, raw: bool = False) -> Iterator[np.ndarray]:
    """Blocks of a data object's values in Fortran order, as :func:`f_blocks` gives them.

    ``raw``: the stored values, read straight from the file in blocks (never the whole
    array, never a float copy); else the values ``np.asanyarray(dataobj, dtype)`` shows,
    computed a slab at a time with nibabel's own scaling. A proxy's file is opened once,
    by the core (:func:`~nipype_nibtrack.opening.reading`), never by name by nibabel.

    Raises
    ------
    EOFError
        The file is shorter than the proxy's shape says.
    NotRegularFile
        A FIFO, a directory or a device is at the proxy's file name.
    """
    with reading(dataobj) as dataobj:
        yield from _blocks(dataobj, dtype, raw)


def _blocks(dataobj: Any, dtype: Any, raw: bool) -> Iterator[np.ndarray]:
    if raw and _streams_file(dataobj):
        yield from _file_blocks(dataobj)
        return
    if isinstance(dataobj, ArrayProxy) and not isinstance(dataobj, AFNIArrayProxy):
        shape = dataobj.shape
        if len(shape) == 0:
            yield from f_blocks(_proxy_slab(dataobj, (), dtype, raw))
            return
        slab = dataobj.dtype.itemsize * max(1, int(np.prod(shape[:-1])))
        step = max(1, (4 * BLOCK_BYTES) // slab)
        for j in range(0, shape[-1], step):
            slicer = (Ellipsis, slice(j, j + step))
            yield from f_blocks(_proxy_slab(dataobj, slicer, dtype, raw))
        return
    yield from f_blocks(np.asanyarray(dataobj.get_unscaled() if raw else dataobj, dtype=dtype))


def read_array(dataobj: Any, dtype: Any = None, *, raw: bool = False) -> np.ndarray:
    """``np.asanyarray(dataobj, dtype)`` (the stored values with ``raw``), a proxy's
    file read through a descriptor the core opened (:func:`~.opening.reading`).

    >>> import numpy as np
    >>> read_array(np.arange(3), 'f4').dtype
    dtype('float32')
    """
    with reading(dataobj) as obj:
        return obj.get_unscaled() if raw else np.asanyarray(obj, dtype=dtype)


def _proxy_slab(dataobj: ArrayProxy, slicer: tuple, dtype: Any, raw: bool) -> np.ndarray:
    if raw:
        return np.asanyarray(dataobj._get_unscaled(slicer))
    # what ArrayProxy.__array__(dtype) computes, restricted to the slab
    return np.asanyarray(dataobj._get_scaled(dtype=dtype, slicer=slicer))


def _file_blocks(dataobj: ArrayProxy) -> Iterator[np.ndarray]:
    """The stored bytes of an F-ordered proxy, read sequentially into one buffer (a
    proxy from :func:`~.opening.reading`: it opens nothing by name)."""
    dtype = dataobj.dtype
    total = int(np.prod(dataobj.shape, dtype=np.int64)) * dtype.itemsize
    step = BLOCK_BYTES - BLOCK_BYTES % dtype.itemsize
    buffer = np.empty(min(step, max(total, 1)), np.uint8)
    swap = dtype.byteorder == '>' or (dtype.byteorder == '=' and sys.byteorder == 'big')
    with dataobj._get_fileobj() as fileobj, dataobj._lock:
        fileobj.seek(dataobj.offset)
        done = 0
        while done < total:
            want = min(step, total - done)
            view = memoryview(buffer)[:want]
            got = 0
            while got < want:
                n = fileobj.readinto(view[got:])
                if not n:
                    raise EOFError(
                        f'Expected {total} bytes of voxel data, got {done + got}: the file '
                        'is shorter than its header says'
                    )
                got += n
            block = buffer[:want]
            if swap:
                block = block.view(dtype).byteswap().view(np.uint8)
            yield block
            done += want


def data_digest(dataobj: Any, dtype: Any = None, order: str = 'C', *, raw: bool = False) -> str:
    """Digest of ``np.asanyarray(dataobj, dtype)`` (of the stored values with ``raw``),
    read once per file identity.

    Equal to :func:`array_digest` of the same values. A proxy is read in blocks (raw
    values straight from its file) and its digest memoised per file identity (device,
    inode, size, mtime, ctime), so hashing or checking an image again costs no read.

    Examples
    --------
    >>> import numpy as np
    >>> data_digest(np.zeros(3, 'f4')) == data_digest(np.zeros(3, 'f8'), 'f4')
    True
    """
    private = True
    if isinstance(dataobj, ArrayProxy) and not getattr(dataobj, '_persist_opener', True):
        # read and keyed through one private copy: another thread changing the proxy's
        # parameters and back while it is read cannot file one reading under the other
        # (not a proxy holding its file: a copy would close the file when collected)
        try:
            dataobj = private_proxy(dataobj)
        except TypeError:  # it would share state with the proxy: read it, keep nothing
            private = False
    spec = proxy_spec(dataobj)
    key = _proxy_key(spec, str(dtype), order, raw) if private else None
    if key is not None and (hit := _proxy_digests.get(key)) is not None:
        return hit
    if order == 'C' or not isinstance(dataobj, ArrayProxy) or isinstance(dataobj, AFNIArrayProxy):
        digest = array_digest(read_array(dataobj, dtype, raw=raw), order)
    else:
        out_dtype = dataobj.dtype if raw else _shown_dtype(dataobj, dtype)
        hasher = _hasher(out_dtype, dataobj.shape)
        for block in proxy_blocks(dataobj, dtype, raw=raw):
            hasher.update(block)
        digest = hasher.hexdigest()
    if key is not None and _proxy_key(proxy_spec(dataobj), str(dtype), order, raw) == key:
        _proxy_digests.put(key, digest)  # the file did not change while it was read
    return digest


def _shown_dtype(dataobj: Any, dtype: Any) -> np.dtype:
    """The dtype ``np.asanyarray(dataobj, dtype)`` has, computed without reading data."""
    if isinstance(dataobj, ArrayProxy) and not isinstance(dataobj, AFNIArrayProxy):
        with reading(dataobj) as proxy:  # an empty slab: nothing read, the file opened
            return np.asanyarray(proxy._get_scaled(dtype=dtype, slicer=_empty(dataobj))).dtype
    return read_array(dataobj, dtype).dtype


def _empty(dataobj: ArrayProxy) -> tuple:
    return tuple(slice(0, 0) for _ in dataobj.shape) or ()


def _filled_caches(img: Any) -> Iterator[np.ndarray]:
    """The arrays ``img`` keeps from reads (``get_fdata``'s, ``get_data``'s), in that order.

    An array image's data object is not a cache of anything: left out.
    """
    for name in ('_fdata_cache', '_data_cache'):
        cache = getattr(img, name, None)
        if cache is not None and cache is not img.dataobj:
            yield cache


def edited_cache(img: Any) -> np.ndarray | None:
    """The image's filled data cache if it no longer equals what its data object reads.

    ``get_fdata()`` keeps its array in the image; edits to it are what the user sees
    but not what ``nib.save`` writes. Comparison is bit for bit (``-0.0`` differs from
    ``0.0``; NaNs compare by payload), in Fortran order to match proxies.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    >>> edited_cache(img) is None
    True
    >>> img.get_fdata()[0, 0, 0] = 7
    >>> edited_cache(img)[0, 0, 0]
    np.float64(7.0)
    """
    for cache in _filled_caches(img):
        if array_digest(cache, 'F') != data_digest(img.dataobj, cache.dtype, 'F'):
            return cache
    return None


def held_cache(img: Any) -> np.ndarray | None:
    """The data cache that stands for what ``img`` holds, or None to read its data object.

    An edited cache (see :func:`edited_cache`); or any cache when the data object can no
    longer be read (its file deleted or truncated): every voxel the image shows is
    still in memory, and nothing is lost by writing it from there.

    Examples
    --------
    >>> import os, tempfile, numpy as np, nibabel as nib
    >>> path = os.path.join(tempfile.mkdtemp(), 'gone.nii')
    >>> nib.save(nib.Nifti1Image(np.ones((2, 2, 2), 'f4'), np.eye(4)), path)
    >>> img = nib.load(path)
    >>> data = img.get_fdata()
    >>> os.unlink(path)
    >>> held_cache(img) is data
    True
    """
    try:
        return edited_cache(img)
    except READ_ERRORS:
        cache = next(_filled_caches(img), None)
        if cache is None:
            raise
        return cache


def data_source(img: Any) -> tuple[bytes, Any, Any, bool]:
    """(tag, values, dtype, raw) of the voxels ``img`` holds: what digests and writes read.

    ``values`` is an edited or orphaned cache (an array), else the data object; ``raw``
    says the stored values are meant (their scaling is in ``tag``).
    """
    cache = held_cache(img)
    if cache is not None:
        return b'edited-cache', cache, cache.dtype, False
    dataobj = img.dataobj
    if isinstance(dataobj, ArrayProxy) and not isinstance(dataobj, AFNIArrayProxy):
        # Stored values and their scaling determine the scaled values; hashing them
        # avoids a float copy. Unscaled stored values hash like the same array in memory.
        slope, inter = float(dataobj.slope), float(dataobj.inter)
        tag = b'' if (slope, inter) == (1.0, 0.0) else repr(('scaled', slope, inter)).encode()
        return tag, dataobj, dataobj.dtype, True
    return b'', dataobj, None, False


def meta_digest(img: Any, snap: Any = None) -> Any:
    """A hasher fed with the version, class, header, extensions, affine and alias."""
    snap = snapshot(img) if snap is None else snap
    hasher = xxhash.xxh3_128()
    hasher.update(_VERSION)
    hasher.update(type(img).__name__.encode())
    for part in (snap.header, snap.extensions, snap.affine, (snap.alias or '').encode()):
        hasher.update(b'\0' if part is None else len(part).to_bytes(8, 'little') + part)
    return hasher


def finish_digest(meta: Any, tag: bytes, data_hex: str) -> str:
    """The image digest from its meta hasher, data tag and data digest."""
    hasher = meta.copy()
    hasher.update(tag)
    hasher.update(data_hex.encode())
    return hasher.hexdigest()


def image_digest(img: Any) -> str:
    """Content digest of an image: format, header, extensions, affine and voxels.

    Voxels are hashed in Fortran order in blocks (:func:`f_blocks`): as fast for a
    file-backed image (read straight from its file, never whole) as for an array in
    memory, and equal whatever the array's layout, the process or the machine.

    Parameters
    ----------
    img : nibabel image

    Returns
    -------
    str
        32 hexadecimal characters.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> data = np.arange(8, dtype='f4').reshape(2, 2, 2)
    >>> a = nib.Nifti1Image(data, np.eye(4))
    >>> b = nib.Nifti1Image(data.copy(order='F'), np.eye(4))
    >>> image_digest(a) == image_digest(b)
    True
    >>> b.dataobj[1, 1, 1] = -1
    >>> image_digest(a) == image_digest(b)
    False
    """
    if isinstance(img, GiftiImage):
        # No header, affine or dataobj: the XML holds the whole image, data included
        hasher = xxhash.xxh3_128()
        hasher.update(_VERSION)
        hasher.update(b'GiftiImage')
        hasher.update(img.to_xml())
        return hasher.hexdigest()
    meta = meta_digest(img)
    tag, values, dtype, raw = data_source(img)
    if isinstance(values, np.ndarray) and not raw:
        data_hex = array_digest(values, 'F')
    else:
        data_hex = data_digest(values, dtype if not raw else None, 'F', raw=raw)
    return finish_digest(meta, tag, data_hex)
