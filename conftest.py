"""Session-wide set-up shared by the doctests and the test suite."""

import atexit
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# The example workflows are scripts; tests import them as `realign`, `simulate`, `motion`
sys.path.insert(0, str(Path(__file__).parent / 'workflows'))

# The pydra front-end, its page and its tests need the `pydra` extra; CI installs it, and
# there a missing pydra fails (collection errors) instead of skipping.
collect_ignore_glob = []
if importlib.util.find_spec('pydra') is None and os.environ.get('CI') != 'true':
    collect_ignore_glob += ['nipype_nibtrack/pydra/*', 'docs/pydra.rst', 'tests/*pydra*.py']

# Doctests and tests write dirty images to a store of their own, never the user's.
_STORE = tempfile.mkdtemp(prefix='nibtrack-test-store-')
atexit.register(shutil.rmtree, _STORE, ignore_errors=True)
os.environ['NIBTRACK_STORE'] = _STORE

# nipype binds its log handlers to sys.stdout at import: import it before any doctest
# swaps sys.stdout, so that log lines do not land in the doctests' expected output.
import nipype  # noqa: E402, F401

import nipype_nibtrack  # noqa: E402, F401


def _fingerprints(folder: Path) -> dict[str, str]:
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob('*'))
        if path.is_file()
    }


@pytest.fixture(scope='session', autouse=True)
def source_files_untouched():
    """Every source file nibabel ships is byte-identical after the whole session."""
    from nibabel.testing import data_path

    before = _fingerprints(Path(data_path))
    yield
    after = _fingerprints(Path(data_path))
    changed = sorted(k for k in before if before[k] != after.get(k))
    assert not changed, f'source files modified by the tests: {changed}'
