"""What an answer about an image rests on, and re-checking it for the cost of opening files.

Two memos of the package keep an answer for as long as what it was computed from holds:
a remembered clean verdict (:class:`Memo`, used by :mod:`.rules`) and the state of an
image (:class:`~nipype_nibtrack.state.ImageState`, whose answers the workflow layers
reuse). Both rest on the same two sides, defined here once:

- the image's side, :func:`image_key`, read from the image in about a microsecond:
  header class, dtype and bytes, NIfTI extension bytes, affine bytes, dtype alias, the
  data object (identity and every read parameter) and file names, for an image that
  holds no data cache;
- the files' side, :func:`read_files`: per file ``(path, identity, number of header
  bytes, those bytes)`` -- for a ``.nii``, everything up to the data offset; for a
  ``.nii.gz``, the compressed bytes that decompress to it, so nothing is decompressed --
  read again at every check by :func:`files_unchanged` through one ``open``, ``fstat``
  and ``pread`` per file.

For a clean verdict, if everything is equal the verdict still holds: the reference is a
pure function of the header bytes (and the ``.mat``), and an image without a data cache
reads its voxels from the file, as a tool does. This holds for files younger than the
racy window too: a same-size rewrite within one clock tick that changes the header
changes these bytes. Anything else, or any difference, falls back to the full check.

An answer is remembered under the image's side read from the private copy it was
computed on (:mod:`.frozen`), never from the image itself: another thread may edit the
image and restore it while the answer is computed. So the memos work the same whatever
threads are alive.
"""

from __future__ import annotations

import os
import stat
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from types import MappingProxyType
from typing import Any

import numpy as np
from nibabel.analyze import AnalyzeImage
from nibabel.arrayproxy import ArrayProxy

from .fileid import READ_FLAGS, FileId, regular_opener
from .snapshot import data_origin, extension_bytes

__all__ = [
    'FileSide',
    'Memo',
    'files_unchanged',
    'image_key',
    'memo_for',
    'nibabel_behaviour',
    'read_files',
    'still_clean',
]

_GZIP = ('.gz',)
_NIFTI_SIZES = {348: (108, 'f4'), 540: (168, 'i8')}  # sizeof_hdr: vox_offset's place, type
_MAX_REGION = 1 << 24
# O_NONBLOCK (READ_FLAGS): a FIFO put at a remembered path never blocks the recheck;
# its identity differs from the file's, so the check fails
_OPEN_FLAGS = READ_FLAGS
_open, _fstat, _pread, _close = os.open, os.fstat, os.pread, os.close


#: One file of the files' side: ``(path, identity, number of header bytes, those bytes)``.
#: The identity is ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)`` of the opened
#: file, or None when the file is missing; the number of bytes is 0 for none, -1 for the
#: whole file (see :func:`read_files`).
FileSide = tuple[str, 'tuple[int, int, int, int, int] | None', int, bytes]


@dataclass(frozen=True)
class Memo:
    """What a clean verdict rested on; see the module docstring."""

    image: tuple  # image_key(img)
    files: tuple[FileSide, ...]
    handed: str  # the path handed out for the image's own file
    ids: Mapping  # {path: FileId}, read-only: every verdict it gives shares it

    def files_paths(self) -> tuple[str, ...]:
        return tuple(path for path, *_ in self.files)


def image_key(img: Any) -> tuple | None:
    """The image's side of an answer, or None when the image is not a simple case.

    Everything a default load of the file decides and an edit can change: the header's
    class, dtype (byte order and layout) and bytes, its NIfTI extensions as written, the
    affine, the dtype alias, the data object (identity and every read parameter) and
    the file map's names and file objects. Built from C-level accessors in about a
    microsecond: it is taken again at every check. Of a private copy
    (:func:`~.frozen.freeze`) it names the image's own data object, so it equals the
    image's key while the image holds the state copied. None for anything but a
    NIfTI/Analyze image reading its voxels through an :class:`ArrayProxy` by absolute
    name, without a held file, a data cache (editable in place without a trace), an
    affine of None or of objects (its bytes are their addresses, which a freed float
    passes on to the next one), or a class of its own that reads attributes the key
    does not (:func:`nibabel_behaviour`).

    >>> import numpy as np, nibabel as nib
    >>> image_key(nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4))) is None  # no proxy
    True
    """
    if not isinstance(img, AnalyzeImage):
        return None
    dataobj = img._dataobj
    if type(dataobj) is not ArrayProxy or dataobj._persist_opener:
        return None  # arrays (editable in place), held files: the full check
    file_like = dataobj.file_like
    # os.path.isabs on POSIX (os.pread, used below, is POSIX-only) without its frames
    if not isinstance(file_like, str) or file_like[:1] != os.sep:
        return None  # a relative name reads elsewhere after a chdir
    if img._fdata_cache is not None or img._data_cache is not None:
        return None  # a cache can be edited in place without a trace
    affine = img._affine
    if not isinstance(affine, np.ndarray) or (kind := affine.dtype).hasobject:
        return None  # None: the header decides it; objects: the bytes are their addresses
    header = img._header
    structarr = header._structarr
    if structarr.dtype.hasobject:
        return None
    known = type(img) in _NIBABEL and type(header) in _NIBABEL  # else: the walk
    if not (known or (nibabel_behaviour(type(img)) and nibabel_behaviour(type(header)))):
        return None
    file_map = img.file_map
    return (
        type(img),
        type(header),
        structarr.dtype,  # the byte order and layout the bytes are read with
        structarr.tobytes(),  # what binaryblock returns, without the checks
        extension_bytes(header) if getattr(header, 'extensions', None) else b'',
        kind,
        affine.shape,
        affine.tobytes(),
        getattr(img, '_dtype_alias', None),
        data_origin(dataobj),  # a private copy (see .frozen) names the proxy it copies
        _read_parameters(dataobj),
        tuple(file_map),
        tuple(map(_holder_names, file_map.values())),
    )


_NIBABEL: set[type] = set()  # nibabel's own classes met so far (a set test is cheapest)
# dunder names that change how every attribute is read: not nibabel's behaviour
_ATTRIBUTE_HOOKS = frozenset({'__getattribute__', '__getattr__'})
_IGNORED = frozenset({'__doc__', '__module__', '__qualname__', '__dict__', '__weakref__'})


def nibabel_behaviour(klass: type) -> bool:
    """True when ``klass`` reads its state as the nibabel class it derives from does.

    Between ``klass`` and the first class of its MRO defined by nibabel, only dunder
    methods other than attribute hooks may be defined (``__eq__``, ``__hash__``,
    ``__repr__``...): a property or method of a class of the user's own may read
    attributes that :func:`image_key` (or a private copy, :mod:`.frozen`) does not
    cover, and its answers are computed in full every time.

    >>> import nibabel as nib
    >>> class Labelled(nib.Nifti1Image):
    ...     def __repr__(self):
    ...         return 'labelled'
    >>> class Shifted(nib.Nifti1Image):
    ...     @property
    ...     def affine(self):
    ...         return self._affine + self.shift
    >>> nibabel_behaviour(Labelled), nibabel_behaviour(Shifted)
    (True, False)
    """
    if klass.__module__[:8] == 'nibabel.':  # the common case, remembered
        _NIBABEL.add(klass)
        return True
    for base in klass.__mro__:
        if base.__module__.split('.', 1)[0] == 'nibabel':
            return True
        for name in vars(base).keys() - _IGNORED:
            if name[:2] != '__' or name[-2:] != '__' or name in _ATTRIBUTE_HOOKS:
                return False
    return False


#: Everything an ArrayProxy reads its values with (C-level: no Python frame)
_read_parameters = attrgetter(
    'file_like', '_shape', '_dtype', '_offset', '_slope', '_inter', 'order'
)
_holder_names = attrgetter('filename', 'fileobj')


def _header_length(head: bytes) -> int | None:
    """Bytes up to the data offset of a NIfTI single file, from its first bytes."""
    for order in '<>':
        size = int(np.frombuffer(head[:4], order + 'i4')[0]) if len(head) >= 4 else 0
        if size in _NIFTI_SIZES and len(head) >= size:
            where, kind = _NIFTI_SIZES[size]
            offset = float(np.frombuffer(head, order + kind, count=1, offset=where)[0])
            # at least the extender bytes after the header, which flag extensions
            if np.isfinite(offset) and size + 4 <= offset <= _MAX_REGION:
                return int(offset)
            # no extensions: the extender bytes hold all there is; else they lie beyond
            return size + 4 if head[size : size + 1] == b'\x00' else None
    return None


def _compressed_length(path: str, plain_length: int) -> int | None:
    """How many raw bytes of a gzip file decompress to at least ``plain_length`` bytes."""
    inflate = zlib.decompressobj(wbits=31)
    fed, out = 0, b''
    with open(path, 'rb', opener=regular_opener) as fobj:
        while len(out) < plain_length:
            block = fobj.read(512)
            if not block or fed > _MAX_REGION:
                return None
            fed += len(block)
            out += inflate.decompress(block)
    return fed


def _region(path: str, key: str, img: Any) -> int | None:
    """How many raw bytes of ``path`` hold the header (0: none, -1: the whole file);
    None when that cannot be told cheaply."""
    if 'header' in img.file_map:  # a pair: .hdr (and .mat) small and whole, .img none
        return 0 if key == 'image' else -1
    with open(path, 'rb', opener=regular_opener) as fobj:  # never a FIFO, a device
        head = fobj.read(4096)
    if path.endswith(_GZIP):
        try:
            plain = zlib.decompressobj(wbits=31).decompress(head, 544)
        except zlib.error:
            return None
        length = _header_length(plain)
        return None if length is None else _compressed_length(path, length)
    return _header_length(head)


def _read(path: str, length: int) -> tuple[Any, bytes]:
    """Identity of the file opened at ``path`` (None: missing) and its first bytes.

    The identity is the opened file's (``fstat``), so the bytes belong to it.
    """
    try:
        fd = _open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None, b''
    except OSError:
        return 'unreadable', b''
    try:
        st = _fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped in since _region read the file
            return 'unreadable', b''
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if length == 0:
            return ident, b''
        return ident, _pread(fd, st.st_size if length < 0 else length, 0)
    finally:
        _close(fd)


def read_files(img: Any, files: Iterable[tuple[str, str]]) -> tuple[FileSide, ...] | None:
    """The files' side of an answer about ``img``: one :data:`FileSide` per file.

    Parameters
    ----------
    img : nibabel image
        The NIfTI/Analyze image the files belong to (it tells a pair from a single file).
    files : iterable of (str, str)
        ``(file map key, absolute path)`` per file, in the order to keep.

    Returns
    -------
    tuple of FileSide, or None
        None when a file cannot be read, or where its header ends cannot be told cheaply.

    Examples
    --------
    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> img = nib.load(os.path.join(data_path, 'anatomical.nii'))
    >>> (side,) = read_files(img, [('image', img.get_filename())])
    >>> side[2], files_unchanged((side,))  # the bytes up to the data offset, unchanged
    (352, True)
    """
    sides = []
    for key, path in files:
        try:
            length = _region(path, key, img) if os.path.exists(path) else 0
        except OSError:  # unreadable, or gone since: no memo
            return None
        if length is None:
            return None
        ident, data = _read(path, length)
        if not isinstance(ident, (tuple, type(None))):
            return None
        sides.append((path, ident, length, data))
    return tuple(sides)


def memo_for(img: Any, paths: dict[str, str], handed: str) -> Memo | None:
    """What a clean verdict on ``img`` rests on now; None when not a simple case."""
    key = image_key(img)
    if key is None:
        return None
    files = read_files(img, sorted(paths.items()))
    if files is None:
        return None
    ids = {path: None if i is None else FileId(*i) for path, i, _, _ in files}
    return Memo(key, files, handed, MappingProxyType(ids))


def still_clean(img: Any, memo: Memo) -> Mapping[str, FileId] | None:
    """The files' identities when ``memo`` still holds for ``img``, else None.

    The image is compared first and the files last (:func:`files_unchanged`), so the
    identities returned are the files' at the end of the check.
    """
    if image_key(img) != memo.image or not files_unchanged(memo.files):
        return None
    return memo.ids


def files_unchanged(files: tuple[FileSide, ...]) -> bool:
    """True when every file still has the identity and header bytes it had in ``files``.

    ``files`` as :func:`read_files` gave it. One ``open``, ``fstat`` and ``pread`` per
    file (inline rather than through :func:`_read`: this is the clean path's floor). The
    identity is the opened file's, so the bytes compared belong to it.
    """
    for path, ident, length, data in files:
        try:
            fd = _open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            if ident is None:
                continue
            return False
        except OSError:
            return False
        try:
            st = _fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != ident:
                return False
            if length and _pread(fd, st.st_size if length < 0 else length, 0) != data:
                return False
        finally:
            _close(fd)
    return True
