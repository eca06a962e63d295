"""Benchmark: nipype workflows fed in-memory images, with and without nipype_nibtrack.

Run with ``python benchmarks/bench_nipype.py``. Prints the ratios measured in this run
and exits 0; the targets are printed next to them.

1. Cached reruns. A workflow of ten nodes, each smoothing one in-memory 128^3 float32
   image (a Python ``BaseInterface`` made image-aware), is run twice: the second run's
   time as a share of the first, and the image files written on the rerun. The same
   workflow written the usual way (each image saved with ``nib.save`` to a fresh
   temporary file before every run) reruns every node, since nipype sees new files: the
   rerun speed-up of ours over it.
2. Pickle bytes per node with a 64 MiB image input: what MultiProc sends a worker
   (``pickle.dumps(deepcopy(node))``) and what ``savepkl`` writes (``_node.pklz``), for
   an image-aware node and a Function node with our hooks, against a Function node in
   plain nipype (measured in a subprocess that never imports nipype_nibtrack).
3. Peak memory (tracemalloc) of deep-copying and running a Function node that takes a
   64 MiB image, with our hooks.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from copy import deepcopy
from pathlib import Path

# A store of our own: the benchmark never writes to the user's store
_TMP = Path(tempfile.mkdtemp(prefix='bench-nipype-'))
os.environ['NIBTRACK_STORE'] = str(_TMP / 'store')
os.environ.setdefault('NIPYPE_NO_ET', '1')

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from nipype import config, logging  # noqa: E402
from nipype.interfaces.base import (  # noqa: E402
    BaseInterface,
    BaseInterfaceInputSpec,
    File,
    TraitedSpec,
    traits,
)
from nipype.interfaces.utility import Function  # noqa: E402
from nipype.pipeline import engine as pe  # noqa: E402
from nipype.utils.filemanip import savepkl  # noqa: E402
from scipy import ndimage  # noqa: E402

import nipype_nibtrack as nt  # noqa: E402

N_NODES = 10
SHAPE = (128, 128, 128)
BIG_SHAPE = (256, 256, 256)  # 64 MiB of float32
MB = 2**20
IMAGE_SUFFIXES = ('.nii', '.nii.gz', '.mgh', '.mgz')

logging.getLogger('nipype.workflow').setLevel('WARNING')
logging.getLogger('nipype.interface').setLevel('WARNING')


class SmoothInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc='image to smooth')
    sigma = traits.Float(1.0, usedefault=True, desc='Gaussian sigma in voxels')


class SmoothOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc='smoothed image')


class Smooth(BaseInterface):
    """Gaussian smoothing written in Python: reads a file, writes a file."""

    input_spec = SmoothInputSpec
    output_spec = SmoothOutputSpec

    def _out(self) -> str:
        return os.path.abspath('smoothed.nii')

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.in_file)
        data = ndimage.gaussian_filter(np.asanyarray(img.dataobj, 'f4'), self.inputs.sigma)
        nib.save(nib.Nifti1Image(data, img.affine), self._out())
        return runtime

    def _list_outputs(self):
        return {'out_file': self._out()}


def images(n: int, shape: tuple[int, ...], seed: int = 0) -> list[nib.Nifti1Image]:
    rng = np.random.default_rng(seed)
    return [
        nib.Nifti1Image(rng.standard_normal(shape, dtype='f4'), np.diag([2.0, 2, 2, 1]))
        for _ in range(n)
    ]


def image_states(*folders: Path) -> dict[str, int]:
    out = {}
    for folder in folders:
        for path in folder.rglob('*'):
            if path.is_file() and path.name.endswith(IMAGE_SUFFIXES):
                out[str(path)] = path.stat().st_mtime_ns
    return out


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def workflow(base: Path, name: str, interface, inputs: list) -> pe.Workflow:
    wf = pe.Workflow(name, base_dir=str(base))
    wf.config['execution']['create_report'] = False
    wf.add_nodes(
        [pe.Node(interface(in_file=value), name=f'smooth{i}') for i, value in enumerate(inputs)]
    )
    return wf


# ---------------------------------------------------------------- 1. cached reruns


def bench_reruns() -> dict:
    imgs = images(N_NODES, SHAPE)
    aware = nt.accept_images(Smooth)
    work = _TMP / 'reruns'
    store = Path(os.environ['NIBTRACK_STORE'])
    work.mkdir()
    store.mkdir(exist_ok=True)

    ours = workflow(work, 'ours', aware, imgs)
    t_first = timed(lambda: ours.run())
    before = image_states(store, work)
    t_second = timed(lambda: ours.run())
    writes = [p for p, m in image_states(store, work).items() if before.get(p) != m]

    def usual_run() -> None:
        # the usual way: save every image to a fresh temporary file, then run
        folder = Path(tempfile.mkdtemp(dir=_TMP))
        paths = []
        for i, img in enumerate(imgs):
            path = str(folder / f'input{i}.nii')
            nib.save(img, path)
            paths.append(path)
        workflow(work, 'usual', Smooth, paths).run()

    u_first = timed(usual_run)
    u_second = timed(usual_run)
    return {
        'ours_first_s': t_first,
        'ours_rerun_s': t_second,
        'rerun_pct_of_first': 100 * t_second / t_first,
        'rerun_image_writes': len(writes),
        'usual_first_s': u_first,
        'usual_rerun_s': u_second,
        'rerun_speedup_vs_usual': u_second / t_second,
    }


# ---------------------------------------------------------------- 2. pickle bytes


def _add_one(img):
    import nibabel as nib

    return nib.Nifti1Image(img.get_fdata(dtype='f4') + 1, img.affine)


def _function_node(img) -> pe.Node:
    node = pe.Node(
        Function(input_names=['img'], output_names=['out'], function=_add_one), name='add_one'
    )
    node.inputs.img = img
    return node


def _savepkl_bytes(obj) -> int:
    path = str(_TMP / 'measure.pklz')
    savepkl(path, obj)
    size = os.path.getsize(path)
    os.unlink(path)
    return size


PLAIN_NIPYPE = """
import json, os, pickle, sys, tempfile
from copy import deepcopy
import nibabel as nib, numpy as np
from nipype.interfaces.utility import Function
from nipype.pipeline import engine as pe
from nipype.utils.filemanip import savepkl

def _add_one(img):
    import nibabel as nib
    return nib.Nifti1Image(img.get_fdata(dtype='f4') + 1, img.affine)

shape = tuple(json.loads(sys.argv[1]))
img = nib.Nifti1Image(np.random.default_rng(1).standard_normal(shape, dtype='f4'),
                      np.diag([2.0, 2, 2, 1]))
node = pe.Node(Function(input_names=['img'], output_names=['out'], function=_add_one),
               name='add_one')
node.inputs.img = img
submission = len(pickle.dumps(deepcopy(node)))
path = os.path.join(tempfile.mkdtemp(), '_node.pklz')
savepkl(path, node)
node_pklz = os.path.getsize(path)

import gc, tracemalloc
from nipype import logging
logging.getLogger('nipype.workflow').setLevel('WARNING')
wf = pe.Workflow('memory', base_dir=tempfile.mkdtemp())
wf.config['execution']['create_report'] = False
wf.add_nodes([node])
tracemalloc.start()
wf.run()
run_peak = tracemalloc.get_traced_memory()[1]
gc.collect()  # nipype's graph copies form reference cycles
tracemalloc.reset_peak()
wf.run()
rerun_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
assert 'nipype_nibtrack' not in sys.modules
print(json.dumps({'submission': submission, 'node_pklz': node_pklz,
                  'run_peak': run_peak, 'rerun_peak': rerun_peak}))
"""


def bench_pickles() -> dict:
    (img,) = images(1, BIG_SHAPE, seed=1)
    aware = pe.Node(nt.accept_images(Smooth)(in_file=img), name='smooth')
    function = _function_node(img)
    out = {
        'image_MiB': img.dataobj.nbytes / MB,
        'ours_aware_submission': len(pickle.dumps(deepcopy(aware))),
        'ours_aware_node_pklz': _savepkl_bytes(aware),
        'ours_function_submission': len(pickle.dumps(deepcopy(function))),
        'ours_function_node_pklz': _savepkl_bytes(function),
    }
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    script = _TMP / 'plain_nipype.py'  # a file: Function needs the function's source
    script.write_text(textwrap.dedent(PLAIN_NIPYPE))
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(BIG_SHAPE)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode:
        raise RuntimeError(f'the plain-nipype measurement failed:\n{proc.stderr}')
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    out['plain_function_submission'] = plain['submission']
    out['plain_function_node_pklz'] = plain['node_pklz']
    out['plain_function_run_peak_MiB'] = plain['run_peak'] / MB
    out['plain_function_rerun_peak_MiB'] = plain['rerun_peak'] / MB
    return out


# ---------------------------------------------------------------- 3. peak memory


def bench_memory() -> dict:
    (img,) = images(1, BIG_SHAPE, seed=2)
    node = _function_node(img)
    tracemalloc.start()
    deepcopy(node)
    copy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    wf = pe.Workflow('memory', base_dir=str(_TMP / 'memory'))
    wf.config['execution']['create_report'] = False
    wf.add_nodes([_function_node(img)])
    tracemalloc.start()
    wf.run()
    run_peak = tracemalloc.get_traced_memory()[1]
    gc.collect()  # nipype's graph copies form reference cycles: count live memory only
    tracemalloc.reset_peak()
    wf.run()
    rerun_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    result = _TMP / 'memory' / 'memory' / 'add_one' / 'result_add_one.pklz'
    return {
        'image_MiB': img.dataobj.nbytes / MB,
        'function_deepcopy_peak_MiB': copy_peak / MB,
        'function_workflow_run_peak_MiB': run_peak / MB,
        'function_workflow_rerun_peak_MiB': rerun_peak / MB,
        'function_result_pklz_bytes': result.stat().st_size,
        'function_result_pklz_unzipped_bytes': len(gzip.open(result).read()),
    }


def main() -> int:
    config.set('execution', 'hash_method', 'timestamp')
    try:
        r = bench_reruns()
        print(f'1. Cached reruns: {N_NODES} nodes, {N_NODES} in-memory {SHAPE} float32 images')
        print(f'   ours  first run   {r["ours_first_s"]:8.3f} s')
        print(
            f'   ours  rerun       {r["ours_rerun_s"]:8.3f} s  = '
            f'{r["rerun_pct_of_first"]:.1f}% of the first run (target <= 5%)'
        )
        print(f'   image files written on the rerun: {r["rerun_image_writes"]} (must be 0)')
        print(f'   usual first run   {r["usual_first_s"]:8.3f} s  (nib.save to fresh files)')
        print(f'   usual rerun       {r["usual_rerun_s"]:8.3f} s  (every node reruns)')
        print(
            f'   rerun speed-up, ours vs usual: {r["rerun_speedup_vs_usual"]:.1f}x (target >= 20x)'
        )

        p = bench_pickles()
        print(f'2. Pickle bytes per node, {p["image_MiB"]:.0f} MiB image input')
        print(
            f'   ours, image-aware node:  MultiProc submission {p["ours_aware_submission"]:>11,d}'
            f'   _node.pklz {p["ours_aware_node_pklz"]:>11,d}'
        )
        print(
            f'   ours, Function node:     MultiProc submission '
            f'{p["ours_function_submission"]:>11,d}   _node.pklz '
            f'{p["ours_function_node_pklz"]:>11,d}'
        )
        print(
            f'   plain nipype, Function:  MultiProc submission '
            f'{p["plain_function_submission"]:>11,d}   _node.pklz '
            f'{p["plain_function_node_pklz"]:>11,d}'
        )
        print(
            f'   ratio plain/ours (Function submission): '
            f'{p["plain_function_submission"] / p["ours_function_submission"]:,.0f}x'
        )

        m = bench_memory()
        print(f'3. Peak memory (tracemalloc) with a {m["image_MiB"]:.0f} MiB image, Function node')
        print(f'   deepcopy of the node         {m["function_deepcopy_peak_MiB"]:8.1f} MiB')
        print(
            f'   Linear run of the workflow   {m["function_workflow_run_peak_MiB"]:8.1f} MiB'
            f'   (plain nipype {p["plain_function_run_peak_MiB"]:.1f} MiB)'
        )
        print(
            f'   second run of the workflow   {m["function_workflow_rerun_peak_MiB"]:8.1f} MiB'
            f'   (plain nipype {p["plain_function_rerun_peak_MiB"]:.1f} MiB)'
        )
        print(
            f'   result pickle {m["function_result_pklz_bytes"]:,d} bytes '
            f'({m["function_result_pklz_unzipped_bytes"]:,d} unzipped)'
        )
    finally:
        shutil.rmtree(_TMP, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
