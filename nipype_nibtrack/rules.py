"""Cleanliness rules: does an image still correspond exactly to its file(s)?

A rule is registered per image class with :func:`cleanliness_rule.register`; it takes
the image and its provenance record (or None) and returns None when clean, otherwise a
sentence saying what differs. Anything without a rule is dirty. Every rule leans to
"dirty": a false dirty costs one write, a false clean hands a tool the wrong data.

The rules compare the image with a *reference*: what nibabel makes of the file(s) now,
memoised per file identity so that repeated checks cost a few ``stat`` calls. Data are
read only when the image holds a filled data cache or an in-memory array, once per file
identity.
"""

from __future__ import annotations

import contextvars
import io
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import singledispatch
from typing import Any, NamedTuple

import numpy as np
from nibabel.analyze import AnalyzeImage
from nibabel.brikhead import AFNIImage
from nibabel.cifti2 import Cifti2Image
from nibabel.filebasedimages import FileBasedImage
from nibabel.fileholders import FileHolder
from nibabel.freesurfer.mghformat import MGHImage
from nibabel.gifti import GiftiImage
from nibabel.minc1 import Minc1Image
from nibabel.nifti2 import Nifti2Header
from nibabel.openers import ImageOpener
from nibabel.parrec import PARRECImage

from .digest import _Memo, array_digest, data_digest, edited_cache
from .fileid import FileId, all_settled, fd_id, kernel_path, not_regular, path_id, regular_opener
from .frozen import Frozen, freeze
from .opening import load_opened, opened, opened_file_map
from .provenance import (
    Record,
    binding_of,
    file_identities,
    file_paths,
    files_digest,
    load_options_reason,
    record_of,
    source_files,
    truncation,
)
from .recheck import Memo, files_unchanged, image_key, memo_for, still_clean
from .snapshot import Snapshot, extension_bytes, header_bytes, snapshot

__all__ = [
    'Cleanliness',
    'cleanliness',
    'cleanliness_rule',
    'compares_with_file',
    'dirty_reason',
    'header_key',
    'is_dirty',
]


@dataclass(frozen=True)
class Reference:
    """What nibabel makes of the file(s) now, and whether it had to repair them."""

    snapshot: Snapshot
    repaired: bool
    pinned: _Pinned | None = None  # the bytes it was made from (NIfTI/Analyze)


_references = _Memo(1024)
# The references a check used, while cleanliness() listens (per thread, per task)
_used: contextvars.ContextVar[list | None] = contextvars.ContextVar('_used', default=None)


def _fresh_file_map(paths: dict[str, str]) -> dict[str, FileHolder]:
    return {key: FileHolder(filename=path) for key, path in paths.items()}


_COMPRESSED = tuple(ext for ext in ImageOpener.compress_ext_map if ext)


def _raw_header_repaired(klass: type, file_map: dict[str, FileHolder], loaded: Any) -> bool:
    """True when nibabel's header repairs on load changed what the tool reads.

    The raw header is parsed with ``check=False`` and normalised the way the image
    constructor normalises every header (offset and scaling reset), then compared
    byte for byte with the header nibabel loaded. Not through the constructor itself:
    it copies the header with ``from_header``, whose ``check_fix`` repairs it again.
    """
    header_holder, _ = klass._get_fileholders(file_map)
    with header_holder.get_prepare_fileobj(mode='rb') as fobj:
        raw = klass.header_class.from_fileobj(fobj, check=False)
    raw.set_data_offset(0)
    raw.set_slope_inter(None, None)
    want = snapshot(loaded)
    return (header_bytes(raw), extension_bytes(raw)) != (want.header, want.extensions)


@singledispatch
def header_key(img: Any, paths: dict[str, str]) -> bytes | None:
    """The bytes of the image's files that hold its header, read again at every check.

    A header can be rewritten through a shared memory map without moving the file's
    size, mtime or ctime, so no memo of what a header says is keyed by identity alone:
    the small part of the files holding it is re-read each time and keys the memo.
    None for formats whose header cannot be re-read cheaply (MINC: NetCDF or HDF5
    metadata); for those the identity alone keys the memo (a documented limit).
    """
    return None


@header_key.register
def _(img: AnalyzeImage, paths: dict[str, str]) -> bytes:
    # the raw header and extensions, as a tool reads them (no repairs), and the .mat
    pinned = _Pinned.read(paths)
    return b'missing' if pinned is None else pinned.key


@header_key.register
def _(img: MGHImage, paths: dict[str, str]) -> bytes:
    path = paths['image']
    if path.endswith(('.mgz', '.gz')):  # the footer would need the whole stream
        with opened(path) as fobj:
            return fobj.read(img.header_class._hdrdtype.itemsize)
    with open(path, 'rb', opener=regular_opener) as fobj:
        return header_bytes(img.header_class.from_fileobj(fobj))  # header and footer


@header_key.register(PARRECImage)
@header_key.register(AFNIImage)
def _(img: Any, paths: dict[str, str]) -> bytes:
    # PAR and HEAD files are small text files: all of them
    return _whole_file(paths['header'])


@header_key.register
def _(img: Cifti2Image, paths: dict[str, str]) -> bytes:
    with opened(paths['image']) as fobj:
        raw = Nifti2Header.from_fileobj(fobj, check=False)
    return header_bytes(raw) + extension_bytes(raw)  # the CIFTI XML is an extension


_NIFTI_SIZES = {348: (108, 'f4'), 540: (168, 'i8')}  # sizeof_hdr: vox_offset's place and type
_MAX_HEADER = 1 << 24


class _Served(io.BytesIO):
    """Bytes read once from a file, served to nibabel's parser in the file's place.

    ``short`` is set when the parser asked for more than they hold: then they were not
    all it reads from the file (unless they are the ``whole`` file).
    """

    def __init__(self, data: bytes, whole: bool):
        super().__init__(data)
        self.whole = whole
        self.short = False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not self.whole and (size is None or size < 0 or len(data) < size):
            self.short = True
        return data


@dataclass(frozen=True)
class _Pinned:
    """The bytes a reference of a NIfTI/Analyze image is made of, read once.

    The header file's bytes that nibabel's header parser reads (decompressed; for a
    single file up to the data offset, for a ``.hdr`` all of it) and the ``.mat``'s
    (empty when missing, which nibabel treats alike). A reference is parsed from these
    very bytes and memoised under them (:attr:`key`): another thread or process
    rewriting a header in place and back while it is loaded (through a shared memory
    map, which moves no timestamp) cannot get a header it read filed under another.
    The voxels are not among them: a reference holds where and how they are read.
    """

    header: bytes
    whole: bool
    mat: bytes | None
    key: bytes
    header_path: str
    mat_path: str | None

    @classmethod
    def read(cls, paths: dict[str, str]) -> _Pinned | None:
        """None when the header file is missing or its header cannot be bounded."""
        header_path = paths.get('header', paths['image'])
        try:
            header, whole = _header_file_bytes(header_path, header_path == paths['image'])
        except (FileNotFoundError, _Unbounded):
            return None
        mat = None
        if 'mat' in paths:
            try:  # the file's own bytes: never a sentinel a file could hold
                with open(paths['mat'], 'rb', opener=regular_opener) as fobj:
                    mat = fobj.read()
            except FileNotFoundError:
                mat = b''  # nibabel reads a missing .mat as an empty one: no .mat
        key = b'\0'.join([header] + ([] if mat is None else [b'mat', mat]))
        return cls(header, whole, mat, key, header_path, paths.get('mat'))

    def agrees(self, files: tuple) -> bool:
        """True when ``files`` (a files' side, see :mod:`.recheck`) holds these bytes.

        A remembered verdict re-reads the files' side: it must be the side of the very
        bytes the reference it was reached with was made from.
        """
        for path, ident, length, data in files:
            if path == self.mat_path:
                if data != self.mat and not (ident is None and self.mat == b''):
                    return False
            elif path == self.header_path:
                if path.endswith(_COMPRESSED):
                    try:
                        data = zlib.decompressobj(wbits=31).decompress(data, len(self.header))
                    except zlib.error:
                        return False
                if length >= 0 and not self.whole:
                    data = data[: len(self.header)]
                if data != self.header:
                    return False
        return True

    def file_map(self, paths: dict[str, str]) -> tuple[dict[str, FileHolder], list[_Served]]:
        """A file map serving these bytes for the header (and ``.mat``), and the servers."""
        file_map = _fresh_file_map(paths)
        served = [_Served(self.header, self.whole)]
        file_map['header' if 'header' in paths else 'image'] = FileHolder(
            filename=paths.get('header', paths['image']), fileobj=served[0]
        )
        if self.mat is not None:
            served.append(_Served(self.mat, True))
            file_map['mat'] = FileHolder(filename=paths['mat'], fileobj=served[-1])
        return file_map, served


class _Unbounded(Exception):
    """Where a header ends cannot be told from its first bytes, and the file is big."""


def _header_file_bytes(path: str, single: bool) -> tuple[bytes, bool]:
    """(the bytes of ``path`` nibabel's header parser reads, whether they are all of it)."""
    with opened(path) as fobj:
        if not single:
            return fobj.read(), True  # a .hdr holds the header and nothing else
        head = fobj.read(544)
        end = _parsed_length(head)
        if end is not None:
            return (head + fobj.read(max(0, end - len(head))))[:end], False
        rest = fobj.read(_MAX_HEADER)
        if len(head) + len(rest) >= _MAX_HEADER:
            raise _Unbounded(path)
        return head + rest, True


def _parsed_length(head: bytes) -> int | None:
    """How many bytes a NIfTI single file's header parser reads, from its first bytes;
    None when not a NIfTI single file or its data offset is invalid."""
    for order in '<>':
        size = int(np.frombuffer(head[:4], order + 'i4')[0]) if len(head) >= 4 else 0
        if size in _NIFTI_SIZES and len(head) >= size + 4:
            if head[size : size + 1] == b'\x00':
                return size + 4  # no extensions: the parser stops after the extender
            where, kind = _NIFTI_SIZES[size]
            offset = float(np.frombuffer(head, order + kind, count=1, offset=where)[0])
            if np.isfinite(offset) and size + 4 <= offset <= _MAX_HEADER:
                return int(offset)
            return None
    return None


def _load_reference(klass: type, paths: dict[str, str]) -> tuple[Snapshot, bool, _Pinned | None]:
    """The snapshot of a default load of ``paths``, whether nibabel repaired its header on
    load, and for a NIfTI/Analyze image the bytes it was made from (:class:`_Pinned`), if
    pinned. Files are read through descriptors the core opened
    (:func:`~.opening.opened_file_map`)."""
    if issubclass(klass, AnalyzeImage):
        pinned = _Pinned.read(paths)
        if pinned is not None:
            file_map, served = pinned.file_map(paths)
            repairs, repair_served = pinned.file_map(paths)
            try:
                fresh = klass.from_file_map(file_map)
                repaired = _raw_header_repaired(klass, repairs, fresh)
            except Exception:
                if not any(s.short for s in served + repair_served):
                    raise
            else:
                if not any(s.short for s in served + repair_served):
                    if 'header' not in paths:  # its voxels are read from the file by name
                        fresh._dataobj = klass.ImageArrayProxy(
                            paths['image'], fresh._load_cache['header']
                        )
                    return snapshot(fresh), repaired, pinned
        # the parser reads more than was pinned: load it from the files, unpinned
    with load_opened(klass, paths) as fresh:  # never opened by name (see .opening)
        snap = snapshot(fresh)
        if not issubclass(klass, AnalyzeImage):
            return snap, False, None
        with opened_file_map(klass, paths) as repairs:
            return snap, _raw_header_repaired(klass, repairs, fresh), None


def _key_decides(img: Any, paths: dict[str, str]) -> bool:
    """True when :func:`header_key` holds every byte a reference is made of.

    Not so for a ``.mgz`` (its footer is not re-read) or a format without a key.
    """
    if isinstance(img, MGHImage):
        return not paths['image'].endswith(('.mgz', '.gz'))
    return isinstance(img, (AnalyzeImage, PARRECImage, AFNIImage, Cifti2Image))


def _whole_file(path: str) -> bytes:
    try:
        with open(path, 'rb', opener=regular_opener) as fobj:
            return fobj.read()
    except FileNotFoundError:
        return b'missing'


def reference(img: Any, paths: dict[str, str], ids: dict[str, FileId | None]) -> Reference:
    """What a default load of ``img``'s files makes of them now, memoised.

    The memo is keyed by the files' identities and by :func:`header_key`, re-read at
    every call. A reference is a *default* load: load options change what an image
    holds, and a tool reading the path sees the default (:data:`LOAD_OPTIONS`).
    """
    klass = type(img)
    head = header_key(img, paths)
    key = (klass, tuple(sorted(paths.items())), tuple(sorted(ids.items())), head)
    hit = _references.get(key)
    used = _used.get()
    if hit is not None:
        if used is not None:
            used.append(hit)
        return hit
    snap, repaired, pinned = _load_reference(klass, paths)
    ref = Reference(snap, repaired, pinned)
    if used is not None:
        used.append(ref)
    if pinned is not None:  # made from the very bytes it is keyed by: read them once
        key, head = (*key[:3], pinned.key), pinned.key
    unchanged = file_identities(paths) == ids and header_key(img, paths) == head
    # a NIfTI/Analyze reference's header bytes decide it only when it was made from them
    decided = head is not None and _key_decides(img, paths)
    decided = decided and (pinned is not None or not issubclass(klass, AnalyzeImage))
    if unchanged and (decided or all_settled(ids.values())):
        # unchanged while read; and either the header bytes decide the reference, or
        # the identities have settled (no same-size rewrite can hide in a clock tick)
        _references.put(key, ref)
    return ref


def _file_data_digest(klass: type, paths: dict[str, str]) -> str:
    with load_opened(klass, paths) as fresh:
        return data_digest(fresh.dataobj, None, 'F')


@singledispatch
def cleanliness_rule(img: Any, record: Record | None) -> str | None:
    """Return None when ``img`` corresponds exactly to its file(s), else why not.

    The default, for any class without a registered rule, is dirty.

    Examples
    --------
    >>> from nibabel.spatialimages import SpatialImage
    >>> import numpy as np
    >>> cleanliness_rule(SpatialImage(np.zeros((2, 2, 2)), np.eye(4)), None)
    'no cleanliness rule for SpatialImage images'
    """
    return f'no cleanliness rule for {type(img).__name__} images'


@cleanliness_rule.register
def _(img: GiftiImage, record: Record | None) -> str | None:
    return 'GIFTI images keep no link to their file once loaded'


def _compare_against_file(img: Any, record: Record | None) -> str | None:
    """The rule shared by every format: compare with the file(s) as nibabel reads them."""
    binding = binding_of(img)
    if binding is None:
        return 'image has no file'
    record = record_of(img)  # binding_of may have just made it
    paths = binding.paths
    ids = file_identities(paths)
    main_key = type(img).files_types[0][0]
    if ids.get(main_key) is None:
        return f'file {paths[main_key]} does not exist'
    replaced = binding.replaced(ids)
    if replaced is not None:
        return f'{replaced} is no longer the file the image was loaded from (replaced or moved)'
    irregular = _irregular_file(paths)
    if irregular is not None:
        return irregular
    cut = truncation(img)  # a header that still matches, over voxels that are gone
    if cut is not None:
        return cut
    if record is not None and record.baseline is None and record.kwargs:
        reason = load_options_reason(record.kwargs)
        if reason is not None:
            return reason
    current = snapshot(img)
    if current.header is None:
        return f'no cleanliness rule for {type(img.header).__name__} headers'
    if record is not None and record.baseline is not None:
        reason = _compare_with_baseline(img, record, current, ids)
    else:
        reason = _compare_with_reference(img, record, current, paths, ids)
        if reason is None:
            try:
                edited = edited_cache(img) is not None
            except Exception as err:  # the file's data cannot be read: cannot prove clean
                return f'file data cannot be read now ({type(err).__name__}: {err})'
            if edited:
                reason = 'data edited after get_fdata()'
    if reason is None:
        reason = _held_file_replaced(current)
    changed = record is not None and record.ids and record.ids != ids
    if reason is not None and changed and not reason.startswith('file changed on disk'):
        when = 'marked clean' if record.baseline is not None else 'load'
        return f'file changed on disk since {when} ({reason})'
    return reason


def _irregular_file(paths: dict[str, str]) -> str | None:
    """Why the image's files cannot be read, when one is no regular file (a FIFO would
    block nibabel's ``open`` for ever, ``/dev/zero`` never ends): checked before any of
    them is opened by name. The core's own reads open with ``O_NONBLOCK`` and check what
    they opened (:func:`~nipype_nibtrack.fileid.open_regular`)."""
    for path in paths.values():
        refusal = not_regular(path)
        if refusal is not None:
            return f'{refusal.strerror}: no image can be read from it'
    return None


def _compare_with_reference(
    img: Any, record: Record | None, current: Snapshot, paths: dict[str, str], ids: dict
) -> str | None:
    try:
        ref = reference(img, paths, ids)
    except Exception as err:  # any failure to read the file means we cannot prove clean
        return f'file cannot be read by nibabel now ({type(err).__name__}: {err})'
    if ref.repaired:
        return "nibabel repaired the file's header on load; a tool reads the unrepaired one"
    want = ref.snapshot
    if current.header != want.header:
        return "header differs from the file's"
    if current.extensions != want.extensions:
        return "NIfTI extensions differ from the file's"
    if current.affine != want.affine:
        return "affine differs from the file's"
    if current.alias is not None:
        return f'data dtype alias {current.alias!r} is only resolved when the image is written'
    if current.proxy is None:
        if data_digest(img.dataobj, None, 'F') != _file_data_digest(type(img), paths):
            return "data is an in-memory array that differs from the file's data"
        return None
    if current.proxy.in_memory:
        return 'data is read from an in-memory file object, not from a file'
    if want.proxy is None or not current.proxy.same_source(want.proxy):
        if want.proxy is not None and current.proxy.path != want.proxy.path:
            return f"data is read from {current.proxy.path}, not from the image's file"
        return "data read parameters (shape, dtype, offset or scaling) differ from the file's"
    if current.proxy.path is None and current.proxy.fd is None:
        # Data mapped at load (MINC1): only a load record proves it is this file's data
        proven = record is not None and record.holds_dataobj(img.dataobj) and record.ids == ids
        if not proven:
            return (
                'cannot prove the data still come from the file at its path; '
                'load it with nipype_nibtrack.load'
            )
    return None


def _compare_with_baseline(img: Any, record: Record, current: Snapshot, ids: dict) -> str | None:
    base = record.baseline
    if record.ids != ids:
        return 'file changed on disk since marked clean'
    if record.file_bytes is not None:
        # marked while the files' timestamps were fresh: identities alone cannot tell
        # a same-size rewrite within the same clock tick, so compare the bytes
        if files_digest(file_paths(img) or {}) != record.file_bytes:
            return 'file changed on disk since marked clean'
        if all_settled(ids.values()):
            record.file_bytes = None  # verified after settling: identities suffice now
    if current.header != base.header or current.extensions != base.extensions:
        return 'header changed since marked clean'
    if current.affine != base.affine:
        return 'affine changed since marked clean'
    if current.alias != base.alias:
        return 'data dtype alias changed since marked clean'
    if (current.proxy is None) != (base.proxy is None) or (
        current.proxy is not None and not current.proxy.same_source(base.proxy)
    ):
        return 'data object reads another file or other parameters since marked clean'
    if not record.holds_dataobj(img.dataobj):
        return 'data object replaced since marked clean'
    for name in ('_dataobj', '_fdata_cache', '_data_cache'):
        value = getattr(img, name, None)
        if name == '_dataobj' and current.proxy is not None:
            continue
        if value is None:
            continue
        if name in record.caches:
            edited = array_digest(value, 'F') != record.caches[name]
        else:  # filled after mark_clean: it must equal what the data object reads
            edited = array_digest(value, 'F') != data_digest(img.dataobj, value.dtype, 'F')
        if edited:
            return 'data edited since marked clean'
    return None


def _held_file_replaced(current: Snapshot) -> str | None:
    proxy = current.proxy
    if proxy is None or proxy.fd is None:
        return None
    try:
        held = fd_id(proxy.fd)
    except OSError:
        return 'the file the image holds open was closed'
    if proxy.path is None or not held.same_file(path_id(proxy.path)):
        return 'file was replaced on disk while the image holds it open'
    return None


for _klass in (AnalyzeImage, MGHImage, Minc1Image, PARRECImage, AFNIImage, Cifti2Image):
    cleanliness_rule.register(_klass, _compare_against_file)


def compares_with_file(klass: type) -> bool:
    """True when images of ``klass`` are judged by the package's own rule (comparing
    them with their files), not by one registered by a user.

    Only those are checked on a private copy (:mod:`.frozen`) and have answers
    remembered: a user's rule may look the very object up (in a table of its own), and
    the copy is not that object.

    >>> import nibabel as nib
    >>> compares_with_file(nib.Nifti1Image), compares_with_file(nib.GiftiImage)
    (True, False)
    """
    return cleanliness_rule.dispatch(klass) is _compare_against_file


_new = tuple.__new__  # a verdict without NamedTuple's Python-level __new__ (the recheck path)


class Cleanliness(NamedTuple):  # a tuple: built in a fraction of a frozen dataclass's time
    """A cleanliness verdict and the identities of the files it was reached with.

    ``reason`` is None when clean; ``ids`` maps every file the image depends on
    (:func:`~nipype_nibtrack.provenance.source_files`) to its identity during the check.
    """

    reason: str | None
    ids: Mapping[str, FileId | None]
    handed: str | None = None  # the path to hand out for a clean image, when known
    pending: Memo | None = None  # a remembered verdict whose files still_holds() checks

    def still_holds(self) -> bool:
        """True when none of the files changed since the check: one ``stat`` per file.

        A verdict given with ``defer_files`` (see :func:`cleanliness`) has not looked
        at its files yet: this checks them as the check would have, their identities
        and the bytes holding their headers (one ``open``, ``fstat`` and ``pread`` each).

        Examples
        --------
        >>> import os, shutil, tempfile, nibabel as nib
        >>> from nibabel.testing import data_path
        >>> path = shutil.copy(os.path.join(data_path, 'anatomical.nii'), tempfile.mkdtemp())
        >>> verdict = cleanliness(nib.load(path))
        >>> verdict.reason is None, verdict.still_holds()
        (True, True)
        >>> os.utime(path, ns=(0, 0))
        >>> verdict.still_holds()
        False
        """
        if self.pending is not None:
            return files_unchanged(self.pending.files)
        for path, ident in self.ids.items():  # inline: this is the hand-out's one stat
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                if ident is not None:
                    return False
                continue
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != ident:
                return False
        return True


def cleanliness(img: Any, *, defer_files: bool = False) -> Cleanliness:
    """Check ``img`` against its file(s) and say which file identities the verdict holds for.

    A file that changes while it is checked is checked again, so the verdict always
    belongs to one state of the files; :meth:`Cleanliness.still_holds` tells later, for
    a ``stat`` per file, whether that state is still the one on disk.

    Parameters
    ----------
    img : nibabel image
    defer_files : bool
        For a caller that calls :meth:`~Cleanliness.still_holds` before it uses a clean
        verdict (:func:`~nipype_nibtrack.resolve.resolve` does, just before it hands
        the path out). A remembered clean verdict is then given after checking the
        image alone, with ``pending`` set: its files are checked by ``still_holds``,
        once, instead of by the check and again by a ``stat``. A clean verdict with
        ``pending`` set means nothing until ``still_holds()`` returned True.

    Returns
    -------
    Cleanliness

    Examples
    --------
    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = os.path.join(data_path, 'anatomical.nii')
    >>> verdict = cleanliness(nib.load(path))
    >>> verdict.reason is None, list(verdict.ids) == [path]
    (True, True)
    """
    if not isinstance(img, FileBasedImage):
        raise TypeError(
            f'expected a nibabel image, got {type(img).__name__}; '
            'load files with nibabel.load or nipype_nibtrack.load'
        )
    record = record_of(img)
    simple = compares_with_file(type(img))
    if simple and record is not None and not record.forced_dirty and record.verdict is not None:
        memo = record.verdict
        if defer_files:
            if image_key(img) == memo.image:  # the image's side; still_holds, the files'
                return _new(Cleanliness, (None, memo.ids, memo.handed, memo))
        else:
            ids = still_clean(img, memo)
            if ids is not None:  # nothing it rested on moved: a few system calls
                return _new(Cleanliness, (None, ids, memo.handed, None))
    # Checked on a private copy of the image, and remembered under the key read from that
    # copy: whatever another thread does to the image meanwhile (edit it, restore it),
    # the verdict filed is the one for the state it is filed under (see .frozen)
    frozen = freeze(img) if simple else None
    subject = img if frozen is None else frozen.image
    files = source_files(subject)
    for _ in range(3):
        memo = _memo(frozen)  # the files' side read before, compared after
        before = {path: path_id(path) for path in files}
        record = record_of(subject)
        used = _used.set([])  # the references the rule reaches its verdict with
        try:
            if record is not None and record.forced_dirty:
                reason = 'marked dirty by the user'
            else:
                reason = cleanliness_rule(subject, record)
            refs = _used.get()
        finally:
            _used.reset(used)
        after = {path: path_id(path) for path in files}
        if after == before:
            if frozen is not None and _learn(frozen, memo, reason, after, refs):
                return Cleanliness(reason, after, memo.handed)
            if frozen is not None and reason is None:  # the copy's own file, as checked
                main = frozen.record.binding.paths.get(type(img).files_types[0][0])
                return Cleanliness(reason, after, None if main is None else kernel_path(main))
            return Cleanliness(reason, after)
    return Cleanliness(f'file(s) {", ".join(files)} kept changing on disk while checked', after)


def _learn(frozen: Frozen, memo: Memo | None, reason: str | None, files: dict, refs: list) -> bool:
    """File what a check of ``frozen``'s copy learnt in the image's own record.

    True when a clean verdict is remembered (under ``memo``, whose image side was read
    from the very copy checked, and whose files' side holds the very bytes the
    references ``refs`` the verdict was reached with were made from); not while a
    ``mark_clean`` compares the files' bytes whole (fresh identities): a remembered
    verdict re-reads the headers only.
    """
    record, source = frozen.record, frozen.source
    if record.file_bytes is None:
        source.file_bytes = None  # verified after settling, for these very identities
    keep = reason is None and memo is not None and record.file_bytes is None
    keep = keep and all(ref.pinned is not None and ref.pinned.agrees(memo.files) for ref in refs)
    if keep and _memo(frozen) == memo and set(memo.files_paths()) == set(files):
        source.verdict = record.verdict = memo
        return True
    return False


def _memo(frozen: Frozen | None) -> Memo | None:
    if frozen is None:
        return None
    paths = frozen.record.binding.paths
    main = paths.get(type(frozen.image).files_types[0][0])
    # only when the path handed out is a path the recheck reads: through a '..' the
    # kernel's path is another name, which a moved folder can give to another file
    if main is None or kernel_path(main) != main:
        return None
    return memo_for(frozen.image, paths, main)


def dirty_reason(img: Any) -> str | None:
    """Why ``img`` differs from its file(s), or None when a tool would read exactly it.

    Parameters
    ----------
    img : nibabel image

    Returns
    -------
    str or None

    Examples
    --------
    >>> import os, shutil, tempfile, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = shutil.copy(os.path.join(data_path, 'anatomical.nii'), tempfile.mkdtemp())
    >>> img = nib.load(path)
    >>> dirty_reason(img) is None
    True
    >>> img.affine[0, 0] += 1e-9
    >>> dirty_reason(img)
    "affine differs from the file's"
    >>> dirty_reason(nib.Nifti1Image(img.dataobj, img.affine))
    'image has no file'
    """
    return cleanliness(img).reason


def is_dirty(img: Any) -> bool:
    """True unless a tool reading the image's file(s) now would see exactly ``img``.

    Examples
    --------
    >>> import os, shutil, tempfile, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = shutil.copy(os.path.join(data_path, 'anatomical.nii'), tempfile.mkdtemp())
    >>> img = nib.load(path)
    >>> is_dirty(img)
    False
    >>> img.get_fdata()[10, 10, 10] += 1
    >>> is_dirty(img)
    True
    """
    return dirty_reason(img) is not None
