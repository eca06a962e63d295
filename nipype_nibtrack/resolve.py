"""Turn an image (or a path) into a file name a command-line tool can read."""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from nibabel.filebasedimages import FileBasedImage
from nibabel.filename_parser import splitext_addext
from nibabel.spatialimages import HeaderDataError

from .digest import READ_ERRORS, _Memo, image_digest
from .export import ContentChanged, Plan, _Refused, choose_plan, export_image
from .fileid import absolute, kernel_path, not_regular, path_id
from .provenance import bound_source, load, main_path, source_files, truncation
from .rules import cleanliness
from .snapshot import proxy_spec
from .store import ENV_VAR, Store, get_store

__all__ = [
    'ImageReadError',
    'Resolution',
    'as_filename',
    'check_image',
    'image_label',
    'load_reference',
    'normalise_formats',
    'resolve',
]

logger = logging.getLogger('nipype_nibtrack')

# Store names are ASCII: one byte per character, safe in any shell and any tool
_UNSAFE = re.compile(r'[^A-Za-z0-9._+-]+')
_STEM_MAX = 80  # with the longest extension and the manifest's '.json', far below 255 bytes
_ATTEMPTS = 3
# (image digest, accepted formats) -> the Target its content is written as
_targets = _Memo(4096)
_READ_ERRORS = READ_ERRORS


class ImageReadError(OSError):
    """An image's voxel data cannot be read from its file; the message names the file."""


class _SourceChanged(Exception):
    """A file the image depends on, or the image itself, changed while it was resolved.

    ``image`` says which: the final error must blame the right one (an image edited by
    another thread while it is written is not a file "changing on disk").
    """

    def __init__(self, image: bool = False):
        super().__init__()
        self.image = image


@dataclass(frozen=True)
class Resolution:
    """How a value became a file name.

    ``action`` is ``'path'`` (a path was given), ``'original'`` (a clean image, handed
    over by its own file), ``'written'`` (written to the store now) or ``'reused'``
    (found in the store); ``reason`` says why an image was not handed over as is.
    """

    path: str
    action: Literal['path', 'original', 'written', 'reused']
    reason: str | None = None

    def describe(self) -> str:
        """One line for logs.

        >>> Resolution('/s/ab/brain.nii', 'written', 'image has no file').describe()
        'written to the store as /s/ab/brain.nii (image has no file)'
        """
        if self.action in ('path', 'original'):
            return f'passed by its original path {self.path}'
        where = 'written to the store' if self.action == 'written' else 'reused from the store'
        return f'{where} as {self.path} ({self.reason})'


def normalise_formats(formats: Iterable[str] | str | None) -> tuple[str, ...] | None:
    """Lower-case extensions with a leading dot, in the caller's order.

    >>> normalise_formats(['nii.gz', ' .NII'])
    ('.nii.gz', '.nii')
    >>> normalise_formats(None) is None
    True
    """
    if formats is None:
        return None
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    try:
        return _normalised(formats)  # every resolution of a trait asks again
    except TypeError:  # an unhashable entry: not a name, said by _normalise
        return _normalise(formats)


def _normalise(formats: tuple) -> tuple[str, ...]:
    names = [f.strip() for f in formats]  # ' .nii' from a config file is '.nii'
    out = tuple(('' if f.startswith('.') else '.') + f.lower() for f in names if f)
    if not out:
        raise ValueError('formats must name at least one extension, such as ".nii"')
    return out


_normalised = functools.lru_cache(maxsize=256)(_normalise)


@functools.lru_cache(maxsize=4096)  # a pure function of the name: asked at every hand-out
def _extension(path: str) -> str:
    _, ext, addext = splitext_addext(path)
    return (ext + addext).lower()


def _stem(img: Any) -> str:
    """The source file's stem made safe for any file system, else ``image``.

    >>> import numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4))
    >>> _stem(img)
    'image'
    >>> img.set_filename('/data/sub 01/..mean func;rm -rf.nii.gz')
    >>> _stem(img)
    'mean_func_rm_-rf'
    """
    name = img.get_filename() if isinstance(img, FileBasedImage) else None
    if not name:
        return 'image'
    root, _, _ = splitext_addext(os.path.basename(name))
    stem = _UNSAFE.sub('_', root).strip('._-')[:_STEM_MAX].strip('._-')
    return stem or 'image'


def _accepted(path: str, formats: tuple[str, ...] | None) -> bool:
    return formats is None or _extension(path) in formats


def _check_image(img: Any) -> None:
    if not isinstance(img, FileBasedImage):
        raise TypeError(
            f'expected a nibabel image or an existing file path, got {type(img).__name__}: '
            f'{img!r:.80}. Load files with nibabel.load or nipype_nibtrack.load'
        )
    dataobj = getattr(img, 'dataobj', None)
    if isinstance(getattr(dataobj, 'file_like', None), str):
        return  # reads a file by name
    spec = proxy_spec(dataobj) if dataobj is not None else None
    if spec is not None and spec.in_memory:
        raise ValueError(
            f'this {type(img).__name__} reads its data from an in-memory file object '
            f'({type(getattr(dataobj, "file_like", None)).__name__}), which other processes '
            'cannot read. Save it to a file first, or detach it with '
            'img = type(img)(np.asanyarray(img.dataobj), img.affine, img.header)'
        )


def check_image(img: Any, formats: Iterable[str] | str | None = None) -> None:
    """Raise if ``img`` cannot become a file that a reader of ``formats`` accepts.

    What an input that takes images checks when it is given one, before anything runs:
    exactly what resolving it would refuse (a clean image in an accepted format is
    handed over as is; any other is planned as it would be written, see
    :func:`~nipype_nibtrack.export.choose_plan`).

    Raises
    ------
    TypeError
        ``img`` is not a nibabel image.
    ValueError
        Its data live in an in-memory file object, or no accepted format can hold it.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    >>> check_image(img, ['.nii.gz'])
    >>> check_image(img, ['.txt'])
    Traceback (most recent call last):
    ...
    ValueError: cannot write this Nifti1Image of float32 data exactly in any of the accepted ...
    """
    _check_image(img)
    accepted = normalise_formats(formats)
    if cleanliness(img).reason is None and _accepted(img.get_filename(), accepted):
        return  # handed over by its own file: nothing is written
    for _ in range(_ATTEMPTS - 1):
        try:
            choose_plan(img, accepted)
            return
        except ContentChanged:  # another thread edits its header: look again
            continue
    choose_plan(img, accepted)


def image_label(img: Any) -> str:
    """A short name that follows an image's content: its path when clean, else its
    file stem and a content digest (for folder names, which must not collide).

    >>> import numpy as np, nibabel as nib
    >>> a = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    >>> b = nib.Nifti1Image(np.ones((2, 2, 2), 'f4'), np.eye(4))
    >>> image_label(a) != image_label(b), image_label(a).startswith('image_')
    (True, True)
    """
    verdict = cleanliness(img)
    if verdict.reason is None:
        return verdict.handed or kernel_path(main_path(img))
    _refuse_unknown_voxels(img, verdict.reason)  # never a label from another file's data
    try:
        digest = image_digest(img)
    except _READ_ERRORS as err:
        if not source_files(img):
            raise
        raise _read_error(img, err) from err
    return f'{_stem(img)}_{digest[:16]}'


def _existing_file(value: str | os.PathLike) -> str:
    """The absolute path of an existing file, or a clear error saying what is wrong.

    >>> _existing_file('/')
    Traceback (most recent call last):
    ...
    IsADirectoryError: [Errno 21] / is a directory, not an image file (given '/'); ...
    """
    raw = os.fspath(value)
    raw = os.fsdecode(raw) if isinstance(raw, bytes) else raw
    if not raw:
        raise ValueError('an empty string is not a file name; pass an existing file or an image')
    if '\0' in raw:
        raise ValueError(f'{raw!r} contains a NUL character and cannot name a file')
    path = kernel_path(raw)  # never folded as text: the kernel follows the links
    given = f'(given {raw!r})'
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            target = os.path.join(os.path.dirname(path), os.readlink(path))
            raise FileNotFoundError(
                errno.ENOENT,
                f'{path} is a broken symbolic link: its target {target} '
                f'does not exist {given}; fix the link or pass the image file itself',
            ) from None
        raise FileNotFoundError(
            errno.ENOENT, f'{path} does not exist {given}; pass an existing file or an image'
        ) from None
    except OSError as err:  # a symlink loop, a folder we may not enter
        raise type(err)(err.errno, f'{path} cannot be used: {err.strerror} {given}') from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(
            errno.EISDIR,
            f'{path} is a directory, not an image file {given}; pass the image file inside it',
        )
    return path


def _read_error(img: Any, err: BaseException) -> ImageReadError:
    """A clear error for voxel data that cannot be read, naming the file and the cause."""
    files = source_files(img)
    spec = proxy_spec(getattr(img, 'dataobj', None))
    source = spec.path if spec is not None and spec.path else (files[0] if files else None)
    cause = ' '.join(str(err).split()) or type(err).__name__
    if source is not None and path_id(source) is None:
        what = f'{source} no longer exists (deleted or moved since the image was loaded)'
    else:
        what = f'{source} cannot be read ({type(err).__name__}: {cause})'
        if isinstance(err, EOFError) or 'Expected' in cause:
            what += ': it is shorter than its header says (truncated or damaged)'
    return ImageReadError(
        getattr(err, 'errno', None) or errno.EIO,
        f'cannot read the voxel data of this {type(img).__name__}: {what}. Restore the '
        'file, or load the image again from a good copy',
    )


def _refuse_unknown_voxels(img: Any, reason: str) -> None:
    """Raise when the voxels a dirty image holds are in no file or array at hand.

    A proxy re-opens its file by name at every access. When that name now leads to
    another file than the one the image was tied to (a ``chdir`` with a relative name,
    a replaced file, a re-pointed link), reading it would hand out the other file's
    voxels as this image's. Unless the image holds its data in memory, refuse.
    """
    why = bound_source(img) or _irregular_source(img) or truncation(img)
    if why is None or any(
        isinstance(getattr(img, name, None), np.ndarray)
        for name in ('_fdata_cache', '_data_cache')
    ):
        return
    raise ImageReadError(
        errno.ESTALE,
        f'cannot tell the voxels of this {type(img).__name__}: {why}, and the image holds '
        f'no copy of its data in memory ({reason}). Load the image again from the file '
        'it should hold (with an absolute path), or go back to the directory it was '
        'loaded from',
    )


def _irregular_source(img: Any) -> str | None:
    """Why the file a proxy reads by name cannot hold its voxels: a directory, FIFO,
    socket or device at that name (a FIFO would block the read for ever), which an
    inode number reused by the file system can hide from :func:`bound_source`."""
    name = getattr(getattr(img, 'dataobj', None), 'file_like', None)
    if not isinstance(name, str):
        return None
    refusal = not_regular(absolute(name))
    return None if refusal is None else refusal.strerror


@functools.lru_cache(maxsize=4096)
def _original(path: str) -> Resolution:
    """The resolution of a clean image handed over as ``path`` (immutable, so shared)."""
    return Resolution(path, 'original')


def _identities(files: tuple[str, ...]) -> dict:
    return {path: path_id(path) for path in files}


def _resolve_image(img: Any, accepted: tuple[str, ...] | None, store: Store | None) -> Resolution:
    # A remembered clean verdict comes with its files unchecked: still_holds() reads
    # their identities and header bytes once, just before the hand-out, instead of the
    # check reading them and a stat per file following
    verdict = cleanliness(img, defer_files=True)
    if verdict.pending is not None:
        own = verdict.handed
        if (accepted is None or _accepted(own, accepted)) and verdict.still_holds():
            return _original(own)
        verdict = cleanliness(img)  # the memo no longer holds, or another format is asked
    reason = verdict.reason
    if reason is None:
        own = verdict.handed
        if own is None:
            main = main_path(img)
            if main not in verdict.ids:  # renamed by another thread since it was checked
                raise _SourceChanged(image=True)
            own = kernel_path(main)
        if accepted is None or _accepted(own, accepted):
            # The file may have changed since the check: re-check for a stat per file
            if not verdict.still_holds():
                raise _SourceChanged
            return _original(own)
        reason = f'format {_extension(own)} is not among the accepted {list(accepted)}'
    _refuse_unknown_voxels(img, reason)
    files = source_files(img)
    before = _identities(files)
    try:
        digest = image_digest(img)
    except _READ_ERRORS as err:
        if not files:
            raise
        if _identities(files) != before:
            raise _SourceChanged from err
        raise _read_error(img, err) from err
    if _identities(files) != before:  # the digest may mix two versions of the file
        raise _SourceChanged
    # the default store is looked up only now: clean images never need one
    store = store or get_store()
    # The digest decides the content, so the target it was planned for: a rerun finds
    # its entry without planning the write again
    known = _targets.get((digest, accepted))
    if known is not None:
        name, handed = _entry_names(_stem(img), known.ext)
        found = store.lookup(digest, name)
        if found is not None:
            resolution = Resolution(str(found.with_name(handed)), 'reused', reason)
            logger.debug('%s', resolution.describe())
            return resolution
    try:
        chosen = choose_plan(img, accepted)
    except ContentChanged as err:
        raise _SourceChanged(image=True) from err
    _targets.put((digest, accepted), chosen.target)
    name, handed = _entry_names(_stem(img), chosen.target.ext)
    path, written = store.put(
        digest, name, lambda tmp: _write(img, chosen, tmp, digest, files, before)
    )
    path = path.with_name(handed)
    resolution = Resolution(str(path), 'written' if written else 'reused', reason)
    logger.debug('%s', resolution.describe())
    return resolution


def _entry_names(stem: str, ext: str) -> tuple[str, str]:
    """(name the entry is stored under, name handed out) for a file of extension ``ext``.

    A NIfTI pair is one entry whatever half is asked for: it is stored under its image
    file, and the header is handed out beside it, so that asking for ``.hdr`` after
    ``.img`` reuses the entry instead of seeing an entry without a manifest.

    >>> _entry_names('brain', '.hdr'), _entry_names('brain', '.nii')
    (('brain.img', 'brain.hdr'), ('brain.nii', 'brain.nii'))
    """
    image = {'.hdr': '.img', '.hdr.gz': '.img.gz'}.get(ext, ext)
    return stem + image, stem + ext


def _write(
    img: Any, chosen: Plan, tmp: str, digest: str, files: tuple[str, ...], before: dict
) -> dict:
    """Export ``img``; refuse the result unless it is what ``digest`` describes.

    Voxels written by :func:`~nipype_nibtrack.export.write_plan` are hashed as they are
    written: an image that changed since it was digested (another thread editing its
    array or header, its file rewritten) yields another digest, and the entry is
    discarded and resolved again. The plan is the one chosen for ``digest``: its header
    was made and its meta hashed from the image as it was then, so what is written is
    what that digest describes or the digests differ. Returns the xxh3 of the files'
    bytes (whole or by parts), for the store's manifest.
    """
    try:
        # The plan made for ``digest`` (its header, its meta hash): planning again would
        # cost as much as a tenth of the write, and any change since shows below
        written = export_image(img, chosen.target, tmp, decided=chosen)
    except (ContentChanged, _Refused) as err:
        # a value no longer survives the planned dtype: the image changed since
        raise _SourceChanged(image=True) from err
    except HeaderDataError as err:
        raise ValueError(
            f'nibabel cannot write this {type(img).__name__} as {chosen.target.ext}: {err}'
        ) from err
    except Exception as err:
        if _identities(files) != before:
            raise _SourceChanged from err
        raise
    if _identities(files) != before:  # what was written may not be what was digested
        raise _SourceChanged
    # GIFTI, CIFTI-2: nibabel wrote them from the object; digest it again
    try:
        got = image_digest(img) if written is None else written.digest
    except _READ_ERRORS as err:  # its file read again, and no longer readable
        if _identities(files) != before:
            raise _SourceChanged from err
        raise _read_error(img, err) from err
    if got != digest:  # the files did not change (checked above): the image did
        raise _SourceChanged(image=True)
    return {} if written is None else written.files


def resolve(
    value: Any, *, formats: Iterable[str] | str | None = None, store: Store | None = None
) -> Resolution:
    """Resolve a path or an image to an absolute file name, saying how.

    A clean image's own file is re-checked (a ``stat`` per file) just before its path is
    returned; a dirty image whose file changes while it is digested or written is
    resolved again. A path must name an existing file.

    Parameters
    ----------
    value : str, os.PathLike or nibabel image
    formats : sequence of str, optional
        Extensions the consumer reads, such as ``('.nii', '.nii.gz')``. None accepts
        the image's own format.
    store : Store, optional
        Where dirty images are written; :func:`get_store` by default.

    Returns
    -------
    Resolution

    Raises
    ------
    ImageReadError
        A dirty image whose voxel data cannot be read from its file (deleted,
        truncated, damaged); the message names the file.

    Examples
    --------
    >>> import numpy as np, nibabel as nib, tempfile
    >>> from nipype_nibtrack import Store
    >>> store = Store(tempfile.mkdtemp())
    >>> img = nib.Nifti1Image(np.ones((4, 4, 4), 'f4'), np.eye(4))
    >>> resolve(img, store=store).action
    'written'
    >>> again = resolve(img, store=store)
    >>> again.action, again.reason, os.path.basename(again.path)
    ('reused', 'image has no file', 'image.nii')
    """
    # an image first: isinstance against the os.PathLike ABC costs a clean resolution 5%
    if not isinstance(value, FileBasedImage) and isinstance(value, (str, os.PathLike)):
        return Resolution(_existing_file(value), 'path')
    _check_image(value)
    accepted = normalise_formats(formats)
    for _ in range(_ATTEMPTS):
        try:
            return _resolve_image(value, accepted, store)
        except _SourceChanged as err:
            logger.debug('files of %r changed while resolved: again', value)
            edited = err.image
    if edited:
        raise ImageReadError(
            errno.EAGAIN,
            f'this {type(value).__name__} kept changing in memory while it was written '
            f'({_ATTEMPTS} attempts): another thread edits its data, header or affine. '
            'Resolve it when the edits are done, or resolve a copy (copy.deepcopy)',
        )
    files = ', '.join(source_files(value))
    raise ImageReadError(
        errno.EAGAIN,
        f'{files} kept changing on disk while this {type(value).__name__} was resolved '
        f'({_ATTEMPTS} attempts). Wait until whatever writes it has finished, or load '
        'a copy',
    )


def as_filename(
    value: Any, *, formats: Iterable[str] | str | None = None, store: Store | None = None
) -> str:
    """An absolute file name holding exactly ``value``.

    A clean image in an accepted format comes back as its own file, untouched, without
    reading its data; anything else is written once to the content-addressed store and
    that file is returned, now and for every later call with the same content.

    Parameters
    ----------
    value : str, os.PathLike or nibabel image
    formats : sequence of str, optional
        Extensions the consumer reads; an image in another format is converted.
    store : Store, optional

    Returns
    -------
    str

    Raises
    ------
    TypeError
        ``value`` is neither a path nor a nibabel image.
    FileNotFoundError
        A path that does not exist, or a broken symbolic link (the message names its
        target).
    IsADirectoryError
        A path naming a directory.
    ValueError
        An image whose data live in an in-memory file object, or that cannot be
        written in any accepted format.
    ImageReadError
        A dirty image whose voxel data cannot be read from its file.
    StoreError
        The store cannot be written (no space, read-only...); the message names it.

    Examples
    --------
    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = os.path.join(data_path, 'anatomical.nii')
    >>> as_filename(nib.load(path)) == path
    True
    >>> as_filename(nib.load(path), formats=['.nii.gz']).endswith('anatomical.nii.gz')
    True
    """
    return resolve(value, formats=formats, store=store).path


def load_reference(
    path: str | os.PathLike,
    *,
    error: type[OSError] = FileNotFoundError,
    shared: str = 'the work directory',
    note: str = '',
) -> Any:
    """Load the image a file reference names: the way back from :func:`as_filename`.

    Front-ends pickle an image as the file it resolves to; the process that unpickles
    it calls this (or a front-end's wrapper naming its own error and directories).

    Parameters
    ----------
    path : str or os.PathLike
        The file the reference names.
    error : type of OSError, optional
        Raised when the file cannot be found (a front-end's own class, say one its
        engine takes for "no cached result").
    shared : str, optional
        What, besides the store, every worker must see: named in the message.
    note : str, optional
        A sentence the message ends with.

    Returns
    -------
    nibabel image
        A clean image of that file, as :func:`nipype_nibtrack.load` gives.

    Raises
    ------
    error
        The file is not on this machine; the message names it and says what every
        worker must share.

    Examples
    --------
    >>> import os
    >>> from nibabel.testing import data_path
    >>> load_reference(os.path.join(data_path, 'anatomical.nii')).shape
    (33, 41, 25)
    >>> load_reference('/no/such/store/image.nii', shared='the cache', note='Run it again.')
    Traceback (most recent call last):
    ...
    FileNotFoundError: nipype_nibtrack: the image file /no/such/store/image.nii is not
    readable on this machine. Images travel between processes as file references: put
    the image store (NIBTRACK_STORE) and the cache on a filesystem every worker shares.
    Run it again.
    """
    message = (
        f'nipype_nibtrack: the image file {os.fspath(path)} is not readable on this machine. '
        f'Images travel between processes as file references: put the image store '
        f'({ENV_VAR}) and {shared} on a filesystem every worker shares.'
    )
    if note:
        message += f' {note}'
    if not os.path.exists(path):
        raise error(message)
    try:
        return load(path)
    except FileNotFoundError as err:  # removed since the check
        raise error(message) from err
