"""Turn an image (or a path) into a file name a command-line tool can read."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from nibabel.filebasedimages import FileBasedImage
from nibabel.filename_parser import splitext_addext

from .digest import image_digest
from .export import choose_target, export_image
from .rules import dirty_reason
from .snapshot import proxy_spec
from .store import Store, get_store

__all__ = ['Resolution', 'as_filename', 'normalise_formats', 'resolve']

logger = logging.getLogger('nipype_nibtrack')

_UNSAFE = re.compile(r'[^A-Za-z0-9._+-]+')
_STEM_MAX = 80


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

    >>> normalise_formats(['nii.gz', '.NII'])
    ('.nii.gz', '.nii')
    >>> normalise_formats(None) is None
    True
    """
    if formats is None:
        return None
    if isinstance(formats, str):
        formats = (formats,)
    out = tuple(('' if f.startswith('.') else '.') + f.lower() for f in formats)
    if not out:
        raise ValueError('formats must name at least one extension, such as ".nii"')
    return out


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
    spec = proxy_spec(dataobj) if dataobj is not None else None
    if spec is not None and spec.in_memory:
        raise ValueError(
            f'this {type(img).__name__} reads its data from an in-memory file object '
            f'({type(getattr(dataobj, "file_like", None)).__name__}), which other processes '
            'cannot read. Save it to a file first, or detach it with '
            'img = type(img)(np.asanyarray(img.dataobj), img.affine, img.header)'
        )


def resolve(
    value: Any, *, formats: Iterable[str] | str | None = None, store: Store | None = None
) -> Resolution:
    """Resolve a path or an image to an absolute file name, saying how.

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
    if isinstance(value, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(value))
        if not os.path.exists(path):
            raise FileNotFoundError(
                f'{path} does not exist (given {value!r}); pass an existing file or an image'
            )
        return Resolution(path, 'path')
    _check_image(value)
    accepted = normalise_formats(formats)
    reason = dirty_reason(value)
    if reason is None:
        own = os.path.abspath(value.get_filename())
        if _accepted(own, accepted):
            return Resolution(own, 'original')
        reason = f'format {_extension(own)} is not among the accepted {list(accepted)}'
    target = choose_target(value, accepted)
    digest = image_digest(value)
    name = _stem(value) + target.ext
    path, written = (store or get_store()).put(
        digest, name, lambda tmp: export_image(value, target, tmp)
    )
    resolution = Resolution(str(path), 'written' if written else 'reused', reason)
    logger.debug('%s', resolution.describe())
    return resolution


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
        A path that does not exist.
    ValueError
        An image whose data live in an in-memory file object, or that cannot be
        written in any accepted format.

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
