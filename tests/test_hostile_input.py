"""Hostile and unusual input: each kind ends in a clear error or a correct result.

The cases live in ``tests/reliability_checks.py`` (group ``input``), shared with
``benchmarks/reliability_report.py``. A case either raises inside the check (the
promise is broken) or returns what came out: the error a user sees, or how the image
was resolved; every result is compared with what the image holds, bit for bit.
"""

from __future__ import annotations

import shutil

import pytest

from tests.reliability_checks import checks, run_under_pytest

QUICK = [c for c in checks('input') if not c.slow]
SLOW = [c for c in checks('input') if c.slow]


@pytest.mark.parametrize('chk', QUICK, ids=lambda c: c.name)
def test_hostile_input(chk, tmp_path):
    outcome = run_under_pytest(chk, tmp_path)
    assert outcome.text


def test_at_least_25_kinds():
    assert len(checks('input')) >= 25


@pytest.mark.parametrize('chk', SLOW, ids=lambda c: c.name)
def test_image_over_2_gib_travels_as_a_path(chk, tmp_path):
    """nipype issue 2924: MultiProc fails pickling objects over 2 GiB. A 2.15 GB image
    (sparse on disk) crosses to a worker as a store path; every voxel is compared."""
    free = shutil.disk_usage(tmp_path).free
    if free < 6 * 2**30:
        pytest.skip(f'needs 6 GiB free in {tmp_path}, has {free / 2**30:.1f}')
    outcome = run_under_pytest(chk, tmp_path)
    assert 'every voxel equal' in outcome.text
    assert list(tmp_path.iterdir()) == []  # the 2 GB store entry and source are gone
