"""pydra tasks for the tests, defined in an importable module.

pydra 1.0a12 pickles a function defined in ``__main__`` (or a test module that pytest
imports under another name) by value and hashes it differently in a worker ("Job main
has no result"); tasks are made with ``python.define(func)``, never ``@python.define``
on a function of the same name.
"""

from __future__ import annotations

import os
import typing as ty
from collections import OrderedDict

import nibabel as nib
from fileformats.generic import File
from fileformats.medimage import Nifti1
from nibabel.spatialimages import SpatialImage
from pydra.compose import python, workflow
from pydra.tasks.mrtrix3.v3_1 import MrConvert

import nipype_nibtrack.pydra  # noqa: F401  (switches the front-end on in every worker)

#: Where each run of a python task leaves a line: counts the runs a cache did not serve
RUN_LOG = 'NIBTRACK_TEST_RUN_LOG'


def _log_run(name: str) -> None:
    log = os.environ.get(RUN_LOG)
    if log:
        with open(log, 'a') as f:
            f.write(f'{name} {os.getpid()}\n')


def voxel_sum(img: nib.Nifti1Image) -> float:
    _log_run('voxel_sum')
    return float(img.get_fdata().sum())


def any_image_sum(img: SpatialImage) -> float:
    _log_run('any_image_sum')
    return float(img.get_fdata().sum())


def scaled(img: SpatialImage, factor: float) -> nib.Nifti1Image:
    _log_run('scaled')
    data = img.get_fdata(dtype='f4') * factor
    return nib.Nifti1Image(data, img.affine)


def file_size(in_file: File) -> int:
    _log_run('file_size')
    return os.path.getsize(in_file)


def nifti_path(in_file: Nifti1) -> str:
    _log_run('nifti_path')
    return str(in_file)


def images_sum(imgs: list[nib.Nifti1Image]) -> float:
    _log_run('images_sum')
    return float(sum(i.get_fdata().sum() for i in imgs))


class ImagePair(ty.NamedTuple):
    """Images held in a named tuple (a field's value pydra keeps as given)."""

    fixed: nib.Nifti1Image
    moving: nib.Nifti1Image


def pair_sum(pair: ImagePair) -> float:
    _log_run('pair_sum')
    assert type(pair) is ImagePair, type(pair)
    return float(pair.fixed.get_fdata().sum() + 10 * pair.moving.get_fdata().sum())


def named_sums(imgs: ty.Any) -> list[float]:
    _log_run('named_sums')
    assert type(imgs) is OrderedDict, type(imgs)
    return [float(i.get_fdata().sum()) for i in imgs.values()]


VoxelSum = python.define(voxel_sum)
AnyImageSum = python.define(any_image_sum)
Scaled = python.define(scaled)
FileSize = python.define(file_size)
NiftiPath = python.define(nifti_path)
ImagesSum = python.define(images_sum)
PairSum = python.define(pair_sum)
NamedSums = python.define(named_sums)


def convert_then_sum(in_file: nib.Nifti1Image) -> float:
    """mrconvert (a shell task) to NIfTI, then a python task typed with an image."""
    convert = workflow.add(MrConvert(in_file=in_file, out_file='converted.nii'))
    total = workflow.add(VoxelSum(img=convert.out_file))
    return total.out


ConvertThenSum = workflow.define(convert_then_sum)


def scale_then_convert(in_file: nib.Nifti1Image, factor: float) -> File:
    """A python task returning an image, then mrconvert (a shell task) reading it."""
    scale = workflow.add(Scaled(img=in_file, factor=factor))
    convert = workflow.add(MrConvert(in_file=scale.out, out_file='scaled.nii'))
    return convert.out_file


ScaleThenConvert = workflow.define(scale_then_convert)


def scale_twice(in_file: nib.Nifti1Image) -> nib.Nifti1Image:
    """Two python tasks passing an image: the inner result and the workflow's hold it."""
    first = workflow.add(Scaled(img=in_file, factor=2.0), name='first')
    second = workflow.add(Scaled(img=first.out, factor=3.0), name='second')
    return second.out


ScaleTwice = workflow.define(scale_twice)
