"""Rigid motion in one stated convention, what registration tools write, and errors.

**The convention.** A rigid motion is a 4x4 matrix in world coordinates (nibabel's
RAS+, millimetres) and six numbers ``(tx, ty, tz, rx, ry, rz)``::

    x' = R (x - c) + c + t        R = Rz(rz) @ Ry(ry) @ Rx(rx)

rotations in degrees about the x, y and z axes through a centre ``c`` (x first, then
y, then z), translations in mm (the displacement of ``c``). For head motion the matrix
maps where a point of the head was in the reference volume to where it is in volume
``v``; ``c`` is the centre of the reference volume's field of view.

A registration tool maps points of its fixed (reference) image to its moving image,
which is the same direction, so its transform converted to world RAS coordinates *is*
the head motion. Estimates are never compared with the truth parameter by parameter:
:func:`residual` composes the estimate's inverse with the true motion and reports how
far that leftover motion moves any point of the brain and its rotation angle.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    'CONVENTION',
    'from_elastix',
    'from_flirt',
    'parameters',
    'read_transform',
    'residual',
    'rigid',
]

CONVENTION = (
    'x, y, z translations (mm) and rotations (degrees) about axes through the centre of '
    'the reference volume, applied x then y then z, in world RAS+ coordinates'
)
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # ITK works in LPS, nibabel in RAS


def _rotation(rx: float, ry: float, rz: float, order: str) -> np.ndarray:
    """The product of the axis rotations (radians), leftmost factor first in ``order``."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    factors = {
        'x': np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]),
        'y': np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]),
        'z': np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]),
    }
    out = np.eye(3)
    for axis in order:
        out = out @ factors[axis]
    return out


def _about(rotation: np.ndarray, translation: np.ndarray, centre: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre + translation - rotation @ centre
    return out


def rigid(params: Any, centre: Any = (0, 0, 0)) -> np.ndarray:
    """The 4x4 matrix of six motion parameters (see the module's convention).

    >>> m = rigid((1, 0, 0, 0, 0, 90), centre=(10, 0, 0))
    >>> np.round(m @ [10, 0, 0, 1], 6).tolist(), np.round(m @ [11, 0, 0, 1], 6).tolist()
    ([11.0, 0.0, 0.0, 1.0], [11.0, 1.0, 0.0, 1.0])
    """
    params = np.asarray(params, dtype=float)
    rotation = _rotation(*np.deg2rad(params[3:]), order='zyx')
    return _about(rotation, params[:3], np.asarray(centre, dtype=float))


def parameters(matrix: Any, centre: Any = (0, 0, 0)) -> np.ndarray:
    """The six parameters of a rigid 4x4 matrix, the inverse of :func:`rigid`.

    >>> p = np.array([0.5, -1.2, 2.0, 1.5, -0.7, 0.3])
    >>> bool(np.allclose(parameters(rigid(p, (4, 5, 6)), (4, 5, 6)), p))
    True
    """
    matrix = np.asarray(matrix, dtype=float)
    centre = np.asarray(centre, dtype=float)
    r = matrix[:3, :3]
    rx, ry = np.arctan2(r[2, 1], r[2, 2]), -np.arcsin(np.clip(r[2, 0], -1, 1))
    angles = np.degrees([rx, ry, np.arctan2(r[1, 0], r[0, 0])])
    translation = matrix[:3, 3] - centre + r @ centre
    return np.concatenate([translation, angles])


def from_elastix(transform_file: str | Path) -> np.ndarray:
    """The world RAS matrix (fixed -> moving) of an elastix ``TransformParameters.0.txt``.

    elastix's ``EulerTransform`` stores rotations in radians (ITK's Euler3DTransform:
    ``R = Rz @ Rx @ Ry``), then the translation, about ``CenterOfRotationPoint``, all
    in LPS millimetres.
    """
    text = Path(transform_file).read_text()

    def values(key: str) -> np.ndarray:
        match = re.search(rf'\({key} ([^)]*)\)', text)
        if match is None:
            raise ValueError(f'{transform_file} has no {key}: not an elastix transform file')
        return np.array([float(v) for v in match.group(1).split()])

    if '"EulerTransform"' not in text:
        raise ValueError(f'{transform_file} is not an elastix EulerTransform (rigid) file')
    if '(ComputeZYX "true")' in text:
        raise ValueError(f'{transform_file} uses ComputeZYX, which this reader does not handle')
    params = values('TransformParameters')
    lps = _about(_rotation(*params[:3], order='zxy'), params[3:], values('CenterOfRotationPoint'))
    return _LPS @ lps @ _LPS


def _fsl_scaling(img: Any) -> np.ndarray:
    """FSL's voxel-to-"scaled mm" matrix: voxel sizes, x flipped for a RAS-handed affine."""
    zooms = np.array(img.header.get_zooms()[:3], dtype=float)
    scale = np.diag([*zooms, 1.0])
    if np.linalg.det(img.affine[:3, :3]) > 0:
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1, img.shape[0] - 1
        scale = scale @ flip
    return scale


def from_flirt(matrix_file: str | Path, fixed: Any, moving: Any) -> np.ndarray:
    """The world RAS matrix (fixed -> moving) of a FLIRT ``.mat`` (moving -> fixed, FSL mm).

    >>> import nibabel as nib, tempfile, os
    >>> img = nib.Nifti1Image(np.zeros((10, 12, 8), 'f4'), np.diag([2.0, 2, 2, 1]))
    >>> path = os.path.join(tempfile.mkdtemp(), 'eye.mat')
    >>> np.savetxt(path, np.eye(4))
    >>> bool(np.allclose(from_flirt(path, img, img), np.eye(4)))
    True
    """
    fsl = np.loadtxt(matrix_file)
    world_to_moving = np.linalg.inv(moving.affine)
    moving_to_fixed = fixed.affine @ np.linalg.inv(_fsl_scaling(fixed)) @ fsl
    moving_to_fixed = moving_to_fixed @ _fsl_scaling(moving) @ world_to_moving
    return np.linalg.inv(moving_to_fixed)


def residual(estimated: Any, true: Any, points: Any) -> tuple[float, float]:
    """How far the estimate is from the truth: (largest displacement in mm, angle in deg).

    The leftover motion ``inv(estimated) @ true`` is the identity for a perfect
    estimate; its largest displacement over ``points`` (N x 3, world mm) and its
    rotation angle do not depend on how either motion is parametrised.

    >>> true = rigid((1, 0, 0, 0, 0, 1))
    >>> np.round(residual(true, true, [[0, 0, 0], [50, 0, 0]]), 6).tolist()
    [0.0, 0.0]
    >>> mm, deg = residual(rigid((1, 0, 0, 0, 0, 0)), true, [[0, 0, 0], [50, 0, 0]])
    >>> round(mm, 3), round(deg, 3)  # 1 degree at 50 mm from the axis is 0.873 mm
    (0.873, 1.0)
    """
    leftover = np.linalg.inv(np.asarray(estimated, float)) @ np.asarray(true, float)
    points = np.asarray(points, dtype=float)
    moved = points @ leftover[:3, :3].T + leftover[:3, 3]
    displacement = float(np.linalg.norm(moved - points, axis=1).max())
    cosine = np.clip((np.trace(leftover[:3, :3]) - 1) / 2, -1, 1)
    return displacement, float(np.degrees(np.arccos(cosine)))


def read_transform(tool: str, transform: Any, fixed: Any, moving: Any) -> np.ndarray:
    """The world RAS matrix (fixed -> moving) of ``tool``'s transform output.

    ``transform`` is the node's output: a file, or elastix's list of one file per
    parameter file (the last is the whole transform). ``fixed`` and ``moving`` are the
    images (FSL's matrices are in voxel-scaled coordinates of both).
    """
    if isinstance(transform, (list, tuple)):
        transform = transform[-1]
    if tool == 'elastix':
        return from_elastix(transform)
    if tool == 'flirt':
        return from_flirt(transform, fixed, moving)
    raise ValueError(f'no reader for the transforms of {tool!r}: use elastix or flirt')
