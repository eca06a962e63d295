"""Images cross to pydra's workers and back as file references, never as arrays.

pydra pickles with cloudpickle everywhere: the job a cf or slurm worker runs, the task
inside it, and the result a worker saves. :func:`install` adds a reduction for every
nibabel image class to cloudpickle's own dispatch table (``cloudpickle.Pickler``'s,
not ``copyreg``'s, so plain ``pickle`` is left alone): an image pickles as the path it
resolves to (a dirty one is written to the store first) and loads back, with
:func:`nipype_nibtrack.load`, as a clean image of that file. Loading one imports this
module, so a worker that unpickles an image has the front-end switched on.

pickle looks reductions up by exact class: an image class defined after :func:`install`
is registered when an image of it is first hashed (before pydra pickles a job holding
it); until then it pickles whole (correct, only larger).
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

import cloudpickle
from nibabel.filebasedimages import FileBasedImage

from .. import load_reference as core_load_reference
from .resolving import image_path

__all__ = ['MissingImageFile', 'install', 'load_reference', 'reduce_image', 'register']

logger = logging.getLogger('nipype_nibtrack')


class MissingImageFile(FileNotFoundError, pickle.UnpicklingError):
    """The file a pickled image reference names is gone (``nibtrack store gc``, say).

    An ``UnpicklingError`` too: pydra then takes a cached result that refers to it for
    no result at all and runs the task again, instead of failing or using it.
    """


def load_reference(path: str) -> Any:
    """Load the image a pickled reference names.

    Raises :class:`MissingImageFile` when the file is gone.

    >>> import os
    >>> from nibabel.testing import data_path
    >>> load_reference(os.path.join(data_path, 'anatomical.nii')).shape
    (33, 41, 25)
    """
    return core_load_reference(
        path,
        error=MissingImageFile,
        shared="pydra's cache directory",
        note='A store entry deleted by `nibtrack store gc` makes pydra run the task again.',
    )


def reduce_image(img: FileBasedImage) -> Any:
    """The reduction of an image: ``load_reference(<the file it resolves to>)``.

    An image that cannot become a file (data in a ``BytesIO``) pickles whole, as without
    this module: a pickle must not fail where pydra saves an error report.

    >>> import numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.ones((2, 2, 2), 'f4'), np.eye(4))
    >>> reduce_image(img)[0].__name__
    'load_reference'
    """
    try:
        return load_reference, (image_path(img),)
    except (ValueError, TypeError) as err:
        logger.warning('nipype_nibtrack: pickling a %s whole: %s', type(img).__name__, err)
        return img.__reduce_ex__(4)


def _subclasses(klass: type) -> list[type]:
    out = [klass]
    for sub in klass.__subclasses__():
        out.extend(_subclasses(sub))
    return out


def register(klass: type) -> None:
    """Pickle images of ``klass`` (exactly) as references."""
    # a ChainMap whose writes go to cloudpickle's own table, not to copyreg's
    cloudpickle.Pickler.dispatch_table[klass] = reduce_image


def install() -> None:
    """Register the reduction for every image class defined so far."""
    for klass in _subclasses(FileBasedImage):
        register(klass)
