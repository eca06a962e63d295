"""The realignment on a real one-node SLURM cluster (``.ci/slurm-up.sh`` starts it).

The store and the work directory sit on a path every job reads, as they would on a
cluster's shared filesystem; jobs inherit ``NIBTRACK_STORE`` from the submitting shell.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import realign
import simulate

import nipype_nibtrack as nt

PICKLE_LIMIT = 8 * 1024


def _cluster_up() -> str | None:
    if not shutil.which('sbatch') or not shutil.which('sinfo'):
        return 'SLURM is not installed (sudo apt-get install slurm-wlm munge)'
    state = subprocess.run(['sinfo', '-h', '-o', '%T'], capture_output=True, text=True)
    if state.returncode != 0 or ('idle' not in state.stdout and 'mix' not in state.stdout):
        seen = state.stdout.strip() or state.stderr.strip()
        return f'no SLURM node is up ({seen}); run sudo bash .ci/slurm-up.sh'
    return None


@pytest.fixture(scope='module')
def cluster():
    problem = _cluster_up()
    if problem:
        if os.environ.get('CI') == 'true':
            pytest.fail(problem)
        pytest.skip(problem)
    if not shutil.which('elastix'):
        problem = 'elastix is not installed (sudo apt-get install elastix)'
        if os.environ.get('CI') == 'true':
            pytest.fail(problem)
        pytest.skip(problem)
    os.environ.setdefault('LOGNAME', getpass.getuser())


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A work directory and a store every job can read."""
    monkeypatch.setenv('NIBTRACK_STORE', str(tmp_path / 'store'))
    return tmp_path


def _wait_for_jobs(timeout: float = 180) -> None:
    """Graph plugins submit every job with dependencies and return at once."""
    deadline = time.monotonic() + timeout
    while subprocess.run(['squeue', '-h'], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            pytest.fail(f'SLURM jobs still queued after {timeout} s')
        time.sleep(0.5)


def _job_outputs(work: Path) -> list[Path]:
    """Files slurmd wrote for the jobs' stdout (SLURM: slurm-ID.out, SLURMGraph: .sh.o)."""
    return _batch_files(work, 'slurm-*.out') + _batch_files(work, '*.sh.o')


def _batch_files(work: Path, pattern: str) -> list[Path]:
    return sorted(work.rglob(pattern))


@pytest.mark.parametrize('plugin', ['SLURM', 'SLURMGraph'])
def test_realign_through_sbatch_then_rerun_submits_nothing(cluster, shared, plugin):
    series = simulate.functional_series(2)
    anatomical = nt.load(simulate.anatomical_path())
    workflow = realign.build_workflow(series, anatomical, tool='elastix', base_dir=shared / 'work')

    first = realign.run(workflow, plugin)
    _wait_for_jobs()
    found = realign.findings(first['graph'], series, 'elastix', anatomical)
    assert found.ok, found.errors  # the motion came back through the cluster's jobs
    assert all(Path(p).exists() for p in found.pictures)
    coregister = realign.node_result(first['graph'], 'coregister')
    assert coregister.inputs['fixed_image'] == anatomical.get_filename()
    assert coregister.inputs['moving_image'].startswith(str(shared / 'store'))
    assert first['volumes_registered'] == [0, 1]

    # the jobs really went through sbatch: SLURM wrote their output files
    scripts = _batch_files(shared / 'work', 'batchscript_*.sh')
    slurm_out = _job_outputs(shared / 'work')
    assert scripts and slurm_out
    # what crosses to the jobs: the batch pickles, the node and its inputs, which hold
    # the in-memory volumes and the mean image as file references, not as arrays
    pickles = [
        p
        for pattern in ('node_*.pklz', '_node.pklz', '_inputs.pklz')
        for p in _batch_files(shared / 'work', pattern)
    ]
    assert len(pickles) >= 3
    for pickle_file in pickles:
        assert pickle_file.stat().st_size < PICKLE_LIMIT, pickle_file

    second = realign.run(workflow, plugin)
    _wait_for_jobs()
    assert second['nodes_run'] == 0
    assert _batch_files(shared / 'work', 'batchscript_*.sh') == scripts
    assert _job_outputs(shared / 'work') == slurm_out
