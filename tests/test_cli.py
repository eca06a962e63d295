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


@pytest.mark.parametrize(
    ('option', 'value', 'expected'),
    [
        ('--older-than', '-3', 'number of days >= 0'),
        ('--older-than', 'nan', 'number of days >= 0'),
        ('--older-than', 'inf', 'number of days >= 0'),
        ('--older-than', 'week', 'number of days >= 0'),
        ('--max-bytes', '-1', 'whole number of bytes >= 0'),
        ('--max-bytes', '1.5', 'whole number of bytes >= 0'),
        ('--max-bytes', '1e9', 'whole number of bytes >= 0'),
        ('--max-bytes', 'lots', 'whole number of bytes >= 0'),
    ],
)
def test_gc_refuses_nonsense_and_deletes_nothing(filled, capsys, option, value, expected):
    before = filled.info()
    with pytest.raises(SystemExit) as exit_:
        main(['store', 'gc', option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert option in err and expected in err and repr(value) in err
    assert filled.info() == before


def test_gc_refuses_a_negative_age_from_the_command_line(filled):
    out = run(filled.root, 'store', 'gc', '--older-than', '-3')
    assert out.returncode == 2
    assert 'expected a number of days >= 0' in out.stderr
    assert filled.info().entries == 3


def test_gc_accepts_zero(filled):
    out = run(filled.root, 'store', 'gc', '--max-bytes', '0', '--older-than', '0')
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith('removed 2 entries')  # the one used today is kept
