"""Provenance records kept beside images, and the user's overrides.

:func:`load` returns exactly what :func:`nibabel.load` returns and remembers, in a
weakly referenced record, the identity of the file(s) and the data object it loaded.
:func:`mark_clean` and :func:`mark_dirty` are the overrides from the nibabel design
note: the user declares what corresponds to the file.
"""

from __future__ import annotations

import bz2
import copyreg
import functools
import math
import os
import stat
import threading
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import xxhash
from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import FileBasedImage
from nibabel.filename_parser import splitext_addext
from nibabel.imageclasses import all_image_classes
from nibabel.minc1 import MincImageArrayProxy
from nibabel.openers import ImageOpener
from nibabel.parrec import PARRECArrayProxy

from .fileid import (
    FileId,
    NotRegularFile,
    absolute,
    all_settled,
    fd_id,
    not_regular,
    open_regular,
    path_id,
    regular_opener,
)
from .locks import renew_after_fork
from .snapshot import Snapshot, data_origin, proxy_spec, snapshot

__all__ = [
    'LOAD_OPTIONS',
    'Binding',
    'LoadOption',
    'Record',
    'bound_source',
    'file_identities',
    'file_paths',
    'give_private_record',
    'load',
    'load_options_reason',
    'mark_clean',
    'mark_dirty',
    'record_of',
    'source_files',
    'source_record',
    'truncation',
]


@dataclass(frozen=True)
class Binding:
    """The files an image was tied to when the package first saw its file names.

    ``names`` are the file map's names as given (perhaps relative), ``paths`` the
    absolute paths they named then (joined with that working directory, never folded
    as text) and ``inodes`` the ``(device, inode)`` found there (None: no file). A
    later ``chdir`` cannot move the image to another file: the paths stay, and a path
    that now leads to another inode makes the image dirty. ``source`` is the same for
    the file the data object reads by name: ``(name, path, (device, inode))``.
    """

    names: dict[str, str]
    paths: dict[str, str]
    inodes: dict[str, tuple[int, int] | None]
    source: tuple[str, str, tuple[int, int] | None] | None = None

    @classmethod
    def of(cls, names: dict[str, str], source_name: str | None) -> Binding:
        paths = {key: absolute(name) for key, name in names.items()}
        inodes = {key: _inode(path) for key, path in paths.items()}
        source = None
        if source_name is not None:
            path = absolute(source_name)
            source = (source_name, path, _inode(path))
        return cls(names, paths, inodes, source)

    def with_source(self, source_name: str) -> Binding:
        """The same files, with a data object that reads ``source_name`` bound now."""
        path = absolute(source_name)
        return Binding(self.names, self.paths, self.inodes, (source_name, path, _inode(path)))

    def replaced(self, ids: dict[str, FileId | None]) -> str | None:
        """The first bound path that now names another file than when bound, if any."""
        for key, inode in self.inodes.items():
            now = ids.get(key)
            if inode is not None and (now is None or (now.dev, now.ino) != inode):
                return self.paths[key]
        return None


def _inode(path: str) -> tuple[int, int] | None:
    ident = path_id(path)
    return None if ident is None else (ident.dev, ident.ino)


@dataclass
class Record:
    """What is known of an image beyond the image itself.

    ``ids`` are the identities of its files when it was loaded or marked clean,
    ``dataobj`` a weak reference to the data object it had then. ``baseline`` is the
    state the user declared clean (None unless :func:`mark_clean` was called), with
    ``caches``, the digests of its filled data caches at that moment, and
    ``file_bytes``, a digest of the files' bytes when their identities had not settled
    (a same-size rewrite within one clock tick would leave them unchanged).
    ``binding`` ties the image to the files it was loaded from (:class:`Binding`);
    ``origin`` says how the record came: ``'load'``, ``'mark_clean'``, ``'mark_dirty'``
    or ``'seen'`` (an image from plain nibabel, bound when the package first saw it).
    """

    kwargs: dict = field(default_factory=dict)
    ids: dict[str, FileId | None] = field(default_factory=dict)
    dataobj: Any = None
    baseline: Snapshot | None = None
    caches: dict[str, str] = field(default_factory=dict)
    forced_dirty: bool = False
    origin: str = 'load'
    file_bytes: str | None = None
    binding: Binding | None = None
    verdict: Any = None  # a recheck.Memo of the last clean verdict

    def holds_dataobj(self, dataobj: Any) -> bool:
        # a private copy of the proxy (see :mod:`.frozen`) stands for the proxy it copies
        return self.dataobj is not None and self.dataobj() is data_origin(dataobj)

    def private_copy(self) -> Record:
        """A copy of every field as it is now, for a private copy of its image.

        The containers in it are never changed in place (only fields are set), so a
        shallow copy is one state of the record.
        """
        copy = object.__new__(Record)
        copy.__dict__.update(self.__dict__)  # one read of every field
        return copy


_records: dict[int, tuple[weakref.ref, Record]] = {}
_lock = threading.Lock()
renew_after_fork(globals(), '_lock')
# In a private copy of an image (see :mod:`.frozen`), its own __dict__ holds
# (its private record, the record it was copied from) and the key read from it: nothing
# else refers to the copy. Copies and pickles of it drop them (see .copies).
_PRIVATE = '_nibtrack_private_record'
_FROZEN = '_nibtrack_frozen'
PRIVATE_SLOTS = (_PRIVATE, _FROZEN)
_NO_STATE: dict = {}


def record_of(img: Any) -> Record | None:
    """The provenance record of ``img``, or None when it has none.

    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = os.path.join(data_path, 'anatomical.nii')
    >>> record_of(nib.load(path)) is None, record_of(load(path)).origin
    (True, 'load')
    """
    entry = _records.get(id(img))  # one dict lookup is atomic: writers alone take the lock
    if entry is not None and entry[0]() is img:
        return entry[1]
    private = getattr(img, '__dict__', _NO_STATE).get(_PRIVATE)  # a private copy's own
    return None if private is None else private[0]


def give_private_record(copy: Any, record: Record) -> Record:
    """Attach to ``copy``, a private copy of an image (see :mod:`.frozen`), a private
    copy of ``record``, the image's; :func:`record_of` gives it for ``copy``.

    The copy is registered nowhere: the record lives in its own ``__dict__``.
    """
    private = record.private_copy()
    copy.__dict__[_PRIVATE] = (private, record)
    return private


def source_record(img: Any) -> Record | None:
    """The record what is learnt about ``img`` belongs to: for a private copy, the
    record of the image it copies (see :func:`give_private_record`), else its own."""
    private = getattr(img, '__dict__', _NO_STATE).get(_PRIVATE)
    return record_of(img) if private is None else private[1]


def _set_record(img: Any, record: Record) -> None:
    key = id(img)

    def forget(_ref: weakref.ref, key: int = key) -> None:
        with _lock:
            if _records.get(key, (None,))[0] is _ref:
                del _records[key]

    with _lock:
        _records[key] = (weakref.ref(img, forget), record)
    if copyreg.dispatch_table.get(type(img)) is None:  # a class defined after import
        _copies.register_image_class(type(img))


def _weak(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _file_names(img: Any) -> dict[str, str] | None:
    names = {}
    for key, holder in img.file_map.items():
        if holder.fileobj is not None or holder.filename is None:
            return None
        names[key] = os.fsdecode(os.fspath(holder.filename))
    return names or None


def _source_name(img: Any) -> str | None:
    """The name the data object opens on each access, when it reads by name."""
    file_like = getattr(getattr(img, 'dataobj', None), 'file_like', None)  # GIFTI: none
    if isinstance(file_like, (str, os.PathLike)):
        return os.fsdecode(os.fspath(file_like))
    return None


def binding_of(img: Any) -> Binding | None:
    """The files ``img`` is tied to, binding them now if the package never saw them.

    None when the image has no file (in memory, or a file object such as ``BytesIO``).

    Examples
    --------
    >>> import os, shutil, tempfile, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> folder = tempfile.mkdtemp()
    >>> _ = shutil.copy(os.path.join(data_path, 'anatomical.nii'), folder)
    >>> here = os.getcwd()
    >>> os.chdir(folder)
    >>> img = nib.load('anatomical.nii')  # a relative name
    >>> bound = binding_of(img)
    >>> os.chdir(here)
    >>> binding_of(img).paths == bound.paths == {'image': os.path.join(folder, 'anatomical.nii')}
    True
    """
    names = _file_names(img)
    if names is None:
        return None
    record = record_of(img)
    binding = record.binding if record is not None else None
    source = _source_name(img)
    if binding is None or binding.names != names:
        binding = Binding.of(names, source)
    elif source is not None and (binding.source is None or binding.source[0] != source):
        binding = binding.with_source(source)
    else:
        return binding
    if record is None:
        record = Record(origin='seen')
        _set_record(img, record)
    record.binding = binding
    return binding


def file_paths(img: Any) -> dict[str, str] | None:
    """Absolute paths of every file in the image's file map, or None if it has none.

    Relative names are joined with the working directory of the moment the package
    first saw them (:func:`binding_of`), not today's. An image whose file map points at
    a file object (``BytesIO``, after ``to_bytes``) or lacks a name has no file a tool
    could read.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> file_paths(nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4))) is None
    True
    """
    binding = binding_of(img)
    return None if binding is None else binding.paths


def main_path(img: Any) -> str | None:
    """The bound absolute path of the image's own file (``get_filename()``), or None.

    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> main_path(nib.load(os.path.join(data_path, 'anatomical.nii'))).endswith('anatomical.nii')
    True
    """
    paths = file_paths(img)
    if paths is None:
        return None
    return paths.get(type(img).files_types[0][0])


def _held_inode(dataobj: Any) -> tuple[int, int] | None:
    spec = proxy_spec(dataobj)
    if spec is None or spec.fd is None:
        return None
    try:
        ident = fd_id(spec.fd)
    except OSError:
        return None
    return ident.dev, ident.ino


def bound_source(img: Any) -> str | None:
    """Why the data object of a dirty ``img`` cannot be trusted to read its own voxels.

    A data object that opens its file by name on each access (nibabel's proxies) reads
    whatever that name leads to now: after a ``chdir``, a replacement or a re-pointed
    symbolic link, another file. The image's voxels were in the file it was tied to;
    the other file's are not the image's. None when the name still leads to that file,
    or when the data object holds the file open or is an array.
    """
    binding = binding_of(img)
    source = _source_name(img)
    if binding is None or binding.source is None or source is None:
        return None
    _, path, inode = binding.source
    now = absolute(source)
    here = _inode(now)
    if inode is not None and here == inode:
        return None
    held = _held_inode(img.dataobj)
    if held is not None and held == inode:
        return None  # it reads the file it holds open (keep_file_open=True)
    if inode is None:
        return f'{path} did not exist when the image was first seen'
    if here is None:
        return f'{now} no longer exists (deleted or moved since the image was loaded)'
    if now != path:
        return f'its data are read from {now}, but the image was tied to {path}'
    return f'{path} is no longer the file the image was tied to'


_GZIP_TRAILER = 4  # ISIZE: the uncompressed size modulo 2**32, the last 4 bytes
#: What nibabel opens compressed (.gz, .bz2, .zst, MGH's .mgz)
_COMPRESSED = tuple(ext for ext in ImageOpener.compress_ext_map if ext)


def truncation(img: Any) -> str | None:
    """Why the file ``img``'s data object reads is shorter than its voxels need, or None.

    A file cut after its header (``os.truncate``, a copy that ran out of space) still
    loads: nibabel reads voxels only when asked, and the header still matches. A tool
    given the file fails. The identity of the file holds its size: one ``stat`` tells a
    plain file's (the descriptor a PAR/REC proxy holds: the file it reads); a gzip file
    says in its last four bytes how many bytes it inflates to, and when that is not what
    the header needs (bgzip's many members, bytes after the voxels) the stream itself is
    inflated, once per file identity. None when nothing is known to be missing (no file
    read, another compression).

    Examples
    --------
    >>> import os, shutil, tempfile, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = shutil.copy(os.path.join(data_path, 'anatomical.nii'), tempfile.mkdtemp())
    >>> truncation(nib.load(path)) is None
    True
    >>> os.truncate(path, 1000)
    >>> print(truncation(nib.load(path)))  # doctest: +ELLIPSIS
    /.../anatomical.nii is truncated: 1000 bytes, its header needs ... bytes of voxels)
    """
    voxel_file = _voxel_file(getattr(img, 'dataobj', None))
    if voxel_file is None:
        return None
    name, need, what, held = voxel_file
    path = absolute(name)
    try:
        st = os.stat(path) if held is None else os.fstat(held)
    except (OSError, ValueError):  # missing, unreachable, closed: said by other checks
        return None
    if not stat.S_ISREG(st.st_mode):
        return None  # said by not_regular
    ext = os.path.splitext(path)[1].lower()
    if ext in _STREAMS:
        if ext == '.gz' and _inflated_size(path) in (None, need % (1 << 32)):
            return None
        # gzip's trailer is only the last member's size (bgzip writes many members),
        # modulo 2**32; bzip2 tells none: the stream itself decides, inflated once per
        # file identity
        ident = path_id(path)
        size = _stream_length(path, ident) if ident and ident.settled() else _inflate(path)
        if size is None or size >= need:
            return None
        return (
            f'{path} is truncated or damaged: it inflates to {size} bytes, its header '
            f'needs {need} ({what})'
        )
    if path.lower().endswith(_COMPRESSED) or st.st_size >= need:
        return None  # a compressed file's size says nothing of what it inflates to
    return f'{path} is truncated: {st.st_size} bytes, its header needs {need} ({what})'


# (name, bytes it must hold, why, the descriptor it reads through or None)
_VoxelFile = tuple[Any, int, str, int | None]


@functools.singledispatch
def _voxel_file(dataobj: Any) -> _VoxelFile | None:
    """The file ``dataobj`` reads its voxels from: its name, how many bytes it must hold
    and why, and the descriptor it reads through when it holds one (else None: it opens
    the name). None for anything that reads no file (an array) or no known length."""
    return None


def _voxel_bytes(offset: int, shape: Any, dtype: np.dtype) -> tuple[int, str]:
    voxels = math.prod(int(n) for n in shape) * dtype.itemsize
    return offset + voxels, f'{offset} + {voxels} bytes of voxels'


@_voxel_file.register
def _(dataobj: ArrayProxy) -> _VoxelFile | None:
    name = dataobj.file_like
    if not isinstance(name, (str, os.PathLike)):
        return None
    return name, *_voxel_bytes(int(dataobj.offset), dataobj.shape, dataobj.dtype), None


@_voxel_file.register
def _(dataobj: PARRECArrayProxy) -> _VoxelFile | None:
    # reads the whole .REC (every slice, in the file's order) through the opener it holds
    opener = dataobj.file_like
    name = getattr(opener, 'name', None)
    if not isinstance(name, (str, os.PathLike)):
        return None
    try:
        held = None if os.fspath(name).lower().endswith(_COMPRESSED) else opener.fileno()
    except (OSError, ValueError, AttributeError):  # closed, or no descriptor
        held = None
    return name, *_voxel_bytes(0, dataobj._rec_shape, dataobj.dtype), held


@_voxel_file.register
def _(dataobj: MincImageArrayProxy) -> _VoxelFile | None:
    # MINC2: HDF5 reads the file through the handle it holds; its superblock records
    # where the file ends (HDF5 refuses to open a shorter file, but not to read one)
    hdf5 = dataobj.minc_file._mincfile
    try:
        fd = hdf5.id.get_vfd_handle()
        end = _hdf5_end(fd)
    except (AttributeError, OSError, ValueError, RuntimeError):  # MINC1, closed
        return None
    if end is None:
        return None
    name = getattr(hdf5, 'filename', None)
    if not isinstance(name, (str, os.PathLike)):
        return None
    return name, end, 'the end of file its HDF5 superblock records', fd


_HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'


def _hdf5_end(fd: int) -> int | None:
    """The end-of-file address the HDF5 superblock of the file open at ``fd`` records
    (the bytes the file must hold, as HDF5's own open checks), or None.

    The superblock is at 0, or after a user block of 512, 1024, 2048... bytes; versions
    0 and 1 keep the address as their third one after 24 (28) bytes, 2 and 3 after 12.

    Examples
    --------
    >>> import os
    >>> from nibabel.testing import data_path
    >>> path = os.path.join(data_path, 'small.mnc')
    >>> fd = os.open(path, os.O_RDONLY)
    >>> _hdf5_end(fd) == os.path.getsize(path)
    True
    >>> os.close(fd)
    """
    size, at = os.fstat(fd).st_size, 0
    while (head := os.pread(fd, 64, at))[:8] != _HDF5_SIGNATURE:
        at = at * 2 or 512
        if at >= size:
            return None
    version = head[8]
    if version in (0, 1):
        width, first = head[13], 24 + 4 * version
    elif version in (2, 3):
        width, first = head[9], 12
    else:
        return None
    field = head[first + 2 * width : first + 3 * width]
    if width not in (2, 4, 8) or len(field) != width or field == b'\xff' * width:
        return None
    return int.from_bytes(field, 'little')


def _inflated_size(path: str) -> int | None:
    """The uncompressed size (modulo 2**32) a gzip file's trailer gives, or None."""
    try:
        fd = open_regular(path)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < 18:  # a gzip header and trailer at least
            return None
        return int.from_bytes(os.pread(fd, _GZIP_TRAILER, size - _GZIP_TRAILER), 'little')
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=64)
def _stream_length(path: str, ident: FileId) -> int | None:
    """:func:`_inflate`, once per settled file identity."""
    return _inflate(path)


#: The decompressors of the compressed files whose length truncation checks, by
#: extension: each stream's end leaves what follows in ``unused_data`` (the next member)
_STREAMS: dict[str, Any] = {
    '.gz': lambda: zlib.decompressobj(wbits=31),
    '.bz2': bz2.BZ2Decompressor,
}


def _inflate(path: str) -> int | None:
    """How many bytes the gzip or bzip2 file ``path`` inflates to, every member counted,
    up to where it stops being readable; None when it cannot be opened."""
    try:
        fd = open_regular(path)
    except OSError:
        return None
    fresh = _STREAMS[os.path.splitext(path)[1].lower()]
    total, inflater = 0, fresh()
    with os.fdopen(fd, 'rb') as fobj:
        while chunk := fobj.read(1 << 20):
            while chunk:
                try:
                    total += len(inflater.decompress(chunk))
                except (zlib.error, OSError, EOFError):
                    return total  # damaged here: what inflated before is all there is
                if not inflater.eof:
                    break
                chunk = inflater.unused_data
                inflater = fresh()  # the next member
    return total


def source_files(img: Any) -> tuple[str, ...]:
    """Absolute paths of every file an image's content depends on.

    The files of its file map (as bound, :func:`binding_of`) and the file its data
    object reads now, which differ after ``set_filename`` (or after a ``chdir`` when
    the data object reads a relative name). Empty for an image held in memory only.

    Examples
    --------
    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = os.path.join(data_path, 'anatomical.nii')
    >>> img = nib.load(path)
    >>> source_files(img) == (path,)
    True
    >>> img.set_filename('/elsewhere/copy.nii')
    >>> source_files(img)
    ('/elsewhere/copy.nii', ...anatomical.nii')
    """
    files = dict.fromkeys((file_paths(img) or {}).values())
    # what the proxy reads: a file name, or a file object with one (PAR/REC, held files)
    file_like = getattr(getattr(img, 'dataobj', None), 'file_like', None)  # GIFTI: none
    name = file_like if isinstance(file_like, str) else getattr(file_like, 'name', None)
    if isinstance(name, (str, os.PathLike)):
        files[absolute(name)] = None  # where it reads now, cwd included
    return tuple(files)


def file_identities(paths: dict[str, str]) -> dict[str, FileId | None]:
    """``stat`` identity of each path (None for a missing optional file).

    >>> ids = file_identities({'image': '/no/such.nii', 'here': '.'})
    >>> ids['image'] is None, ids['here'].size >= 0
    (True, True)
    """
    return {key: path_id(path) for key, path in paths.items()}


@dataclass(frozen=True)
class LoadOption:
    """What one keyword of nibabel's loaders does to what an image holds.

    ``changes_content`` says whether a value other than ``default`` makes the image
    hold something else than a default load of its file, which is what a tool reading
    the path sees; ``why`` says what it does.
    """

    default: Any
    changes_content: bool
    why: str


#: Every keyword of every image class's ``from_filename``/``from_file_map`` (nibabel 5.4).
#: A keyword missing here makes the image dirty: its effect is unknown.
LOAD_OPTIONS: dict[str, LoadOption] = {
    'mmap': LoadOption(True, False, 'how voxels are read (memory map or read), not which'),
    'keep_file_open': LoadOption(
        None, False, 'when the file is opened; a held file is checked against the path'
    ),
    'buffer_size': LoadOption(35000000, False, "GIFTI: the XML parser's read size"),
    'scaling': LoadOption('dv', True, "PAR/REC: floating-point ('fp') or displayed values"),
    'strict_sort': LoadOption(False, True, 'PAR/REC: the order of the volumes'),
    'permit_truncated': LoadOption(
        False, True, 'PAR/REC: loads a truncated .REC that a default load refuses'
    ),
}


def _is_default(value: Any, default: Any) -> bool:
    return type(value) is type(default) and value == default


def load_options_reason(kwargs: dict[str, Any]) -> str | None:
    """Why load keywords make an image differ from a default load of its file, or None.

    Examples
    --------
    >>> load_options_reason({'mmap': False, 'scaling': 'dv'}) is None
    True
    >>> print(load_options_reason({'scaling': 'fp'}))
    loaded with scaling='fp' (PAR/REC: ...); a tool reading the file sees a default load
    (scaling='dv')
    >>> load_options_reason({'lazy': True})
    'loaded with lazy=True, a keyword whose effect on the image is unknown'
    """
    for name, value in sorted(kwargs.items()):
        option = LOAD_OPTIONS.get(name)
        if option is None:
            return f'loaded with {name}={value!r}, a keyword whose effect on the image is unknown'
        if option.changes_content and not _is_default(value, option.default):
            return (
                f'loaded with {name}={value!r} ({option.why}); a tool reading the file '
                f'sees a default load ({name}={option.default!r})'
            )
    return None


def _files_read_by_load(given: str) -> tuple[str, ...]:
    """``given`` and the files nibabel opens beside it to load it (a pair's header, a
    ``.mat``, a ``.REC``, a ``.BRIK``), by the image classes of several files.

    >>> _files_read_by_load('/data/brain.img')
    ('/data/brain.img', '/data/brain.hdr', '/data/brain.mat')
    >>> _files_read_by_load('/data/brain.nii')
    ('/data/brain.nii',)
    """
    names = dict.fromkeys([given])
    _, ext, _ = splitext_addext(given)
    for klass in _classes_of_several_files(ext.lower()):
        try:
            file_map = klass.filespec_to_file_map(given)
        except Exception:  # not a file name this class takes
            continue
        names.update(dict.fromkeys(h.filename for h in file_map.values() if h.filename))
    return tuple(names)


@functools.lru_cache(maxsize=64)
def _classes_of_several_files(ext: str) -> tuple[type, ...]:
    return tuple(
        klass
        for klass in all_image_classes
        if len(klass.files_types) > 1 and ext in (e.lower() for e in klass.valid_exts)
    )


def load(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load an image with :func:`nibabel.load` and keep its provenance.

    The record ties the image to the files opened: their absolute paths, joined with
    the working directory of this moment (so a later ``chdir`` changes nothing), and
    their ``(device, inode)``; and the load keywords (:data:`LOAD_OPTIONS`): one that
    makes the image differ from a default load of its file makes it dirty.

    Parameters
    ----------
    path : str or os.PathLike
    **kwargs
        Passed to :func:`nibabel.load`.

    Returns
    -------
    image
        Exactly what :func:`nibabel.load` returns for ``path`` joined with the working
        directory (so ``get_filename()`` is absolute and the image keeps reading the
        file it was opened from); no subclass, nothing patched.

    Raises
    ------
    NotRegularFile
        An ``OSError``: ``path`` names a directory, a FIFO, a socket or a device, from
        which nibabel would block or read garbage.

    Examples
    --------
    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> img = load(os.path.join(data_path, 'anatomical.nii'))
    >>> type(img) is nib.Nifti1Image
    True
    >>> record_of(img).origin
    'load'
    """
    given = absolute(path)  # nibabel's proxies re-open by name: give them this one
    for name in _files_read_by_load(given):  # nibabel's open of a FIFO would block
        refusal = not_regular(name)
        if refusal is not None:
            raise NotRegularFile(
                refusal.errno,
                f'{refusal.strerror}: nibabel cannot load an image from it. Put the '
                'image file there, or pass the image file itself',
            )
    for _ in range(3):
        before = _inode(given)
        img = nib.load(given, **kwargs)
        binding = binding_of(img)
        paths = binding.paths if binding is not None else {}
        opened = next((key for key, value in paths.items() if value == given), None)
        if opened is None or binding.inodes[opened] == before:
            break  # else the file was replaced while it was opened: load it again
    neutral = {name for name, option in LOAD_OPTIONS.items() if not option.changes_content}
    _set_record(
        img,
        Record(
            kwargs={k: v for k, v in kwargs.items() if k not in neutral},
            ids=file_identities(paths),
            # GIFTI images have no dataobj
            dataobj=_weak(getattr(img, 'dataobj', None)),
            binding=binding,
        ),
    )
    return img


def _require_image(img: Any, action: str) -> None:
    if not isinstance(img, FileBasedImage):
        raise TypeError(f'{action} takes a nibabel image, got {type(img).__name__}: {img!r:.80}')


def mark_clean(img: Any) -> None:
    """Declare that ``img`` as it is now corresponds to its file(s).

    Later changes are detected against this state; changes of the file(s) on disk
    make the image dirty again.

    Raises
    ------
    ValueError
        When the image has no file, or its file does not exist or is no regular file.

    Examples
    --------
    >>> import os, shutil, tempfile, nibabel as nib
    >>> from nipype_nibtrack import is_dirty
    >>> from nibabel.testing import data_path
    >>> tmp = tempfile.mkdtemp()
    >>> path = shutil.copy(os.path.join(data_path, 'anatomical.nii'), tmp)
    >>> img = nib.load(path)
    >>> img.header['descrip'] = b'cosmetic'
    >>> is_dirty(img)
    True
    >>> mark_clean(img)
    >>> is_dirty(img)
    False
    >>> img.affine[0, 3] += 1
    >>> is_dirty(img)
    True
    """
    _require_image(img, 'mark_clean')
    paths = file_paths(img)
    if paths is None:
        raise ValueError(
            f'cannot mark this {type(img).__name__} clean: it has no file. '
            'Save it with nibabel.save first, or let as_filename write it to the store.'
        )
    ids = file_identities(paths)
    main = main_path(img)
    if ids.get(_key_of(paths, main)) is None:
        raise ValueError(f'cannot mark this {type(img).__name__} clean: {main} does not exist.')
    for path in paths.values():
        refusal = not_regular(path)
        if refusal is not None:
            raise ValueError(f'cannot mark this {type(img).__name__} clean: {refusal.strerror}')
    # the user declares the files now at the bound paths to be the image's: bind anew
    inodes = {key: None if i is None else (i.dev, i.ino) for key, i in ids.items()}
    source = Binding.of({}, _source_name(img)).source
    from .digest import array_digest

    caches = {
        name: array_digest(value, 'F')
        for name in ('_dataobj', '_fdata_cache', '_data_cache')
        if isinstance(value := getattr(img, name, None), np.ndarray)
    }
    old = record_of(img)
    _set_record(
        img,
        Record(
            kwargs=old.kwargs if old else {},
            ids=ids,
            dataobj=_weak(img.dataobj),
            baseline=snapshot(img),
            caches=caches,
            origin='mark_clean',
            file_bytes=None if all_settled(ids.values()) else files_digest(paths),
            binding=Binding(_file_names(img) or {}, paths, inodes, source),
        ),
    )


def mark_dirty(img: Any) -> None:
    """Declare that ``img`` differs from its file(s), until :func:`mark_clean`.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> from nipype_nibtrack import dirty_reason
    >>> img = nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4))
    >>> mark_dirty(img)
    >>> dirty_reason(img)
    'marked dirty by the user'
    """
    _require_image(img, 'mark_dirty')
    record = record_of(img)
    if record is None:
        record = Record(origin='mark_dirty')
        _set_record(img, record)
    record.forced_dirty = True


def files_digest(paths: dict[str, str]) -> str:
    """xxh3-128 of the bytes of every existing file in ``paths``, read in blocks.

    >>> import os
    >>> from nibabel.testing import data_path
    >>> len(files_digest({'image': os.path.join(data_path, 'anatomical.nii')}))
    32
    """
    hasher = xxhash.xxh3_128()
    for key, path in sorted(paths.items()):
        hasher.update(key.encode() + b'\0')
        if not os.path.exists(path):
            continue
        with open(path, 'rb', opener=regular_opener) as fobj:
            while block := fobj.read(1 << 24):
                hasher.update(block)
    return hasher.hexdigest()


def _key_of(paths: dict[str, str], path: str) -> str | None:
    return next((key for key, value in paths.items() if value == path), None)


from . import copies as _copies  # noqa: E402  (its reducers need this module's names)
