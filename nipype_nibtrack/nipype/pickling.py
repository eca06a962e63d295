"""Images cross process and machine boundaries as file references, never as arrays.

nipype pickles nodes, inputs and results into ``.pklz`` files and MultiProc
submissions. Three hooks, installed by :func:`install`, turn every image met there into
a reference to the file it resolves to (dirty images are written to the store first):

- ``BaseTraitedSpec.__getstate__``: images in any spec (interface inputs, Function
  inputs and outputs) are pickled as references;
- ``InterfaceResult.__getstate__``: the same for the inputs recorded in a result;
- ``nipype.utils.filemanip.savepkl`` pickles with :class:`ImagePickler`, which also
  catches images in plain containers such as ``_inputs.pklz``.

A reference loads back, with :func:`nipype_nibtrack.load`, as a clean image of that
file: in a batch worker that has only imported ``nipype_nibtrack``.

A fourth hook makes every nipype spec pickle with :func:`rebuild_spec` as its
reconstructor. A fresh interpreter that unpickles a node (a MultiProc worker started
with ``spawn`` or ``forkserver``, a SLURM job, ``nipypecli crash``) imports this module
first, which installs the hooks there too, and adopts the store chosen in code by the
process that pickled it (:func:`adopt_settings`). Every pickled node holds specs, so no
worker runs a node without the hooks, even one whose inputs hold no image.
"""

from __future__ import annotations

import io
import logging
import pickle
import threading
import types
from typing import Any

from nipype.interfaces.base.specs import BaseTraitedSpec
from nipype.interfaces.base.support import InterfaceResult
from nipype.utils import filemanip

from .. import as_filename, chosen_store, renew_after_fork, set_store
from .. import load_reference as core_load_reference
from .traits import contains_image, is_image, map_images

__all__ = [
    'ImagePickler',
    'ImageReference',
    'adopt_settings',
    'install',
    'load_reference',
    'rebuild_spec',
    'settings',
]

logger = logging.getLogger('nipype_nibtrack')


def load_reference(path: str) -> Any:
    """Load the image a pickled reference names (:func:`nipype_nibtrack.load_reference`).

    >>> import os
    >>> from nibabel.testing import data_path
    >>> load_reference(os.path.join(data_path, 'anatomical.nii')).shape
    (33, 41, 25)
    """
    return core_load_reference(path)


class ImageReference:
    """Stands for an image in a pickle: unpickles as the image loaded from ``path``.

    >>> import pickle, numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.ones((2, 2, 2), 'f4'), np.eye(4))
    >>> back = pickle.loads(pickle.dumps(ImageReference.of(img)))
    >>> np.array_equal(back.get_fdata(), img.get_fdata())
    True
    """

    __slots__ = ('path',)

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def of(cls, img: Any, formats: tuple[str, ...] | None = None) -> ImageReference:
        return cls(as_filename(img, formats=formats))

    def __reduce__(self) -> tuple:
        return load_reference, (self.path,)

    def __repr__(self) -> str:
        return f'ImageReference({self.path!r})'


def _reference_or_image(img: Any, formats: tuple[str, ...] | None) -> Any:
    """A reference to ``img``, or ``img`` itself when it cannot become a file.

    Such an image (data in a ``BytesIO``, a surface where a volume is read) is refused
    with a clear error where it is validated or hashed. A pickle must not fail on it
    too: nipype pickles the node into its crash file, and an error raised there would
    hide the real one. Pickled whole, it behaves as in plain nipype.
    """
    try:
        return ImageReference.of(img, formats)
    except (ValueError, TypeError) as err:
        logger.warning('nipype_nibtrack: pickling a %s whole: %s', type(img).__name__, err)
        return img


def references(value: Any, formats: tuple[str, ...] | None = None) -> Any:
    """``value`` with every image, at any depth of containers (see ``map_images``), a reference.

    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = os.path.join(data_path, 'anatomical.nii')
    >>> references({'in': [nib.load(path), 3]})['in'][0].path == path
    True
    """
    return map_images(value, lambda img: _reference_or_image(img, formats))


class ImagePickler(pickle.Pickler):
    """A pickler that writes every nibabel image as an :class:`ImageReference`.

    >>> import io, pickle, numpy as np, nibabel as nib
    >>> img = nib.Nifti1Image(np.zeros((64, 64, 64), 'f4'), np.eye(4))
    >>> buffer = io.BytesIO()
    >>> ImagePickler(buffer).dump({'in_file': img})
    >>> len(buffer.getvalue()) < 1000
    True
    """

    def reducer_override(self, obj: Any) -> Any:
        if is_image(obj):
            ref = _reference_or_image(obj, None)
            if isinstance(ref, ImageReference):
                return ref.__reduce__()
        return NotImplemented


def _dump(obj: Any, file: Any, protocol: int | None = None, **kwargs: Any) -> None:
    ImagePickler(file, protocol, **kwargs).dump(obj)


def _dumps(obj: Any, protocol: int | None = None, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    _dump(obj, buffer, protocol, **kwargs)
    return buffer.getvalue()


# filemanip reads `pickle.dump` at call time: give it a pickle module that references
_pickle_for_nipype = types.ModuleType('pickle', 'pickle, with images pickled as references')
_pickle_for_nipype.__dict__.update(vars(pickle))
_pickle_for_nipype.dump = _dump
_pickle_for_nipype.dumps = _dumps


# ---------------------------------------------------------------- settings for workers

#: Root of the store this process adopted from a pickle (None: it adopted none)
_adopted: str | None = None
_adopt_lock = threading.Lock()
renew_after_fork(globals(), '_adopt_lock')


def settings() -> dict[str, str]:
    """What a process that unpickles our pickles must share with this one.

    Only a store chosen in code (:func:`nipype_nibtrack.set_store`): a fresh interpreter
    does not inherit it, while ``$NIBTRACK_STORE`` travels in the environment anyway.

    >>> import tempfile
    >>> import nipype_nibtrack as nt
    >>> root = tempfile.mkdtemp()
    >>> settings()
    {}
    >>> {'store': str(nt.set_store(root).root)} == settings()
    True
    >>> _ = nt.set_store(None)
    """
    store = chosen_store()
    return {} if store is None else {'store': str(store.root)}


def adopt_settings(carried: dict[str, str]) -> None:
    """Use the store a pickle carries, unless this process chose its own in code.

    A process that adopted a store from an earlier pickle follows the newer one.

    >>> import tempfile
    >>> import nipype_nibtrack as nt
    >>> root = tempfile.mkdtemp()
    >>> adopt_settings({'store': root})
    >>> str(nt.get_store().root) == root
    True
    >>> _ = nt.set_store(None)
    """
    global _adopted
    root = carried.get('store')
    if root is None:
        return
    with _adopt_lock:
        chosen = chosen_store()
        if chosen is not None and (str(chosen.root) == root or str(chosen.root) != _adopted):
            return
        _adopted = str(set_store(root).root)


def rebuild_spec(klass: type, carried: dict[str, str]) -> Any:
    """Reconstructor of every nipype spec pickled with the hooks installed.

    Unpickling names this function first, so the process imports this package (which
    installs the hooks) and adopts ``carried`` before anything in the pickle runs;
    then it builds the spec as traits' own reconstructor does (``__setstate__`` follows).

    >>> import pickle
    >>> from nipype.interfaces.utility import IdentityInterface
    >>> spec = IdentityInterface(fields=['a'], a=3).inputs
    >>> reducer, args, state = spec.__reduce_ex__(4)
    >>> reducer is rebuild_spec, pickle.loads(pickle.dumps(spec)).a
    (True, 3)
    """
    adopt_settings(carried)
    return klass.__new__(klass)


def _trait_formats(spec: Any, name: str) -> tuple[str, ...] | None:
    from .accept import trait_formats

    return trait_formats(spec, name)


def install() -> None:
    """Install the four hooks; calling it again changes nothing."""
    if getattr(BaseTraitedSpec.__getstate__, '_nibtrack', False):
        return
    spec_getstate = BaseTraitedSpec.__getstate__

    def __getstate__(self: BaseTraitedSpec) -> dict:
        state = spec_getstate(self)
        for name, value in state.items():
            if contains_image(value):
                state[name] = references(value, _trait_formats(self, name))
        return state

    def result_getstate(self: InterfaceResult) -> dict:
        state = dict(self.__dict__)
        if contains_image(state.get('inputs')):
            state['inputs'] = references(state['inputs'])
        return state

    def __reduce_ex__(self: BaseTraitedSpec, protocol: int) -> tuple:
        # traits' own: (__newobj__, (cls,), state); ours also installs the hooks
        return rebuild_spec, (type(self), settings()), self.__getstate__()

    __getstate__._nibtrack = True
    __getstate__.__doc__ = spec_getstate.__doc__
    BaseTraitedSpec.__getstate__ = __getstate__
    BaseTraitedSpec.__reduce_ex__ = __reduce_ex__
    InterfaceResult.__getstate__ = result_getstate
    filemanip.pickle = _pickle_for_nipype
