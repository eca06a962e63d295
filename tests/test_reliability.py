"""Faults injected for real, attacks on the store, many resolvers at once.

The checks themselves live in ``tests/reliability_checks.py`` (shared with
``benchmarks/reliability_report.py``); the tests below run them, then pin the pieces of
the core they rely on: store errors that name the store and the remedy, the content
check at lookup and its memo, the entry locks, the re-check before a clean image's path
is handed out.
"""

from __future__ import annotations

import errno
import importlib
import os
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

import nipype_nibtrack as nt
from nipype_nibtrack.cli import main
from nipype_nibtrack.digest import _Memo
from nipype_nibtrack.fileid import FileId
from nipype_nibtrack.resolve import ImageReadError
from nipype_nibtrack.rules import cleanliness
from nipype_nibtrack.store import Store, StoreError
from tests.reliability_checks import (
    checks,
    memory_image,
    patched,
    run_concurrency,
    run_under_pytest,
    same_content,
)

store_mod = importlib.import_module('nipype_nibtrack.store')
resolve_mod = importlib.import_module('nipype_nibtrack.resolve')
DIGEST = '0123456789abcdef0123456789abcdef'


@pytest.mark.parametrize('chk', checks('fault'), ids=lambda c: c.name)
def test_fault(chk, tmp_path):
    outcome = run_under_pytest(chk, tmp_path)
    assert outcome.injected >= 1


@pytest.mark.parametrize('chk', checks('security'), ids=lambda c: c.name)
def test_attack_on_the_store(chk, tmp_path):
    run_under_pytest(chk, tmp_path)


def test_many_resolvers_at_once(tmp_path):
    """16 processes x 16 threads, shared and distinct dirty images, three rounds: the
    second after damaging two entries, the third with gc deleting idle entries."""
    report = run_concurrency(tmp_path, processes=16, threads=16, rounds=3)
    assert report.errors == []
    assert report.wrong_paths == 0
    assert report.resolutions == 16 * 16 * 3 * 8
    assert report.contents == report.entries == 6 + 16 * 16 * 2
    assert report.max_paths_per_content == report.max_files_per_content == 1
    assert report.damaged_rewritten == report.damaged == 2
    assert report.gc_passes >= 1


def test_fault_count_is_what_the_issue_asks():
    names = {c.name for c in checks('fault')}
    for required in (
        'no_space_injected_at_each_step',
        'read_only_store',
        'store_on_another_file_system',
        'killed_at_every_step_of_a_write',
        'killed_at_random_times',
        'damaged_store_entries',
        'source_changed_before_hand_out',
        'gc_racing_resolvers',
    ):
        assert required in names


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ('code', 'says'),
    [
        (errno.ENOSPC, 'Free space there'),
        (errno.EDQUOT, 'Free space there'),
        (errno.EROFS, 'writable'),
        (errno.EACCES, 'writable'),
        (errno.EXDEV, 'one file system'),
        (errno.EIO, 'Check that directory'),
    ],
)
def test_store_errors_name_the_store_the_cause_and_the_remedy(code, says, tmp_path):
    store = Store(tmp_path / 'store')

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if code == errno.EIO:  # not the store's: the writer's own error passes unchanged
        with pytest.raises(OSError) as info:
            store.put(DIGEST, 'a.nii', fail)
        assert not isinstance(info.value, StoreError)
        with patched(os, 'link', fail), pytest.raises(StoreError) as info:
            store.put(DIGEST, 'a.nii', lambda p: p.write_text(''))
    else:
        with pytest.raises(StoreError) as info:
            store.put(DIGEST, 'a.nii', fail)
    message = str(info.value)
    assert info.value.errno == code
    for needle in (str(store.root), os.strerror(code), says, 'NIBTRACK_STORE'):
        assert needle in message, message
    assert list((store.root / 'tmp').iterdir()) == []


def test_cli_reports_store_errors_without_a_traceback(tmp_path, capsys):
    root = tmp_path / 'store'
    Store(root).put(DIGEST, 'a.nii', lambda p: p.write_text('x'))
    (root / 'objects').rename(tmp_path / 'elsewhere')
    (root / 'objects').symlink_to(tmp_path / 'elsewhere')
    env = {**os.environ, 'NIBTRACK_STORE': str(root)}
    out = subprocess.run(
        [sys.executable, '-m', 'nipype_nibtrack.cli', 'store', 'info'],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out
    assert out.stderr.startswith('nibtrack: ') and 'Traceback' not in out.stderr
    assert f'{root}/objects' in out.stderr and 'symbolic link' in out.stderr


def test_cli_gc_help_states_the_grace_period(capsys):
    with pytest.raises(SystemExit):
        main(['store', 'gc', '--help'])
    assert 'last 1 hour(s)' in ' '.join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------- lookup


def _count_reads(monkeypatch) -> list:
    calls = []
    real = store_mod._file_xxh3

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(store_mod, '_file_xxh3', counting)
    monkeypatch.setattr(store_mod, '_verified', _Memo())
    return calls


def test_reuse_of_a_settled_entry_costs_a_stat_not_a_read(tmp_path, monkeypatch):
    store = Store(tmp_path)
    path, _ = store.put(DIGEST, 'a.nii', lambda p: p.write_bytes(b'voxels' * 1000))
    # as if a second had passed: timestamps out of the racy window
    monkeypatch.setattr(FileId, 'settled', lambda self, now_ns=None: True)
    reads = _count_reads(monkeypatch)
    for _ in range(5):
        assert store.lookup(DIGEST, 'a.nii') == path
    assert len(reads) == 1  # bytes checked once, then the memoised identity


def test_recently_written_entries_are_read_until_they_settle(tmp_path, monkeypatch):
    store = Store(tmp_path)
    path, _ = store.put(DIGEST, 'a.nii', lambda p: p.write_bytes(b'voxels'))
    reads = _count_reads(monkeypatch)
    for _ in range(3):
        assert store.lookup(DIGEST, 'a.nii') == path
    assert len(reads) == 3  # a same-size rewrite in the same clock tick would hide


def test_files_beyond_the_verify_limit_get_a_size_check(tmp_path, monkeypatch):
    store = Store(tmp_path, verify_max_bytes=10)
    path, _ = store.put(DIGEST, 'a.nii', lambda p: p.write_bytes(b'x' * 100))
    reads = _count_reads(monkeypatch)
    assert store.lookup(DIGEST, 'a.nii') == path and reads == []
    os.truncate(path, 99)
    assert store.lookup(DIGEST, 'a.nii') is None


def test_old_manifests_without_digests_are_still_read(tmp_path):
    store = Store(tmp_path)
    path, _ = store.put(DIGEST, 'a.nii', lambda p: p.write_text('voxels'))
    manifest = path.with_name('.a.nii.json')
    manifest.write_text(f'{{"digest": "{DIGEST}", "files": {{"a.nii": 6}}}}')
    assert store.lookup(DIGEST, 'a.nii') == path


def test_gc_removes_lock_files_of_deleted_entries_only(tmp_path):
    store = Store(tmp_path)
    keep, gone = DIGEST, 'f' * 32
    for digest in (keep, gone):
        store.put(digest, 'a.nii', lambda p: p.write_text('x'))
    old = time.time() - 3 * 86400
    os.utime(store.entry_dir(gone), (old, old))
    assert store.gc(older_than_days=1).removed == 1
    assert sorted(p.name for p in (tmp_path / 'locks').iterdir()) == [f'{keep}.lock']


def test_a_forked_child_does_not_keep_a_lock_of_its_parent(tmp_path):
    store = Store(tmp_path)
    store._prepare()
    ready, signal_ready = os.pipe()
    with store._hold(DIGEST):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child: at-fork handlers have run by now
            os.write(signal_ready, b'!')
            time.sleep(5)
            os._exit(0)
    assert os.read(ready, 1) == b'!'
    try:
        with store._hold(DIGEST, wait=False):  # the parent released it: free
            pass
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


# --------------------------------------------------------------------------- resolve


def test_clean_verdict_names_the_identities_it_was_reached_with(tmp_path):
    src = tmp_path / 'a.nii'
    nib.save(memory_image('ids'), src)
    img = nt.load(src)
    verdict = cleanliness(img)
    assert verdict.reason is None and list(verdict.ids) == [str(src)]
    assert verdict.still_holds()
    os.utime(src, ns=(0, 0))
    assert not verdict.still_holds()
    assert cleanliness(img).reason is None  # touched only: still clean


def test_a_file_that_keeps_changing_is_an_error_not_a_guess(tmp_path, monkeypatch):
    src = tmp_path / 'a.nii'
    nib.save(memory_image('busy'), src)
    img = nt.load(src)
    real = resolve_mod.cleanliness

    def check_then_touch(value, **options):
        verdict = real(value, **options)
        os.utime(src, ns=(time.time_ns(), time.time_ns()))  # someone writing, always
        return verdict

    monkeypatch.setattr(resolve_mod, 'cleanliness', check_then_touch)
    with pytest.raises(ImageReadError, match='kept changing'):
        nt.resolve(img, store=Store(tmp_path / 'store'))


def test_held_descriptor_digests_are_keyed_by_the_held_file(tmp_path, monkeypatch):
    """A proxy reading a replaced file through its descriptor never lends its digest to
    an image of the new file (the memo used the path's identity before)."""
    monkeypatch.setattr(FileId, 'settled', lambda self, now_ns=None: True)  # memoise all
    src = tmp_path / 'a.nii'
    data = np.arange(27, dtype='f4').reshape(3, 3, 3)
    nib.save(nib.Nifti1Image(data, np.eye(4)), src)
    held = nt.load(src, keep_file_open=True)
    np.asanyarray(held.dataobj)
    new = tmp_path / 'new.nii'
    nib.save(nib.Nifti1Image(data + 1, np.eye(4)), new)
    os.replace(new, src)
    held.header['descrip'] = b'x'
    fresh = nt.load(src)
    fresh.header['descrip'] = b'x'
    assert nt.image_digest(held) != nt.image_digest(fresh)
    store = Store(tmp_path / 'store')
    same_content(nt.as_filename(held, store=store), held)
    same_content(nt.as_filename(fresh, store=store), fresh)
