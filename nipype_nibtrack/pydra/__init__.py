"""The pydra front-end: task fields, hashing and workers that take nibabel images.

``import nipype_nibtrack.pydra`` switches it on (idempotent); ``import nipype_nibtrack``
does so by itself as soon as ``pydra.compose`` is imported in the same process, and
every image pickled for a worker carries what switches it on there. Three hooks, each
in its module:

- :mod:`.coercion`: a field typed with fileformats classes (``Nifti1``, mrtrix3's
  ``ImageIn``) takes an image and resolves it with the extensions they accept; a field
  typed with a nibabel image class takes a path or a file and loads it;
- :mod:`.hashing`: an image hashes as the file it resolves to;
- :mod:`.pickling`: an image travels to workers and back as a file reference.

Built only on the core's public API (:mod:`nipype_nibtrack`); needs pydra >= 1.0a12.

Examples
--------
>>> import os, nibabel as nib
>>> import nipype_nibtrack as nt
>>> import nipype_nibtrack.pydra
>>> from nibabel.testing import data_path
>>> from pydra.tasks.mrtrix3.v3_1 import MrConvert
>>> path = os.path.join(data_path, 'anatomical.nii')
>>> str(MrConvert(in_file=nt.load(path)).in_file) == path  # clean: its own file
True
>>> img = nt.load(path)
>>> img.affine[0, 3] += 1
>>> str(MrConvert(in_file=img).in_file).startswith(str(nt.get_store().objects))
True
"""

import warnings
from importlib.metadata import version

from packaging.version import Version  # a dependency of nibabel

from . import coercion, hashing, pickling
from .coercion import formats_of, image_classes
from .pickling import MissingImageFile, load_reference

# from the metadata: this runs while pydra.utils may still be initialising
_pydra_version = version('pydra')
if Version(_pydra_version) >= Version('1.0a12'):
    coercion.install()
    hashing.install()
    pickling.install()
else:  # imported on its own whenever pydra is: an older pydra must keep working
    warnings.warn(
        f'nipype_nibtrack.pydra needs pydra >= 1.0a12, found {_pydra_version}: its hooks '
        "are not installed. pip install --pre 'nipype_nibtrack[pydra]'",
        stacklevel=2,
    )

__all__ = ['MissingImageFile', 'formats_of', 'image_classes', 'load_reference']
