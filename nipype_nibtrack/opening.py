"""The core's reads of a user's image files, through descriptors it opened itself.

nibabel opens a file by name whenever it is handed a name: a load, and every read of a
proxy's voxels. A FIFO put at that name blocks the ``open`` until a writer comes, for
ever; a ``stat`` just before leaves a window in which one can be swapped in. So when the
core makes nibabel read a user's file (a reference load, the voxels of a dirty image it
hashes and writes, the file data a ``get_fdata()`` cache is compared with), it opens the
file itself with :func:`~nipype_nibtrack.fileid.open_regular` (non-blocking, then
``fstat``: a regular file or a clear :class:`~nipype_nibtrack.fileid.NotRegularFile`)
and hands nibabel file objects made from that descriptor: decompressed by the file's
extension as nibabel's :class:`~nibabel.openers.ImageOpener` decompresses it, in text
mode where nibabel reads text (PAR and HEAD headers).

- :func:`opened`: one file, as nibabel would open it for reading.
- :func:`opened_file_map` and :func:`load_opened`: a default load of an image's files.
- :func:`reading`: a proxy to read a data object's voxels through (the proxy itself when
  reading it opens nothing by name).
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import functools
import gzip
import io
import os
from collections.abc import Callable, Iterator
from typing import Any

from nibabel.arrayproxy import ArrayProxy
from nibabel.brikhead import AFNIImage
from nibabel.fileholders import FileHolder
from nibabel.minc1 import MincError, MincImageArrayProxy
from nibabel.minc2 import Minc2File, Minc2Image
from nibabel.openers import ImageOpener
from nibabel.parrec import PARRECArrayProxy, PARRECImage

from .fileid import regular_opener

__all__ = ['load_opened', 'opened', 'opened_file_map', 'reading', 'release']

_GZIP = ImageOpener.gz_def[0]
_BZ2 = ImageOpener.bz2_def[0]


def _decompressing(path: str) -> Callable[[Any], Any] | None:
    """What turns the raw file at ``path`` into the bytes nibabel reads from it: the
    opener :class:`~nibabel.openers.ImageOpener` picks by extension (``.gz``, ``.mgz``,
    ``.bz2``, ``.zst``, any an image class registered), given our file object; None
    for a plain file."""
    ext = os.path.splitext(path)[1].lower()
    recipe = next(
        (r for e, r in ImageOpener.compress_ext_map.items() if e is not None and e.lower() == ext),
        None,
    )
    if recipe is None or recipe[0] is open:
        return None
    if recipe[0] is _GZIP:  # nibabel's opens by name: the same stream from our file
        return lambda raw: gzip.GzipFile(fileobj=raw, mode='rb')
    if recipe[0] is _BZ2:
        return lambda raw: bz2.BZ2File(raw, mode='rb')
    return lambda raw: recipe[0](raw, mode='rb')  # zstd's ZstdFile takes file objects


@contextlib.contextmanager
def opened(path: str, *, text: bool = False) -> Iterator[Any]:
    """``path`` open for reading as nibabel opens it, from a descriptor the core opened.

    Decompressed by its extension as :class:`~nibabel.openers.ImageOpener` does;
    ``text`` decodes it as ``open(path, 'rt')`` does (the locale's encoding). Closed
    when the block ends.

    Raises
    ------
    NotRegularFile
        ``path`` names a directory, a FIFO, a socket or a device (never blocks).
    OSError
        It cannot be opened.

    Examples
    --------
    >>> import gzip, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), 'note.txt.gz')
    >>> with gzip.open(path, 'wb') as f:
    ...     _ = f.write(b'hello')
    >>> with opened(path) as f:
    ...     f.read()
    b'hello'
    >>> with opened(path, text=True) as f:
    ...     f.read()
    'hello'
    """
    with contextlib.ExitStack() as stack:
        fobj = stack.enter_context(open(path, 'rb', opener=regular_opener))
        decompress = _decompressing(path)
        if decompress is not None:
            fobj = stack.enter_context(decompress(fobj))
        if text:
            fobj = stack.enter_context(io.TextIOWrapper(fobj, encoding=io.text_encoding(None)))
        yield fobj


class _Missing(io.RawIOBase):
    """Stands for a file that did not exist when the core opened the others (an SPM
    image's optional ``.mat``): nibabel's first use of it raises FileNotFoundError, as
    its own ``open`` would, and there is no name for it to open (a FIFO put there since
    cannot block it)."""

    def __init__(self, path: str):
        super().__init__()
        self.name = path

    def _missing(self, *args: Any) -> Any:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.name)

    seek = read = readinto = _missing

    def readable(self) -> bool:
        return True


#: Files an image's load reads only when they exist (an SPM image's affine)
_OPTIONAL = frozenset({'mat'})
#: The files of a class that nibabel reads as text (``open(name, 'rt')``), by class
_TEXT_FILES: dict[type, tuple[str, ...]] = {PARRECImage: ('header',), AFNIImage: ('header',)}


def _text_files(klass: type) -> tuple[str, ...]:
    return next((_TEXT_FILES[cls] for cls in klass.__mro__ if cls in _TEXT_FILES), ())


@contextlib.contextmanager
def opened_file_map(klass: type, paths: dict[str, str]) -> Iterator[dict[str, FileHolder]]:
    """A file map of ``paths`` for ``klass``'s default load, every holder a file object
    :func:`opened` made (text where nibabel reads text), closed when the block ends.

    Each holder keeps its file name too, as nibabel's own maps do. A missing ``.mat``
    (optional: nibabel's load goes without it) is a holder whose first read raises
    FileNotFoundError; any other missing file raises it here.
    """
    text = _text_files(klass)
    with contextlib.ExitStack() as stack:
        holders = {}
        for key, path in paths.items():
            try:
                fobj = stack.enter_context(opened(path, text=key in text))
            except FileNotFoundError:
                if key not in _OPTIONAL:
                    raise
                fobj = _Missing(path)
            holders[key] = FileHolder(filename=path, fileobj=fobj)
        yield holders


@functools.cache
def _named_hdf5() -> type:
    import h5py  # as nibabel does: importing h5py takes a while, only when needed

    class NamedFile(h5py.File):
        """An HDF5 file opened through ``/dev/fd/N`` of a descriptor the core checked,
        named by the path the core opened (what h5py names a file opened by name)."""

        def __init__(self, fd: int, path: str):
            super().__init__(f'/dev/fd/{fd}', 'r')
            self._opened_as = path

        @property
        def filename(self) -> str:
            return self._opened_as

    return NamedFile


def _minc2(klass: type, paths: dict[str, str]) -> Any:
    """``Minc2Image.from_file_map`` of ``paths``, its HDF5 file opened by HDF5 from the
    descriptor the core opened: h5py reads files by name only (HDF5's own ``open``, no
    ``O_NONBLOCK``), and by a file object only through Python callbacks, under a name
    that is no path. ``/dev/fd/N`` opens the very inode that descriptor holds, which is
    known to be a regular file; h5py keeps its own descriptor, ours is closed. The rest
    is nibabel 5's ``from_file_map`` (checked equal to it by the tests)."""
    path = paths['image']
    if not os.path.isdir('/dev/fd'):  # no such names here: h5py opens the path itself
        return klass.from_file_map({key: FileHolder(filename=p) for key, p in paths.items()})
    with open(path, 'rb', opener=regular_opener) as raw:  # an HDF5 file is never compressed
        minc_file = Minc2File(_named_hdf5()(raw.fileno(), path))
    affine = minc_file.get_affine()
    if affine.shape != (4, 4):
        raise MincError('Image does not have 3 spatial dimensions')
    header = klass.header_class(
        minc_file.get_data_dtype(), minc_file.get_data_shape(), minc_file.get_zooms()
    )
    data = klass.ImageArrayProxy(minc_file)
    file_map = {key: FileHolder(filename=p) for key, p in paths.items()}
    return klass(data, affine, header, extra=None, file_map=file_map)


def release(img: Any) -> None:
    """Close what a load's data object holds open (PAR/REC's file, MINC's handle)."""
    dataobj = img.dataobj
    if isinstance(dataobj, PARRECArrayProxy):
        dataobj.file_like.close()
    elif isinstance(dataobj, MincImageArrayProxy):
        close = getattr(dataobj.minc_file._mincfile, 'close', None)
        if close is not None:
            close()


@contextlib.contextmanager
def load_opened(klass: type, paths: dict[str, str], *, hold: bool = False) -> Iterator[Any]:
    """A default load of ``paths`` as a ``klass`` image, from files the core opened.

    Every file nibabel reads is opened by :func:`opened_file_map` (MINC2: see
    :func:`_minc2`), so none is opened by name and a FIFO at a path is a clear
    :class:`~nipype_nibtrack.fileid.NotRegularFile`, never a hang. When the block ends
    the files are closed, and so is what the image's data object holds open (PAR/REC,
    MINC), unless ``hold``: then a MINC data object stays usable (it reads from its own
    handle, as after ``nib.load``); a proxy reading one of the files opened here does not.

    Examples
    --------
    >>> import os
    >>> from nibabel.parrec import PARRECImage
    >>> from nibabel.testing import data_path
    >>> name = os.path.join(data_path, 'phantom_EPI_asc_CLEAR_2_1')
    >>> paths = {'header': name + '.PAR', 'image': name + '.REC'}
    >>> with load_opened(PARRECImage, paths) as img:
    ...     img.shape
    (64, 64, 9, 3)
    """
    if issubclass(klass, Minc2Image):
        img = _minc2(klass, paths)
        try:
            yield img
        finally:
            if not hold:
                release(img)
        return
    with opened_file_map(klass, paths) as file_map:
        img = klass.from_file_map(file_map)
        try:
            yield img
        finally:
            if not hold:
                release(img)


def _holds_its_file(dataobj: ArrayProxy) -> bool:
    """True for a proxy made with ``keep_file_open=True`` that has opened its file: it
    reads from the handle it holds, which opens nothing."""
    opener = vars(dataobj).get('_opener')
    return opener is not None and not opener.closed and bool(dataobj._keep_file_open)


@contextlib.contextmanager
def reading(dataobj: Any) -> Iterator[Any]:
    """The data object to read ``dataobj``'s voxels through, for the block's length.

    A proxy that would open its file by name on this read (nibabel's default) is read
    through a private shallow copy of it whose file is a file object :func:`opened`
    made: the same bytes, from the file at that name now, and a FIFO or device put
    there is a clear :class:`~nipype_nibtrack.fileid.NotRegularFile`. The proxy itself
    is untouched: ``keep_file_open`` and its opener, its lock, what later reads open.
    Anything else (an array, a proxy reading a file object or the handle it holds,
    PAR/REC, MINC) is yielded as it is.

    Examples
    --------
    >>> import os, numpy as np, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> img = nib.load(os.path.join(data_path, 'anatomical.nii'))
    >>> with reading(img.dataobj) as proxy:
    ...     data = proxy[:, :, 0]
    ...     proxy is img.dataobj, type(proxy.file_like).__name__
    (False, 'BufferedReader')
    >>> np.array_equal(data, img.dataobj[:, :, 0]), img.dataobj.file_like == proxy.file_like.name
    (True, True)
    """
    name = getattr(dataobj, 'file_like', None)
    if (
        not isinstance(dataobj, ArrayProxy)
        or not isinstance(name, (str, os.PathLike))
        or _holds_its_file(dataobj)
    ):
        yield dataobj
        return
    with opened(os.fspath(name)) as fobj:
        twin = object.__new__(type(dataobj))
        twin.__dict__.update(vars(dataobj))  # shape, dtype, offset, scaling, mmap, lock
        twin.__dict__.pop('_opener', None)
        twin.file_like = fobj
        twin._keep_file_open = twin._persist_opener = False  # reads the file object given
        yield twin
