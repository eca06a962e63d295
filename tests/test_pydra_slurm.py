"""pydra's slurm worker on the one-node cluster of ``.ci/slurm-up.sh``.

pydra's worker learns how a job ended from ``sacct``, so the cluster keeps accounting
(slurmdbd on a local MariaDB, both started by the script). Jobs import
``tests.pydra_tasks``, so the repository root goes on their ``PYTHONPATH`` (sbatch
passes the environment on).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests import pydra_tasks as tasks
from tests.test_slurm import _cluster_up

ROOT = Path(__file__).resolve().parent.parent
JOB_LIMIT = 20_000

pytestmark = pytest.mark.slow


def _no_accounting() -> str | None:
    sacct = subprocess.run(['sacct', '-n', '-X'], capture_output=True, text=True)
    if sacct.returncode != 0:
        seen = sacct.stderr.strip() or sacct.stdout.strip()
        return f'sacct fails ({seen}); run sudo bash .ci/slurm-up.sh, which starts slurmdbd'
    return None


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """A cache root and a store every job reads; sacct answers; our tree importable."""
    problem = _cluster_up() or _no_accounting()
    if problem:
        if os.environ.get('CI') == 'true':
            pytest.fail(problem)
        pytest.skip(problem)
    path = [str(ROOT), *filter(None, os.environ.get('PYTHONPATH', '').split(os.pathsep))]
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(path))
    monkeypatch.setenv('NIBTRACK_STORE', str(tmp_path / 'store'))
    log = tmp_path / 'runs.log'
    monkeypatch.setenv(tasks.RUN_LOG, str(log))
    return tmp_path / 'cache', log


def _job_pickles(cache: Path) -> list[Path]:
    return sorted(cache.glob('*_scripts/*/_job.pklz'))


def test_slurm_jobs_carry_references_and_return_images(slurm):
    cache, log = slurm
    data = np.random.default_rng(1).random((256, 256, 256), dtype='f4')  # 64 MiB
    img = nib.Nifti1Image(data, np.eye(4))

    total = tasks.AnyImageSum(img=img)(cache_root=cache, worker='slurm').out
    assert total == pytest.approx(float(data.astype('f8').sum()), rel=1e-6)
    (job,) = _job_pickles(cache)
    assert job.stat().st_size < JOB_LIMIT, job.stat().st_size

    # the worker wrote the returned image to the shared store; it came back as a file
    out = tasks.Scaled(img=img, factor=0.5)(cache_root=cache, worker='slurm').out
    assert Path(out.get_filename()).is_relative_to(os.environ['NIBTRACK_STORE'])
    np.testing.assert_array_equal(out.get_fdata(dtype='f4'), data * np.float32(0.5))
    assert all(p.stat().st_size < JOB_LIMIT for p in _job_pickles(cache))

    # an equal image, a new object: pydra's cache serves it (a job still goes to sbatch:
    # the cache is checked inside it)
    again = nib.Nifti1Image(data.copy(), np.eye(4))
    assert tasks.AnyImageSum(img=again)(cache_root=cache, worker='slurm').out == total
    assert [line.split()[0] for line in log.read_text().splitlines()] == [
        'any_image_sum',
        'scaled',
    ]
    # each ran in a batch job, not here
    assert all(int(line.split()[1]) != os.getpid() for line in log.read_text().splitlines())
