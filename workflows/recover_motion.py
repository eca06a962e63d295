#!/usr/bin/env python
"""Prove the chain end to end: move an image in memory, register it back with elastix.

The anatomical image is loaded from disk (clean: it goes to elastix by its own path).
A copy gets a known rigid motion in memory, by changing its affine (dirty: it goes
through the store). elastix registers the moved copy to the original; the transform it
finds must be the applied motion, to within a stated tolerance. This can only hold if
elastix read exactly what the in-memory images hold.

Usage::

    python workflows/recover_motion.py [--base-dir DIR] [--plugin Linear|MultiProc|SLURM]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

try:
    from realign import DATA, build_workflow, plugin_args
except ImportError:  # imported as workflows.recover_motion
    from .realign import DATA, build_workflow, plugin_args

import nipype_nibtrack as nt

#: Largest accepted error of the recovered motion at the corners of the image (mm)
TOLERANCE_MM = 0.25
#: Largest accepted error of the recovered rotation (degrees)
TOLERANCE_DEG = 0.2
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # ITK works in LPS, nibabel in RAS


def rigid_motion(
    rotation_deg: tuple[float, float, float], translation_mm: tuple[float, float, float]
) -> np.ndarray:
    """A 4x4 world (RAS) motion: rotations about x, y then z, then a translation.

    >>> rigid_motion((0, 0, 90), (1, 0, 0)) @ [1, 0, 0, 1]
    array([1., 1., 0., 1.])
    """
    rx, ry, rz = np.deg2rad(rotation_deg)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    motion = np.eye(4)
    motion[:3, :3] = rot_z @ rot_y @ rot_x
    motion[:3, 3] = translation_mm
    return motion


def moved_copy(img: Any, motion: np.ndarray) -> nib.Nifti1Image:
    """``img`` with the same voxels and ``motion`` applied to its affine (in place)."""
    moved = nib.load(img.get_filename())
    moved.affine[:] = motion @ img.affine  # edit in place: a plain nibabel-loaded image
    return moved


def read_euler(transform_file: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotation angles (rad), translation (mm) and centre (mm, LPS) from elastix output."""
    text = Path(transform_file).read_text()

    def values(key: str) -> np.ndarray:
        match = re.search(rf'\({key} ([^)]*)\)', text)
        if match is None:
            raise ValueError(f'{transform_file} has no {key}')
        return np.array([float(v) for v in match.group(1).split()])

    if 'EulerTransform' not in text:
        raise ValueError(f'{transform_file} is not an EulerTransform')
    params = values('TransformParameters')
    return params[:3], params[3:], values('CenterOfRotationPoint')


def euler_matrix(angles: np.ndarray, translation: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The 4x4 LPS map of ITK's Euler3DTransform: R(x - c) + c + t, R = Rz Rx Ry."""
    cx, sx = np.cos(angles[0]), np.sin(angles[0])
    cy, sy = np.cos(angles[1]), np.sin(angles[1])
    cz, sz = np.cos(angles[2]), np.sin(angles[2])
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rotation = rot_z @ rot_x @ rot_y
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre + translation - rotation @ centre
    return out


@dataclass(frozen=True)
class Recovery:
    """How well the registration recovered the applied motion."""

    corner_error_mm: float
    rotation_error_deg: float
    recovered_ras: np.ndarray

    @property
    def ok(self) -> bool:
        return self.corner_error_mm <= TOLERANCE_MM and self.rotation_error_deg <= TOLERANCE_DEG


def compare(motion: np.ndarray, transform_file: str | Path, reference: Any) -> Recovery:
    """Compare the applied RAS ``motion`` with the transform elastix wrote.

    elastix maps points of the fixed (reference) image to the moving image: a point ``p``
    of the anatomy sits at ``motion @ p`` in the moved image.
    """
    recovered = _LPS @ euler_matrix(*read_euler(transform_file)) @ _LPS
    shape = np.array(reference.shape[:3]) - 1
    corners = np.array([[i, j, k, 1] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    corners[:, :3] *= shape
    world = (reference.affine @ corners.T).T
    error = np.linalg.norm((recovered @ world.T - motion @ world.T)[:3], axis=0).max()
    delta = recovered[:3, :3] @ motion[:3, :3].T
    angle = np.degrees(np.arccos(np.clip((np.trace(delta) - 1) / 2, -1, 1)))
    return Recovery(float(error), float(angle), recovered)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--base-dir', help='work directory (default: a new temporary one)')
    parser.add_argument('--plugin', default='Linear')
    parser.add_argument('--rotation', type=float, nargs=3, default=(0.0, 0.0, 5.0))
    parser.add_argument('--translation', type=float, nargs=3, default=(3.0, 0.0, 0.0))
    args = parser.parse_args(argv)
    base_dir = Path(args.base_dir or tempfile.mkdtemp(prefix='nibtrack-motion-')).absolute()
    reference = nt.load(DATA / 'anatomical.nii')
    motion = rigid_motion(tuple(args.rotation), tuple(args.translation))
    moved = moved_copy(reference, motion)
    print(f'moved image: {nt.dirty_reason(moved)}; reference: {nt.dirty_reason(reference)}')
    workflow = build_workflow(moved, reference, tool='elastix', base_dir=base_dir, name='motion')
    graph = workflow.run(plugin=args.plugin, plugin_args=plugin_args(args.plugin))
    (node,) = [n for n in graph.nodes() if n.name == 'register']
    recovery = compare(motion, node.result.outputs.transform[0], reference)
    print(
        f'recovered motion: corner error {recovery.corner_error_mm:.3f} mm '
        f'(tolerance {TOLERANCE_MM}), rotation error {recovery.rotation_error_deg:.3f} deg '
        f'(tolerance {TOLERANCE_DEG})'
    )
    return 0 if recovery.ok else 1


if __name__ == '__main__':
    sys.exit(main())
