"""Helpers shared by the nipype-layer tests (imported explicitly, not a conftest).

The interfaces defined here live in an importable module (the tests folder is put on
``sys.path`` by the test modules and on ``PYTHONPATH`` for subprocesses) so that nodes
using them unpickle in MultiProc spawn/forkserver workers and in batch workers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from copy import deepcopy
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path
from nipype import config as nipype_config
from nipype.interfaces.base import (
    BaseInterface,
    BaseInterfaceInputSpec,
    File,
    InputMultiPath,
    TraitedSpec,
    traits,
)
from nipype.pipeline.plugins.base import SGELikeBatchManagerBase
from nipype.utils.filemanip import loadpkl, savepkl  # noqa: F401  (for the tests)

TESTS_DIR = Path(__file__).resolve().parent
ANAT = os.path.join(data_path, 'anatomical.nii')
MGZ = os.path.join(data_path, 'test.mgz')

#: Elastix rigid registration parameters for anatomical.nii (33x41x25), 100 iterations;
#: elastix reads one parameter per line
ELASTIX_RIGID = """\
(FixedInternalImagePixelType "float")
(MovingInternalImagePixelType "float")
(FixedImageDimension 3)
(MovingImageDimension 3)
(UseDirectionCosines "true")
(Registration "MultiResolutionRegistration")
(Interpolator "BSplineInterpolator")
(ResampleInterpolator "FinalBSplineInterpolator")
(Resampler "DefaultResampler")
(FixedImagePyramid "FixedSmoothingImagePyramid")
(MovingImagePyramid "MovingSmoothingImagePyramid")
(Optimizer "AdaptiveStochasticGradientDescent")
(Transform "EulerTransform")
(Metric "AdvancedMattesMutualInformation")
(NumberOfResolutions 3)
(ImagePyramidSchedule 4 4 4 2 2 2 1 1 1)
(AutomaticScalesEstimation "true")
(AutomaticTransformInitialization "true")
(AutomaticTransformInitializationMethod "GeometricalCenter")
(HowToCombineTransforms "Compose")
(NumberOfHistogramBins 32)
(MaximumNumberOfIterations 100)
(NumberOfSpatialSamples 4096)
(NewSamplesEveryIteration "true")
(ImageSampler "RandomCoordinate")
(CheckNumberOfSamples "false")
(BSplineInterpolationOrder 1)
(FinalBSplineInterpolationOrder 3)
(DefaultPixelValue 0)
(WriteResultImage "true")
(ResultImageFormat "nii.gz")
(ResultImagePixelType "float")
"""

#: Images of at least 16 MB for the pickle-size tests
BIG_SHAPE = (128, 128, 256)

IMAGE_SUFFIXES = ('.nii', '.nii.gz', '.mgh', '.mgz', '.img', '.hdr', '.mif', '.mhd', '.nrrd')


# ---------------------------------------------------------------- external tools


def require_tool(name: str) -> str:
    """Path of an external program; under ``CI=true`` a missing one fails the test."""
    found = shutil.which(name)
    if found:
        return found
    message = f'{name} is not installed (Debian packages elastix / mrtrix3 provide it)'
    if os.environ.get('CI', '').lower() == 'true':
        pytest.fail(f'CI=true and {message}')
    pytest.skip(message)


# ---------------------------------------------------------------- images


def random_image(
    shape: tuple[int, ...] = (8, 9, 10), seed: int | None = None, dtype: str = 'f4'
) -> nib.Nifti1Image:
    """An in-memory (dirty) NIfTI image with content unique to ``seed`` (random if None)."""
    rng = np.random.default_rng(seed if seed is not None else uuid.uuid4().int)
    data = rng.standard_normal(shape).astype(dtype)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    # quarter-voxel offsets survive NIfTI's float32 affine exactly: a reload is equal
    affine[:3, 3] = rng.integers(-20, 20, 3) / 4
    return nib.Nifti1Image(data, affine)


def big_image(seed: int | None = None) -> nib.Nifti1Image:
    """An in-memory float32 image of 16 MiB."""
    img = random_image(BIG_SHAPE, seed)
    assert img.dataobj.nbytes >= 16 * 2**20
    return img


def copy_anat(folder: Path) -> str:
    """A private copy of anatomical.nii (so tests may edit the file)."""
    return shutil.copy(ANAT, folder)


# ---------------------------------------------------------------- nipype helpers


def node_hash(node: Any, hash_method: str = 'timestamp') -> str:
    """The hash nipype computes for ``node`` (its ``_get_hashval``) under ``hash_method``.

    Works on a deep copy: nipype memoises the hash on the node, and image-aware specs
    resolve their images in place when hashed.
    """
    node = deepcopy(node)
    node.config = deepcopy(nipype_config._sections)
    node.config['execution']['hash_method'] = hash_method
    node._hashvalue = None
    node._hashed_inputs = None
    return node._get_hashval()[1]


def image_file_states(*folders: Path | str) -> dict[str, int]:
    """``{path: mtime_ns}`` of every image file under ``folders`` (store, work dir...)."""
    out = {}
    for folder in folders:
        for path in Path(folder).rglob('*'):
            if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES):
                out[str(path)] = path.stat().st_mtime_ns
    return out


def written_between(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Image files created or rewritten between two :func:`image_file_states`."""
    return sorted(p for p, m in after.items() if before.get(p) != m)


def store_root() -> Path:
    from nipype_nibtrack import get_store

    return get_store().root


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a fresh interpreter: same store, tests folder importable."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(TESTS_DIR), env.get('PYTHONPATH', '')) if p
    )
    env.setdefault('NIPYPE_NO_ET', '1')
    env.update(extra)
    return env


def run_python(code: str, *args: str, env: dict | None = None, check: bool = True, **kw: Any):
    """Run ``code`` in a fresh interpreter; returns the CompletedProcess."""
    kw.setdefault('text', True)
    proc = subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code), *args],
        env=env or subprocess_env(),
        capture_output=True,
        timeout=300,
        **kw,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f'subprocess failed ({proc.returncode}):\nstdout:\n{proc.stdout}\n'
            f'stderr:\n{proc.stderr}'
        )
    return proc


def hide_package_env(tmp: Path, package: str = 'nipype_nibtrack') -> dict[str, str]:
    """Environment of a worker that cannot import ``package`` (a sitecustomize blocks it)."""
    folder = tmp / 'hide_package'
    folder.mkdir(exist_ok=True)
    (folder / 'sitecustomize.py').write_text(
        textwrap.dedent(
            f"""\
            import sys


            class _Hide:
                def find_spec(self, name, path=None, target=None):
                    if name == {package!r} or name.startswith({package!r} + '.'):
                        raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)
                    return None


            sys.meta_path.insert(0, _Hide())
            """
        )
    )
    env = subprocess_env()
    env['PYTHONPATH'] = str(folder)
    return env


# ---------------------------------------------------------------- interfaces


class ScaleInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc='image to scale')
    factor = traits.Float(2.0, usedefault=True, desc='multiplier')
    counter = traits.Str(desc='folder in which each execution leaves a file')


class ScaleOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='scaled image')


class Scale(BaseInterface):
    """A Python interface: multiplies an image; records each execution in a file."""

    input_spec = ScaleInputSpec
    output_spec = ScaleOutputSpec

    def _out_name(self) -> str:
        stem = os.path.basename(self.inputs.in_file).split('.')[0]
        return os.path.abspath(f'{stem}_scaled.nii')

    def _run_interface(self, runtime: Any) -> Any:
        in_file = self.inputs.in_file
        # image-aware or not, the interface body only ever sees a plain path
        assert isinstance(in_file, str) and os.path.isfile(in_file), repr(in_file)
        if self.inputs.counter:
            record_run(self.inputs.counter, 'scale')
        img = nib.load(in_file)
        data = np.asanyarray(img.dataobj, dtype='f4') * self.inputs.factor
        nib.save(nib.Nifti1Image(data, img.affine), self._out_name())
        return runtime

    def _list_outputs(self) -> dict:
        return {'out_file': self._out_name()}


class VoxelSumInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc='image')


class VoxelSumOutputSpec(TraitedSpec):
    total = traits.Float()
    seen = traits.Str(desc='what the interface body received')


class VoxelSum(BaseInterface):
    """A BaseInterface written in Python: the sum of its input's voxels."""

    input_spec = VoxelSumInputSpec
    output_spec = VoxelSumOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        self._seen = self.inputs.in_file
        self._total = float(np.asanyarray(nib.load(self.inputs.in_file).dataobj).sum())
        return runtime

    def _list_outputs(self) -> dict:
        return {'total': self._total, 'seen': self._seen}


class CopiedVoxelSumInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, copyfile=True, mandatory=True, desc='image')


class CopiedVoxelSum(VoxelSum):
    """:class:`VoxelSum` of a ``copyfile=True`` input (nipype copies it into the node)."""

    input_spec = CopiedVoxelSumInputSpec


class MeanInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiPath(File(exists=True), mandatory=True, desc='images')
    counter = traits.Str(desc='folder in which each execution leaves a file')


class MeanOutputSpec(TraitedSpec):
    mean = traits.Float(desc='mean over all voxels of all images')


class Mean(BaseInterface):
    """A Python interface taking a list of images."""

    input_spec = MeanInputSpec
    output_spec = MeanOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        assert all(isinstance(f, str) for f in self.inputs.in_files)
        if self.inputs.counter:
            record_run(self.inputs.counter, 'mean')
        self._mean = float(
            np.mean([np.asanyarray(nib.load(f).dataobj).mean() for f in self.inputs.in_files])
        )
        return runtime

    def _list_outputs(self) -> dict:
        return {'mean': self._mean}


class SummaryInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc='image to read')
    counter = traits.Str(desc='folder in which each execution leaves a file')


class SummaryOutputSpec(TraitedSpec):
    summary = traits.Str(desc='what a tool reading in_file sees, as JSON')


class Summary(BaseInterface):
    """A Python interface: what a tool reading ``in_file`` sees (header text, affine, voxels)."""

    input_spec = SummaryInputSpec
    output_spec = SummaryOutputSpec

    def _run_interface(self, runtime: Any) -> Any:
        if self.inputs.counter:
            record_run(self.inputs.counter, 'summary')
        self._summary = summary_of(nib.load(self.inputs.in_file))
        return runtime

    def _list_outputs(self) -> dict:
        return {'summary': self._summary}


def function_node(function: Any, value: Any, base_dir: Path | str, name: str) -> Any:
    """A node of nipype's ``Function`` interface running ``function(x)`` on ``value``,
    with one output, ``total``."""
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    node = pe.Node(
        Function(input_names=['x'], output_names=['total'], function=function),
        name=name,
        base_dir=str(base_dir),
    )
    node.inputs.x = value
    return node


def crash_file(node: Any, folder: Path) -> Path:
    """Run ``node`` so that its command fails, in a workflow writing its crash file (a
    pklz) in ``folder``; the crash file's path."""
    from nipype.pipeline import engine as pe

    node.interface._cmd = 'false'  # fails: nipype writes a crash file
    wf = pe.Workflow('crashing', base_dir=str(folder))
    wf.add_nodes([node])
    wf.config['execution'] = {'crashdump_dir': str(folder), 'crashfile_format': 'pklz'}
    with pytest.raises(RuntimeError):
        wf.run()
    (crashfile,) = folder.glob('crash-*.pklz')
    return crashfile


def summary_of(img: Any) -> str:
    """What :class:`Summary` reports for ``img`` (read from a copy: ``img`` keeps its state)."""
    import copy
    import json

    img = copy.deepcopy(img)
    return json.dumps(
        {
            'descrip': img.header['descrip'].item().decode(),
            'affine': np.asarray(img.affine).tolist(),
            'voxels': np.asarray(img.get_fdata(dtype='f8')).ravel().tolist(),
        }
    )


def record_run(counter: str, tag: str) -> None:
    """Leave a file in the folder ``counter`` (a folder: nipype hashes a file's content)."""
    import os
    import uuid

    os.makedirs(counter, exist_ok=True)
    with open(os.path.join(counter, f'{tag}-{uuid.uuid4().hex}'), 'w'):
        pass


def count_runs(counter: str | Path, tag: str = '') -> int:
    """Executions recorded by :func:`record_run` in ``counter`` (of ``tag`` if given)."""
    folder = Path(counter)
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.name.startswith(tag))


# Functions for Function nodes (their source is what nipype pickles)


def add_one(img, counter):
    """Function node body: returns a new in-memory image."""
    import nibabel as nib

    if isinstance(img, str):
        img = nib.load(img)
    from nipype_fixtures import record_run

    record_run(counter, 'add_one')
    # get_fdata, not dataobj: an edited data cache is what the image holds
    return nib.Nifti1Image(img.get_fdata(dtype='f4') + 1, img.affine)


def image_sum(img, counter):
    """Function node body: returns the sum of the voxels."""
    import nibabel as nib

    if isinstance(img, str):
        img = nib.load(img)
    from nipype_fixtures import record_run

    record_run(counter, 'image_sum')
    return float(img.get_fdata().sum())


# ---------------------------------------------------------------- a local batch plugin


class LocalBatchPlugin(SGELikeBatchManagerBase):
    """nipype's SGE/SLURM/PBS path with a fresh local interpreter as the cluster.

    Every job is the ``batch/node_*.pklz`` + ``pyscript_*.py`` pair written by
    ``create_pyscript``, run as ``python pyscript_*.py`` in a new process that imports
    only nipype (the pickle names what else it needs).
    """

    def __init__(self, **kwargs: Any):
        self._jobs: dict[int, subprocess.Popen] = {}
        self._env = (kwargs.get('plugin_args') or {}).get('env') or subprocess_env()
        super().__init__('#!/bin/sh', **kwargs)

    def _is_pending(self, taskid: int) -> bool:
        return self._jobs[taskid].poll() is None

    def _submit_batchtask(self, scriptfile: str, node: Any) -> int:
        batch_dir = os.path.dirname(scriptfile)
        with open(os.path.join(batch_dir, f'{node._id}.log'), 'ab') as log:
            proc = subprocess.Popen(
                ['/bin/sh', scriptfile], env=self._env, stdout=log, stderr=subprocess.STDOUT
            )
        self._jobs[proc.pid] = proc
        self._pending[proc.pid] = node.output_dir()
        return proc.pid


# Functions for the directory and worker tests (issue 9: items 1, 9, 10, 16, 17)


def write_and_load_relative(fill):
    """Function node body: writes ``out.nii`` in the node folder, returns it by a relative name."""
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.full((4, 4, 4), fill, 'f4'), np.eye(4)), 'out.nii')
    return nib.load('out.nii')


def write_and_load_absolute(fill, dirty):
    """Function node body: returns ``nib.load(os.path.abspath('out.nii'))``, maybe edited."""
    import os

    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.full((4, 4, 4), fill, 'f4'), np.eye(4)), 'out.nii')
    img = nib.load(os.path.abspath('out.nii'))
    if dirty:
        img.header['descrip'] = b'edited in the node'
    return img


def make_image():
    """Function node body without image inputs that returns a 1 MiB in-memory image."""
    import nibabel as nib
    import numpy as np

    data = np.random.default_rng(16).standard_normal((64, 64, 64)).astype('f4')
    return nib.Nifti1Image(data, np.eye(4))


def describe(img):
    """Function node body: what a NIfTI image holds, where it reads from, the store in use."""
    import os

    import nipype_nibtrack as nt

    filename = img.get_filename()
    return {
        'sum': float(img.get_fdata().sum()),
        'file': filename and os.path.abspath(filename),
        'exists': bool(filename) and os.path.exists(filename),
        'descrip': img.header['descrip'].item(),
        'store': str(nt.get_store().root),
    }


def voxel_sum(img):
    """Function node body: the voxel sum of an image of any format."""
    import numpy as np

    return float(np.asanyarray(img.dataobj, dtype='f8').sum())
