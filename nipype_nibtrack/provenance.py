"""Provenance records kept beside images, and the user's overrides.

:func:`load` returns exactly what :func:`nibabel.load` returns and remembers, in a
weakly referenced record, the identity of the file(s) and the data object it loaded.
:func:`mark_clean` and :func:`mark_dirty` are the overrides from the nibabel design
note: the user declares what corresponds to the file.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import xxhash
from nibabel.filebasedimages import FileBasedImage

from .fileid import FileId, all_settled, path_id
from .snapshot import Snapshot, snapshot

__all__ = [
    'Record',
    'file_identities',
    'file_paths',
    'load',
    'mark_clean',
    'mark_dirty',
    'record_of',
    'source_files',
]


@dataclass
class Record:
    """What is known of an image beyond the image itself.

    ``ids`` are the identities of its files when it was loaded or marked clean,
    ``dataobj`` a weak reference to the data object it had then. ``baseline`` is the
    state the user declared clean (None unless :func:`mark_clean` was called), with
    ``caches``, the digests of its filled data caches at that moment, and
    ``file_bytes``, a digest of the files' bytes when their identities had not settled
    (a same-size rewrite within one clock tick would leave them unchanged).
    """

    kwargs: dict = field(default_factory=dict)
    ids: dict[str, FileId | None] = field(default_factory=dict)
    dataobj: Any = None
    baseline: Snapshot | None = None
    caches: dict[str, str] = field(default_factory=dict)
    forced_dirty: bool = False
    origin: str = 'load'
    file_bytes: str | None = None

    def holds_dataobj(self, dataobj: Any) -> bool:
        return self.dataobj is not None and self.dataobj() is dataobj


_records: dict[int, tuple[weakref.ref, Record]] = {}
_lock = threading.Lock()


def record_of(img: Any) -> Record | None:
    """The provenance record of ``img``, or None when it has none.

    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = os.path.join(data_path, 'anatomical.nii')
    >>> record_of(nib.load(path)) is None, record_of(load(path)).origin
    (True, 'load')
    """
    with _lock:
        entry = _records.get(id(img))
    if entry is None or entry[0]() is not img:
        return None
    return entry[1]


def _set_record(img: Any, record: Record) -> None:
    key = id(img)

    def forget(_ref: weakref.ref, key: int = key) -> None:
        with _lock:
            if _records.get(key, (None,))[0] is _ref:
                del _records[key]

    with _lock:
        _records[key] = (weakref.ref(img, forget), record)


def _weak(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def file_paths(img: Any) -> dict[str, str] | None:
    """Absolute paths of every file in the image's file map, or None if it has none.

    An image whose file map points at a file object (``BytesIO``, after ``to_bytes``)
    or lacks a name has no file a tool could read.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> file_paths(nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4))) is None
    True
    """
    paths = {}
    for key, holder in img.file_map.items():
        if holder.fileobj is not None or holder.filename is None:
            return None
        paths[key] = os.path.abspath(holder.filename)
    return paths or None


def source_files(img: Any) -> tuple[str, ...]:
    """Absolute paths of every file an image's content depends on.

    The files of its file map and the file its data object reads, which differ after
    ``set_filename``. Empty for an image held in memory only.

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
    if isinstance(name, str):
        files[os.path.abspath(name)] = None
    return tuple(files)


def file_identities(paths: dict[str, str]) -> dict[str, FileId | None]:
    """``stat`` identity of each path (None for a missing optional file).

    >>> ids = file_identities({'image': '/no/such.nii', 'here': '.'})
    >>> ids['image'] is None, ids['here'].size >= 0
    (True, True)
    """
    return {key: path_id(path) for key, path in paths.items()}


def load(path: str | os.PathLike, **kwargs: Any) -> Any:
    """Load an image with :func:`nibabel.load` and keep its provenance.

    Parameters
    ----------
    path : str or os.PathLike
    **kwargs
        Passed to :func:`nibabel.load`.

    Returns
    -------
    image
        Exactly what :func:`nibabel.load` returns; no subclass, nothing patched.

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
    img = nib.load(path, **kwargs)
    paths = file_paths(img) or {}
    _set_record(
        img,
        Record(
            kwargs={k: v for k, v in kwargs.items() if k not in ('mmap', 'keep_file_open')},
            ids=file_identities(paths),
            # GIFTI images have no dataobj
            dataobj=_weak(getattr(img, 'dataobj', None)),
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
        When the image has no file, or its file does not exist.

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
    main = os.path.abspath(img.get_filename())
    if ids.get(_key_of(paths, main)) is None:
        raise ValueError(f'cannot mark this {type(img).__name__} clean: {main} does not exist.')
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
        with open(path, 'rb') as fobj:
            while block := fobj.read(1 << 24):
                hasher.update(block)
    return hasher.hexdigest()


def _key_of(paths: dict[str, str], path: str) -> str | None:
    return next((key for key, value in paths.items() if value == path), None)
