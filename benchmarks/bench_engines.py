"""Benchmark of the layering: the core's import cost against nibabel's, and pydra jobs.

Run ``python benchmarks/bench_engines.py`` (``--repeats N``, default 15). Every number
is measured in this run, on this machine:

- ``import nipype_nibtrack`` against ``import nibabel``, each timed inside fresh
  interpreters run back to back in pairs, from compiled bytecode (the goal: the median
  of the pairs' ratios at most 1.10; the medians and the fastest of each are shown). The core
  imports no workflow engine, and every engine module found in ``sys.modules`` after the
  import is listed (none is expected);
- with pydra installed: the size of the job pydra's cf worker unpickles, and of
  ``cloudpickle.dumps`` of the task, for a 64 MiB in-memory image input (goal: < 20 KB).

Prints a table, exits 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile

ENGINES = ('nipype', 'pydra', 'traits', 'fileformats', 'cloudpickle', 'networkx')

_TIMED = """
import sys, time
start = time.perf_counter()
import {module}
elapsed = time.perf_counter() - start
engines = sorted(m for m in sys.modules if m.split('.')[0] in {engines!r})
print(elapsed, ','.join(engines))
"""


#: Both sides run from compiled bytecode, as in any install: cached under a prefix of
#: our own (PYTHONDONTWRITEBYTECODE would leave one side compiling its source every time)
_ENV = {k: v for k, v in os.environ.items() if k != 'PYTHONDONTWRITEBYTECODE'}
_ENV['PYTHONPYCACHEPREFIX'] = tempfile.mkdtemp(prefix='nibtrack-bench-pycache-')


def import_time(module: str) -> tuple[float, str]:
    """Seconds ``import module`` takes in a fresh interpreter, and the engines it loaded."""
    code = _TIMED.format(module=module, engines=ENGINES)
    out = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True, check=True, env=_ENV
    ).stdout.split()
    return float(out[0]), out[1] if len(out) > 1 else ''


def measure_imports(repeats: int) -> dict[str, float | str]:
    """Median import times, interleaved so that machine load hits both alike."""
    times: dict[str, list[float]] = {'nibabel': [], 'nipype_nibtrack': []}
    engines = ''
    for module in times:  # warm the file cache, write the bytecode
        import_time(module)
    for _ in range(repeats):
        for module in times:
            seconds, loaded = import_time(module)
            times[module].append(seconds)
            if module == 'nipype_nibtrack':
                engines = engines or loaded
    nibabel = statistics.median(times['nibabel'])
    ours = statistics.median(times['nipype_nibtrack'])
    # each pair ran back to back, under the same load: the median of their ratios
    pairs = [b / a for a, b in zip(times['nibabel'], times['nipype_nibtrack'], strict=True)]
    return {
        'nibabel': nibabel,
        'ours': ours,
        'ratio': statistics.median(pairs),
        'best': min(times['nipype_nibtrack']) / min(times['nibabel']),
        'engines': engines,
    }


def measure_pydra_job() -> dict[str, int] | None:
    """Pickled sizes of a python task holding a 64 MiB in-memory image, and of its job."""
    if importlib.util.find_spec('pydra') is None:
        return None
    import cloudpickle
    import nibabel as nib
    import numpy as np
    import pydra.workers.cf as cf_worker

    import nipype_nibtrack.pydra  # noqa: F401

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
    from tests import pydra_tasks

    data = np.random.default_rng(0).random((256, 256, 256), dtype='f4')
    img = nib.Nifti1Image(data, np.eye(4))
    task = pydra_tasks.AnyImageSum(img=img)
    sizes = {'image bytes': data.nbytes, 'task pickle': len(cloudpickle.dumps(task))}
    jobs: list[int] = []

    class Recording:
        def __getattr__(self, name: str):
            return getattr(cloudpickle, name)

        @staticmethod
        def dumps(obj, *args, **kwargs):
            pickled = cloudpickle.dumps(obj, *args, **kwargs)
            jobs.append(len(pickled))
            return pickled

    cf_worker.cp = Recording()
    with tempfile.TemporaryDirectory() as cache:
        task(cache_root=cache, worker='cf')
    cf_worker.cp = cloudpickle
    sizes['cf job pickle'] = max(jobs)
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=15)
    args = parser.parse_args()
    os.environ.setdefault('NIBTRACK_STORE', tempfile.mkdtemp(prefix='nibtrack-bench-'))

    imports = measure_imports(args.repeats)
    print(f'Import time, median of {args.repeats} fresh interpreters')
    print(f'  import nibabel          {imports["nibabel"] * 1e3:8.1f} ms')
    print(f'  import nipype_nibtrack  {imports["ours"] * 1e3:8.1f} ms')
    print(f'  ratio, median of pairs  {imports["ratio"]:8.3f}   (goal <= 1.10)')
    print(f'  ratio of the fastest    {imports["best"]:8.3f}')
    print(f'  engine modules loaded   {imports["engines"] or "none"}')

    job = measure_pydra_job()
    if job is None:
        print('pydra is not installed: no job sizes')
    else:
        print('pydra, a python task with a 64 MiB in-memory image input')
        for what, size in job.items():
            print(f'  {what:<22}  {size:>12,} bytes')
    return 0


if __name__ == '__main__':
    sys.exit(main())
