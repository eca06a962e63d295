"""The ``nibtrack`` command, run as a subprocess with ``NIBTRACK_STORE`` set."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nipype_nibtrack.cli import main
from nipype_nibtrack.store import Store

DIGESTS = [f'{i:032x}' for i in range(1, 4)]


def _nibtrack() -> list[str]:
    script = Path(sys.executable).with_name('nibtrack')
    if script.exists():  # the installed entry point
        return [str(script)]
    found = shutil.which('nibtrack')
    return [found] if found else [sys.executable, '-m', 'nipype_nibtrack.cli']


def run(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, 'NIBTRACK_STORE': str(root)}
    return subprocess.run(
        [*_nibtrack(), *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def filled(tmp_path) -> Store:
    store = Store(tmp_path / 'store')
    for age, digest in zip((30, 10, 0), DIGESTS, strict=True):
        path, _ = store.put(digest, 'img.nii', lambda p: p.write_bytes(b'x' * 2048))
        when = time.time() - age * 86400
        os.utime(path.parent, (when, when))
    return store


def test_info(filled):
    out = run(filled.root, 'store', 'info')
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f'location: {filled.root}'
    assert lines[1] == 'entries:  3 (3 image files)'
    assert lines[2].startswith('size:     ') and f'({filled.info().bytes} bytes)' in lines[2]


def test_info_of_an_empty_store(tmp_path):
    out = run(tmp_path / 'never-used', 'store', 'info')
    assert out.returncode == 0, out.stderr
    assert 'entries:  0 (0 image files)' in out.stdout


def test_gc_older_than(filled):
    out = run(filled.root, 'store', 'gc', '--older-than', '7')
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith('removed 2 entries')
    assert 'kept 1' in out.stdout and '0 busy' in out.stdout
    assert [filled.entry_dir(d).exists() for d in DIGESTS] == [False, False, True]
    assert 'entries:  1' in run(filled.root, 'store', 'info').stdout


def test_gc_max_bytes(filled):
    per_entry = filled.info().bytes // 3
    out = run(filled.root, 'store', 'gc', '--max-bytes', str(2 * per_entry))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith('removed 1 entries')
    assert [filled.entry_dir(d).exists() for d in DIGESTS] == [False, True, True]


def test_gc_needs_a_criterion(filled):
    out = run(filled.root, 'store', 'gc')
    assert out.returncode == 2
    assert '--older-than' in out.stderr and '--max-bytes' in out.stderr
    assert filled.info().entries == 3


def test_bad_usage_exits_2(tmp_path):
    out = run(tmp_path, 'store', 'frobnicate')
    assert out.returncode == 2
    assert 'usage: nibtrack' in out.stderr


@pytest.mark.parametrize(
    'args', [[], ['store'], ['store', 'gc', '--older-than', 'soon'], ['store', 'frobnicate']]
)
def test_bad_usage_in_process(args, capsys):
    """The same parser, without a process per case (importing nipype takes ~0.7 s)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert 'usage: nibtrack' in capsys.readouterr().err
