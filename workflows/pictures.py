"""The two pictures of the realignment: motion traces, and the functional on the anatomy.

Both are drawn without a display (matplotlib's Agg backend) and written as PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ['coregistration_png', 'motion_png']

_AXES = ('x', 'y', 'z')
_COLOURS = ('tab:red', 'tab:green', 'tab:blue')


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def motion_png(estimated: Any, truth: Any, out_file: str | Path, tool: str = 'elastix') -> str:
    """Translations and rotations per volume, estimated (solid) against true (dashed).

    The plot MCFLIRT and SPM users know, with the truth drawn under the estimate.

    >>> import tempfile, os
    >>> truth = np.outer(np.arange(4), [0.1, 0.2, -0.1, 0.3, 0.0, -0.2])
    >>> path = motion_png(truth + 0.01, truth, os.path.join(tempfile.mkdtemp(), 'm.png'))
    >>> open(path, 'rb').read(8) == b'\\x89PNG\\r\\n\\x1a\\n'
    True
    """
    plt = _pyplot()
    estimated, truth = np.asarray(estimated, float), np.asarray(truth, float)
    volumes = np.arange(len(truth))
    fig, panels = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True, constrained_layout=True)
    for panel, columns, unit, label in (
        (panels[0], slice(0, 3), 'mm', 'translation'),
        (panels[1], slice(3, 6), 'degrees', 'rotation'),
    ):
        for axis, colour, est, true in zip(
            _AXES, _COLOURS, estimated[:, columns].T, truth[:, columns].T, strict=True
        ):
            panel.plot(volumes, true, '--', color=colour, lw=2.5, alpha=0.35)
            panel.plot(volumes, est, '-o', color=colour, lw=1.3, ms=3.5, label=f'{axis}')
        panel.axhline(0, color='0.6', lw=0.6)
        panel.set_ylabel(f'{label} ({unit})')
        panel.grid(alpha=0.25)
    handles, labels = panels[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color='0.3', ls='--', lw=2.5, alpha=0.5))
    labels.append('true')
    panels[0].legend(handles, labels, ncol=4, loc='upper left', fontsize=9, frameon=False)
    panels[1].set_xlabel('volume')
    panels[1].set_xticks(volumes)
    error = np.abs(estimated - truth)
    fig.suptitle(
        f'Head motion estimated by {tool} (solid) against the truth (dashed)\n'
        f'largest parameter difference {error[:, :3].max():.2f} mm, '
        f'{error[:, 3:].max():.2f} deg',
        fontsize=11,
    )
    fig.savefig(out_file, dpi=110)
    plt.close(fig)
    return str(Path(out_file).absolute())


def _plane(view: str, cut: float, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, tuple]:
    """World points (rows, cols, 3) of a 1 mm slice, and its extent for ``imshow``."""
    horizontal, vertical = {'sagittal': (1, 2), 'coronal': (0, 2), 'axial': (0, 1)}[view]
    fixed = {'sagittal': 0, 'coronal': 1, 'axial': 2}[view]
    h = np.arange(lo[horizontal], hi[horizontal] + 1)
    v = np.arange(lo[vertical], hi[vertical] + 1)
    points = np.zeros((len(v), len(h), 3))
    points[..., horizontal] = h[None, :]
    points[..., vertical] = v[:, None]
    points[..., fixed] = cut
    return points, (h[0], h[-1], v[0], v[-1])


def _sample(img_data: np.ndarray, affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    voxels = points @ np.linalg.inv(affine)[:3, :3].T + np.linalg.inv(affine)[:3, 3]
    flat = voxels.reshape(-1, 3).T
    return ndimage.map_coordinates(img_data, flat, order=1, cval=0.0).reshape(points.shape[:2])


def coregistration_png(
    mean: Any,
    anatomical: Any,
    to_functional: Any,
    out_file: str | Path,
    tool: str = 'elastix',
    cuts: tuple[float, float, float] = (0.0, -18.0, 12.0),
) -> str:
    """The mean functional's outline on the anatomical image, before and after.

    ``to_functional`` is the registration's world matrix from anatomical to functional
    coordinates; "after" is the mean image with its affine corrected by it (no
    resampling of the functional data). Slices are taken in world coordinates
    (``cuts``: x, y, z in mm), left hemisphere on the left.

    >>> import tempfile, os, nibabel as nib
    >>> anat = nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 40)), np.eye(4))
    >>> out = os.path.join(tempfile.mkdtemp(), 'c.png')
    >>> path = coregistration_png(anat, anat, np.eye(4), out, cuts=(20, 20, 20))
    >>> open(path, 'rb').read(4) == b'\\x89PNG'
    True
    """
    plt = _pyplot()
    anatomical = nib.load(anatomical) if isinstance(anatomical, (str, Path)) else anatomical
    anat = np.asanyarray(anatomical.dataobj, dtype=np.float32)
    functional = np.asanyarray(mean.dataobj, dtype=np.float32)
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    world = nib.affines.apply_affine(anatomical.affine, corners * (np.array(anat.shape) - 1))
    lo, hi = np.floor(world.min(axis=0)), np.ceil(world.max(axis=0))
    top = np.percentile(functional, 99.5)
    levels = [0.3 * top, 0.75 * top]
    rows = (
        ('before: the mean functional where its header puts it', mean.affine),
        (
            f'after: registered to the anatomical image by {tool}',
            np.linalg.inv(np.asarray(to_functional, dtype=float)) @ mean.affine,
        ),
    )
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.6), facecolor='black')
    anat_top = 1.15 * np.percentile(anat, 99.5)
    for (title, affine), panels in zip(rows, axes, strict=True):
        for panel, view, cut in zip(panels, ('sagittal', 'coronal', 'axial'), cuts, strict=True):
            points, extent = _plane(view, cut, lo, hi)
            panel.imshow(
                _sample(anat, anatomical.affine, points),
                cmap='gray',
                origin='lower',
                extent=extent,
                vmin=0,
                vmax=anat_top,
            )
            panel.contour(
                _sample(functional, affine, points),
                levels=levels,
                colors=['#ff3030', '#ffd400'],
                linewidths=1.0,
                origin='lower',
                extent=extent,
            )
            panel.set_axis_off()
            axis = 'xyz'[('sagittal', 'coronal', 'axial').index(view)]
            panel.text(0.02, 0.02, f'{axis}={cut:g}', color='w', transform=panel.transAxes)
            if view != 'sagittal':
                panel.text(0.02, 0.92, 'L', color='w', transform=panel.transAxes)
                panel.text(0.93, 0.92, 'R', color='w', transform=panel.transAxes)
        panels[1].set_title(title, color='w', fontsize=12)
    fig.text(
        0.5,
        0.015,
        'outline of the mean functional (red: brain edge, yellow: white-matter edge) '
        'on the anatomical image',
        color='0.8',
        ha='center',
        fontsize=9,
    )
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.05, wspace=0.02, hspace=0.12)
    fig.savefig(out_file, dpi=100, facecolor='black')
    plt.close(fig)
    return str(Path(out_file).absolute())
