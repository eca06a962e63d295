#!/usr/bin/env python
"""Realign a mean functional image computed in memory to an anatomical image on disk.

The example of nibabel's design note "Keeping track of whether images have been
modified since load", as a nipype workflow::

    mean = <mean over time of a 4D series, computed in memory>
    anat = nipype_nibtrack.load('anatomical.nii')
    FLIRT(in_file=mean, reference=anat)

The registration tool is FSL FLIRT when FSL is installed, elastix otherwise; the rest
of the workflow is the same code. The mean image is dirty (it has no file) and goes to
the tool through the content-addressed store; the anatomical image is clean and goes
by its own path. Run twice, the second run writes no file and runs no tool.

Data ship with nibabel (``nibabel/tests/data``): ``example4d.nii.gz`` (EPI,
128x96x24x2) and ``anatomical.nii`` (T1, 33x41x25).

Usage::

    python workflows/realign.py [--tool auto|flirt|elastix] [--plugin Linear|MultiProc|SLURM]
                                [--base-dir DIR] [--runs N]
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nipype import Node, Workflow
from nipype.interfaces import elastix, fsl
from nipype.interfaces.utility import IdentityInterface

import nipype_nibtrack as nt

# nibabel's own test data; nibabel.testing would import pytest, which a demo lacks
DATA = Path(nib.__file__).parent / 'tests' / 'data'
PARAMETERS = Path(__file__).resolve().with_name('elastix_rigid.txt')
TOOLS = ('auto', 'flirt', 'elastix')
PLUGINS = ('Linear', 'MultiProc', 'SLURM', 'SLURMGraph')


def mean_functional(series: Any) -> nib.Nifti1Image:
    """The mean over time of a 4D image, computed in memory (float32, no file)."""
    mean = np.asanyarray(series.dataobj, dtype=np.float32).mean(axis=3)
    header = series.header.copy()
    header.set_data_dtype(np.float32)
    return nib.Nifti1Image(mean, series.affine, header)


def pick_tool(tool: str = 'auto') -> str:
    """``flirt`` when FSL's ``flirt`` is on the PATH (for ``auto``), else ``elastix``."""
    if tool not in TOOLS:
        raise ValueError(f'tool must be one of {TOOLS}, not {tool!r}')
    if tool == 'auto':
        return 'flirt' if shutil.which('flirt') else 'elastix'
    return tool


def registration_node(tool: str, name: str = 'register') -> tuple[Node, str, str]:
    """The image-aware registration node, its moving-image and reference input names."""
    if tool == 'flirt':
        flirt = nt.accept_images(fsl.FLIRT)(dof=6, cost='mutualinfo', output_type='NIFTI_GZ')
        return Node(flirt, name=name), 'in_file', 'reference'
    registration = nt.accept_images(elastix.Registration)(
        parameters=[str(PARAMETERS)], num_threads=2
    )
    return Node(registration, name=name), 'moving_image', 'fixed_image'


def build_workflow(
    moving: Any,
    reference: Any,
    *,
    tool: str = 'auto',
    base_dir: str | os.PathLike | None = None,
    name: str = 'realign',
) -> Workflow:
    """A workflow registering ``moving`` to ``reference`` (images or paths).

    Examples
    --------
    >>> wf = build_workflow(DATA / 'anatomical.nii', DATA / 'anatomical.nii', tool='flirt')
    >>> sorted(n.name for n in wf._graph.nodes())
    ['inputnode', 'register']
    """
    inputnode = Node(IdentityInterface(fields=['moving', 'reference']), name='inputnode')
    inputnode.inputs.moving = moving
    inputnode.inputs.reference = reference
    register, moving_field, reference_field = registration_node(pick_tool(tool))
    workflow = Workflow(name=name, base_dir=str(base_dir) if base_dir else None)
    workflow.connect(
        [(inputnode, register, [('moving', moving_field), ('reference', reference_field)])]
    )
    return workflow


def plugin_args(plugin: str) -> dict:
    """Arguments for nipype's plugins; SLURM jobs go to the ``debug`` partition."""
    if plugin.startswith('SLURM'):
        # nipype's SLURM plugin names jobs after $LOGNAME, unset in many batch shells
        os.environ.setdefault('LOGNAME', getpass.getuser())
        return {'sbatch_args': os.environ.get('NIBTRACK_SBATCH_ARGS', '-p debug -t 10')}
    if plugin == 'MultiProc':
        return {'n_procs': 2}
    return {}


def _result_files(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob('result_*.pklz')}


def _store_files(store: nt.Store) -> int:
    return store.info().files


def run(workflow: Workflow, plugin: str = 'Linear') -> dict:
    """Run ``workflow`` once and report what ran, what was cached and what was written."""
    root = Path(workflow.base_dir) / workflow.name
    store = nt.get_store()
    before, files_before = _result_files(root), _store_files(store)
    start = time.perf_counter()
    graph = workflow.run(plugin=plugin, plugin_args=plugin_args(plugin))
    elapsed = time.perf_counter() - start
    after = _result_files(root)
    nodes = {}
    for node in graph.nodes():
        result = node.result
        ran = any(before.get(f) != t for f, t in after.items() if f.startswith(node.output_dir()))
        duration = getattr(result.runtime, 'duration', None) if result else None
        nodes[node.fullname] = ('ran', duration) if ran else ('cached', None)
    return {
        'seconds': elapsed,
        'nodes': nodes,
        'store_files_written': _store_files(store) - files_before,
        'graph': graph,
    }


def report(index: int, outcome: dict) -> str:
    lines = [f'run {index}: {outcome["seconds"]:.1f} s']
    for name, (state, duration) in sorted(outcome['nodes'].items()):
        extra = f' ({duration:.1f} s)' if duration else ''
        lines.append(f'  node {name}: {state}{extra}')
    lines.append(f'  image files written to the store: {outcome["store_files_written"]}')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tool', choices=TOOLS, default='auto')
    parser.add_argument('--plugin', choices=PLUGINS, default='Linear')
    parser.add_argument('--base-dir', help='work directory (default: a new temporary one)')
    parser.add_argument('--runs', type=int, default=2, help='how many times to run (2)')
    args = parser.parse_args(argv)

    tool = pick_tool(args.tool)
    if tool == 'elastix' and not shutil.which('elastix'):
        print(
            'elastix is not installed: run `sudo apt-get install elastix` (Debian/Ubuntu), '
            'or install FSL and use --tool flirt',
            file=sys.stderr,
        )
        return 1
    base_dir = Path(args.base_dir or tempfile.mkdtemp(prefix='nibtrack-realign-')).absolute()
    anat = nt.load(DATA / 'anatomical.nii')
    mean = mean_functional(nib.load(DATA / 'example4d.nii.gz'))
    print(f'tool: {tool}; plugin: {args.plugin}; work directory: {base_dir}')
    print(f'store: {nt.get_store().root}')
    print(f'mean functional: {nt.dirty_reason(mean) or "clean"}')
    print(f'anatomical: {nt.dirty_reason(anat) or "clean"}')
    workflow = build_workflow(mean, anat, tool=tool, base_dir=base_dir)
    for index in range(1, args.runs + 1):
        print(report(index, run(workflow, args.plugin)), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
