"""A functional series made in memory from a real brain, with known motion.

The brain is nilearn's packaged MNI152 (2009c) template: the 1 mm T1 image is the
anatomical image, passed to the tools by its own path; its grey- and white-matter maps
give an EPI-like contrast (CSF bright, white matter dark), blurred to the functional
resolution and sampled on a 3 mm grid. The functional field of view sits in scanner
space at a known rigid offset from the anatomical image, every volume ``v`` sees the
head moved by a known rigid motion, and Rician-like noise is added. Nothing is
downloaded and no file is written: every volume is an in-memory (dirty) image.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

try:
    from motion import rigid
except ImportError:  # imported as workflows.simulate
    from .motion import rigid

__all__ = ['Series', 'anatomical_path', 'functional_series', 'motion_trace']

#: The offset of the functional field of view from the anatomical image: (tx, ty, tz)
#: in mm and (rx, ry, rz) in degrees, in the convention of ``motion``
OFFSET = (4.0, -6.0, 5.0, 3.0, -2.0, 5.0)
SHAPE = (64, 76, 60)
VOXEL_MM = 3.0
_TEMPLATE = 'mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz'


def _nilearn_data() -> Path:
    # find nilearn's data without importing nilearn (pandas and scikit-learn: seconds)
    spec = importlib.util.find_spec('nilearn')
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            'the realignment demo builds its data from the brain template nilearn ships: '
            "pip install nilearn (or pip install -e '.[demo]')"
        )
    return Path(spec.origin).parent / 'datasets' / 'data'


def anatomical_path() -> Path:
    """The 1 mm MNI152 T1 image nilearn ships (``nilearn.datasets.MNI152_FILE_PATH``)."""
    return _nilearn_data() / _TEMPLATE.format('t1')


def motion_trace(volumes: int = 8) -> np.ndarray:
    """A realistic head-motion trace, ``(volumes, 6)`` parameters, volume 0 at rest.

    A slow drift, a sudden move just after the middle of the run and a partial
    recovery near its end, with a little jitter; at most about 2 mm and 2 degrees.

    >>> trace = motion_trace(8)
    >>> trace.shape, bool((trace[0] == 0).all()), float(np.abs(trace).max()) <= 2.0
    ((8, 6), True, True)
    """
    if volumes < 2:
        raise ValueError(f'a series needs at least 2 volumes, not {volumes}')
    t = np.arange(volumes) / (volumes - 1)
    drift = np.outer(t, [0.4, -0.6, 0.8, 0.4, 0.2, -0.3])
    jump = np.outer(t >= 0.5, [0.8, 0.3, -1.1, 1.4, -0.9, 0.5])
    back = np.outer(t >= 0.8, [-0.4, 0.0, 0.5, -0.6, 0.3, 0.0])
    jitter = np.random.default_rng(1).normal(0.0, 0.04, (volumes, 6))
    trace = drift + jump + back + jitter
    trace[0] = 0.0
    return np.clip(trace, -2.0, 2.0)


@dataclass(frozen=True)
class Series:
    """The in-memory series and its ground truth.

    ``motion[v]`` maps a head point's world position in volume 0 to its position in
    volume ``v`` (RAS mm); ``offset`` maps functional world coordinates to the
    anatomical image's; ``centre`` is the rotation centre of the parameters;
    ``brain`` holds world points of the brain, where errors are measured.
    """

    volumes: list
    trace: np.ndarray
    motion: np.ndarray
    offset: np.ndarray
    centre: np.ndarray
    brain: np.ndarray


@cache
def _epi_contrast() -> tuple[np.ndarray, np.ndarray]:
    """EPI-like intensities on the 1 mm template grid, blurred to ~3 mm, and the affine."""
    data = _nilearn_data()
    grey, white = (
        nib.load(data / _TEMPLATE.format(kind)).get_fdata(dtype=np.float32) / 255
        for kind in ('gm', 'wm')
    )
    head = ndimage.binary_fill_holes(ndimage.binary_closing(grey + white > 0.2, iterations=3))
    csf = np.clip(head - grey - white, 0, 1)
    epi = ndimage.gaussian_filter(0.45 * white + 0.75 * grey + csf, sigma=1.2)
    return epi * 1000, nib.load(anatomical_path()).affine


def functional_series(volumes: int = 8, noise: float = 20.0, seed: int = 0) -> Series:
    """``volumes`` in-memory 3 mm volumes of the moving head (same data for the same args).

    >>> series = functional_series(2)
    >>> series.volumes[0].shape, series.volumes[0].get_filename() is None
    ((64, 76, 60), True)
    """
    epi, anat_affine = _epi_contrast()
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = -(np.array(SHAPE) - 1) * VOXEL_MM / 2 + [0.0, -18.0, 18.0]
    centre = affine[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + affine[:3, 3]
    offset = rigid(OFFSET, centre)
    trace = motion_trace(volumes)
    motion = np.array([rigid(p, centre) for p in trace])
    grid = np.indices(SHAPE, dtype=float).reshape(3, -1)
    grid = np.vstack([grid, np.ones(grid.shape[1])])
    rng = np.random.default_rng(seed)
    images = []
    for head_motion in motion:
        # the voxel sees the head point that sat at inv(motion) @ x in volume 0
        to_template = np.linalg.inv(anat_affine) @ offset @ np.linalg.inv(head_motion) @ affine
        signal = ndimage.map_coordinates(epi, (to_template @ grid)[:3], order=1)
        signal = signal.reshape(SHAPE)
        noisy = np.hypot(signal + rng.normal(0, noise, SHAPE), rng.normal(0, noise, SHAPE))
        images.append(nib.Nifti1Image(noisy.astype(np.float32), affine))
    reference = np.asarray(images[0].dataobj)
    inside = np.argwhere(reference > 0.3 * reference.max())[::7]
    brain = nib.affines.apply_affine(affine, inside)
    return Series(images, trace, motion, offset, centre, brain)
