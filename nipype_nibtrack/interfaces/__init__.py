"""nipype's interfaces, taking nibabel images wherever they take files.

A drop-in for :mod:`nipype.interfaces`: change one import line ::

    from nipype.interfaces import fsl            # before
    from nipype_nibtrack.interfaces import fsl   # after

Every package and module of ``nipype.interfaces`` has its mirror here (``fsl``, ``ants``,
``afni``, ``freesurfer``, ``spm``, ``mrtrix3``, ``elastix``, ``niftyreg``, ``c3``,
``utility``, ``io``...), made on import (:mod:`nipype_nibtrack.nipype.mirror`). Each
interface class with a file input is its image-aware version
(:func:`nipype_nibtrack.accept_images`): same name, docstring, inputs, defaults and
command lines; its help says which inputs take an image. Everything else is nipype's
own object.

>>> import numpy as np, nibabel as nib
>>> from nipype_nibtrack.interfaces import fsl
>>> from nipype.interfaces import fsl as nipype_fsl
>>> issubclass(fsl.BET, nipype_fsl.BET), fsl.BET.__name__, fsl.Info is nipype_fsl.Info
(True, 'BET', True)
>>> img = nib.Nifti1Image(np.zeros((4, 4, 4), 'f4'), np.eye(4))
>>> fsl.BET(in_file=img, out_file='brain.nii.gz').cmdline
'bet ...image.nii brain.nii.gz'
"""

from ..nipype import mirror as _mirror

_mirror.install()
_doc = __doc__
_mirror.populate(__import__(__name__, fromlist=['_']), 'nipype.interfaces')
__doc__ = _doc  # populate copies nipype's; this package keeps its own
