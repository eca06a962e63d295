"""The content-addressed store: concurrency, crashes, write-once, damage, gc, defaults."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import nipype_nibtrack as nt
from nipype_nibtrack.store import Store, StoreError
from tests.conftest import assert_same_content, build_format, reload_exact

DIGEST = '0123456789abcdef0123456789abcdef'


def _text(text: str):
    def write(path: Path) -> None:
        path.write_text(text)

    return write


def _age(store: Store, digest: str, seconds: float) -> None:
    """Pretend the entry was last used ``seconds`` ago."""
    when = time.time() - seconds
    os.utime(store.entry_dir(digest), (when, when))


# --------------------------------------------------------------------------- concurrency


def _resolve_in_child(source: str, root: str, barrier, results) -> None:
    img = nt.load(source)
    img.header['descrip'] = b'edited in every process'
    barrier.wait()
    res = nt.resolve(img, store=Store(root))
    results.put((res.action, res.path))


def test_many_processes_resolving_one_dirty_image_make_one_file(tmp_path):
    src = tmp_path / 'big.nii'
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.standard_normal((96, 96, 96)).astype('f4'), np.eye(4)), src)
    root = tmp_path / 'store'
    ctx = multiprocessing.get_context('fork')
    n = 8
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_resolve_in_child, args=(str(src), str(root), barrier, results))
        for _ in range(n)
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=60) for _ in range(n)]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    actions = sorted(action for action, _ in outcomes)
    assert actions == ['reused'] * (n - 1) + ['written']
    paths = {path for _, path in outcomes}
    assert len(paths) == 1
    store = Store(root)
    assert store.info().entries == 1 and store.info().files == 1
    assert list((root / 'tmp').iterdir()) == []
    img = nt.load(src)
    img.header['descrip'] = b'edited in every process'
    assert_same_content(reload_exact(paths.pop()), img)


def test_threads_resolving_one_image_make_one_file(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    img = build_format('nifti1_gz', tmp_path).load()
    img.get_fdata()[1, 1, 1, 0] += 1
    store = Store(tmp_path / 'store')
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: nt.resolve(img, store=store), range(16)))
    assert len({r.path for r in results}) == 1
    assert [r.action for r in results].count('written') == 1
    assert_same_content(reload_exact(results[0].path), img)


# --------------------------------------------------------------------------- crashes

_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np, nibabel as nib
    from nipype_nibtrack import Store, image_digest, resolve
    rng = np.random.default_rng(1)
    img = nib.Nifti1Image(rng.standard_normal((128, 128, 128)).astype('f4'), np.eye(4))
    print(image_digest(img), flush=True)
    resolve(img, formats=('.nii.gz',), store=Store(sys.argv[1]))
    print('finished', flush=True)
    """
)


def test_sigkill_during_a_write_leaves_no_entry(tmp_path):
    root = tmp_path / 'store'
    proc = subprocess.Popen(
        [sys.executable, '-c', _WRITER, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        digest = proc.stdout.readline().strip()
        assert len(digest) == 32
        deadline = time.monotonic() + 60
        partial = None
        while partial is None and time.monotonic() < deadline and proc.poll() is None:
            tmp = root / 'tmp'
            found = [d for d in tmp.iterdir() if d.name.startswith(digest)] if tmp.is_dir() else []
            partial = next((d for d in found if any(d.iterdir())), None)
            time.sleep(0.001)
        assert partial is not None, 'the writer never started writing'
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    store = Store(root)
    assert store.lookup(digest, 'image.nii.gz') is None
    assert store.info().entries in (0, 1) and store.info().files == 0
    # the same image, resolved again, is written completely
    rng = np.random.default_rng(1)
    img = nib.Nifti1Image(rng.standard_normal((128, 128, 128)).astype('f4'), np.eye(4))
    assert nt.image_digest(img) == digest
    res = nt.resolve(img, formats=('.nii',), store=store)
    assert res.action == 'written'
    assert_same_content(reload_exact(res.path), img)
    # gc removes what the killed writer left behind
    store.gc()
    assert list((root / 'tmp').iterdir()) == []


def test_partial_entry_is_never_returned(tmp_path):
    store = Store(tmp_path)
    path, _ = store.put(DIGEST, 'a.nii', _text('complete'))
    entry = path.parent
    manifest = entry / '.a.nii.json'
    manifest.unlink()  # a writer killed between links: image without manifest
    assert store.lookup(DIGEST, 'a.nii') is None
    path.unlink()
    store.put(DIGEST, 'a.nii', _text('complete'))
    (entry / 'a.nii').unlink()  # manifest without image
    assert store.lookup(DIGEST, 'a.nii') is None


# --------------------------------------------------------------------------- write-once


def test_entries_are_written_once(tmp_path):
    store = Store(tmp_path)
    calls = []

    def write(path: Path) -> None:
        calls.append(path)
        path.write_text('voxels')

    first, written = store.put(DIGEST, 'brain.nii', write)
    assert written
    st1 = first.stat()
    time.sleep(0.01)
    again, written = store.put(DIGEST, 'brain.nii', write)
    st2 = again.stat()
    assert (again, written, len(calls)) == (first, False, 1)
    assert (st1.st_ino, st1.st_mtime_ns, st1.st_size) == (st2.st_ino, st2.st_mtime_ns, st2.st_size)
    assert first.read_text() == 'voxels'


def test_pair_files_are_stored_together(tmp_path, store):
    img = build_format('nifti1_pair', tmp_path).load()
    img.header['descrip'] = b'edited'
    path = Path(nt.as_filename(img, formats=('.img',)))
    assert path.suffix == '.img' and path.with_suffix('.hdr').exists()
    assert store.info().files == 2
    assert_same_content(reload_exact(path), img)
    path.with_suffix('.hdr').unlink()  # a damaged pair is not handed out
    assert store.lookup(path.parent.name, path.name) is None


@pytest.mark.parametrize('damage', ['truncate', 'grow', 'replace_by_symlink', 'remove'])
def test_damaged_entry_is_rewritten(damage, tmp_path):
    store = Store(tmp_path / 'store')
    img = build_format('nifti1', tmp_path / 'src').load()
    img.header['descrip'] = b'edited'
    path = Path(nt.as_filename(img, store=store))
    size = path.stat().st_size
    if damage == 'truncate':
        with open(path, 'r+b') as f:
            f.truncate(size // 2)
    elif damage == 'grow':
        with open(path, 'ab') as f:
            f.write(b'junk')
    elif damage == 'replace_by_symlink':
        target = tmp_path / 'elsewhere.nii'
        target.write_bytes(path.read_bytes())
        path.unlink()
        path.symlink_to(target)
    else:
        path.unlink()
    assert store.lookup(path.parent.name, path.name) is None
    res = nt.resolve(img, store=store)
    assert (res.action, res.path) == ('written', str(path))
    assert not path.is_symlink() and path.stat().st_size == size
    assert_same_content(reload_exact(path), img)


def test_unsafe_names_and_digests_are_refused(tmp_path):
    store = Store(tmp_path)
    for name in ('', '../x.nii', '.hidden.nii', 'a/b.nii', 'x' * 201):
        with pytest.raises(ValueError, match='not a safe store file name'):
            store.put(DIGEST, name, _text(''))
    with pytest.raises(ValueError, match='not a store digest'):
        store.lookup('../../etc', 'passwd')


def test_unwritable_store_names_itself(tmp_path):
    root = tmp_path / 'a-file'
    root.write_text('not a directory')
    store = Store(root)
    with pytest.raises(StoreError, match=str(root)):
        store.put(DIGEST, 'a.nii', _text(''))


# --------------------------------------------------------------------------- gc and info


def _fill(store: Store, n: int, size: int = 1000) -> list[str]:
    digests = [f'{i:032x}' for i in range(1, n + 1)]
    for digest in digests:
        store.put(digest, 'img.nii', _text('x' * size))
    return digests


def test_info_counts_entries_files_and_bytes(tmp_path):
    store = Store(tmp_path)
    assert (store.info().entries, store.info().files, store.info().bytes) == (0, 0, 0)
    _fill(store, 3, 1000)
    info = store.info()
    assert (info.location, info.entries, info.files) == (str(tmp_path), 3, 3)
    manifests = sum(p.stat().st_size for p in store.objects.rglob('.*.json'))
    assert info.bytes == 3000 + manifests


def test_gc_older_than(tmp_path):
    store = Store(tmp_path)
    old, recent, fresh = _fill(store, 3)
    _age(store, old, 10 * 86400)
    _age(store, recent, 2 * 86400)
    report = store.gc(older_than_days=5)
    assert (report.removed, report.kept) == (1, 2)
    assert not store.entry_dir(old).exists()
    assert store.lookup(recent, 'img.nii') and store.lookup(fresh, 'img.nii')


def test_gc_never_removes_entries_used_in_the_last_hour(tmp_path):
    store = Store(tmp_path)
    (digest,) = _fill(store, 1)
    _age(store, digest, 1800)
    assert store.gc(older_than_days=0).removed == 0
    assert store.gc(older_than_days=0, keep_recent_seconds=0).removed == 1


def test_lookup_marks_an_entry_as_used(tmp_path):
    store = Store(tmp_path)
    (digest,) = _fill(store, 1)
    _age(store, digest, 10 * 86400)
    assert store.lookup(digest, 'img.nii') is not None
    assert store.gc(older_than_days=5).removed == 0


def test_gc_max_bytes_removes_least_recently_used_first(tmp_path):
    store = Store(tmp_path)
    digests = _fill(store, 4, 1000)
    for age, digest in zip((5, 4, 3, 2), digests, strict=True):
        _age(store, digest, age * 86400)
    per_entry = store.info().bytes // 4
    report = store.gc(max_bytes=2 * per_entry)
    assert report.removed == 2
    assert [store.entry_dir(d).exists() for d in digests] == [False, False, True, True]
    assert store.info().bytes <= 2 * per_entry


def test_gc_skips_locked_entries(tmp_path):
    store = Store(tmp_path)
    busy, idle = _fill(store, 2)
    _age(store, busy, 10 * 86400)
    _age(store, idle, 10 * 86400)
    holder = subprocess.Popen(
        [
            sys.executable,
            '-c',
            'import sys, time; from filelock import FileLock\n'
            'with FileLock(sys.argv[1]):\n'
            '    print("held", flush=True); time.sleep(60)',
            str(tmp_path / 'locks' / f'{busy}.lock'),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == 'held'
        report = store.gc(older_than_days=1)
    finally:
        holder.kill()
        holder.wait()
    assert (report.removed, report.skipped_busy) == (1, 1)
    assert store.entry_dir(busy).exists() and not store.entry_dir(idle).exists()
    assert store.gc(older_than_days=1).removed == 1


# --------------------------------------------------------------------------- defaults


def test_default_store_is_private(tmp_path, monkeypatch):
    monkeypatch.delenv('NIBTRACK_STORE', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    nt.set_store(None)
    store = nt.get_store()
    assert store.root == tmp_path / 'cache' / 'nipype_nibtrack' / 'store'
    path = nt.as_filename(nib.Nifti1Image(np.ones((2, 2, 2), 'f4'), np.eye(4)))
    assert Path(path).is_relative_to(store.root)
    for folder in (store.root, store.root / 'objects', store.root / 'tmp', store.root / 'locks'):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_environment_variable_chooses_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv('NIBTRACK_STORE', str(tmp_path / 'from-env'))
    nt.set_store(None)
    assert nt.get_store().root == tmp_path / 'from-env'
    path = nt.as_filename(nib.Nifti1Image(np.ones((2, 2, 2), 'f4'), np.eye(4)))
    assert Path(path).is_relative_to(tmp_path / 'from-env')


def test_set_store_overrides_and_resets(tmp_path):
    chosen = nt.set_store(tmp_path / 'chosen')
    try:
        assert nt.get_store() is chosen and chosen.root == tmp_path / 'chosen'
    finally:
        nt.set_store(None)
    assert nt.get_store().root != tmp_path / 'chosen'


# --------------------------------------------------------------------------- issue 9


def test_a_store_root_that_is_a_file_is_named_as_the_problem(tmp_path):
    root = tmp_path / 'store'
    root.write_text('not a folder')
    img = nib.Nifti1Image(np.zeros((2, 2, 2), 'f4'), np.eye(4))
    with pytest.raises(StoreError, match='store root is a file, not a directory') as err:
        nt.as_filename(img, store=Store(root))
    assert 'rm -r' not in str(err.value) and 'symbolic link' not in str(err.value)
    assert root.read_text() == 'not a folder'


def test_a_pair_asked_as_img_then_hdr_is_one_entry_never_relinked(tmp_path, caplog):
    store = Store(tmp_path / 'store')
    img = nib.Nifti1Image(np.arange(8, dtype='f4').reshape(2, 2, 2), np.eye(4))
    as_img = Path(nt.as_filename(img, formats=['.img'], store=store))
    before = os.stat(as_img)
    with caplog.at_level('WARNING', logger='nipype_nibtrack'):
        as_hdr = Path(nt.as_filename(img, formats=['.hdr'], store=store))
    assert not caplog.records
    assert as_hdr == as_img.with_suffix('.hdr') and as_hdr.exists()
    after = os.stat(as_img)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert_same_content(reload_exact(as_hdr), img)


def test_old_digest_version_entries_are_never_read(tmp_path):
    store = Store(tmp_path)
    digest = 'ef' * 16
    path, _ = store.put(digest, 'a.txt', lambda p: p.write_text('x'))
    manifest = path.parent / '.a.txt.json'
    text = manifest.read_text().replace('"digest_version": 2', '"digest_version": 1')
    manifest.chmod(0o644)
    manifest.unlink()
    manifest.write_text(text)
    assert store.lookup(digest, 'a.txt') is None


def _resolved_while_editing(img, store: Store, edit, times: int, pause: float = 0.0) -> list:
    """``as_filename(img)`` ``times`` times while another thread calls ``edit(1)``,
    ``edit(2)``... (pausing ``pause`` seconds after each). Returns the paths handed out;
    a resolution refused because the image kept changing is allowed and left out."""
    stop = threading.Event()

    def editor_loop():
        value = 0
        while not stop.is_set():
            value += 1
            edit(value)
            if pause:
                stop.wait(pause)

    editor = threading.Thread(target=editor_loop)
    editor.start()
    paths = []
    try:
        for _ in range(times):
            with contextlib.suppress(nt.ImageReadError):  # kept changing: refused, allowed
                paths.append(nt.as_filename(img, store=store))
    finally:
        stop.set()
        editor.join()
    return paths


def test_an_entry_always_holds_its_key_while_another_thread_edits(tmp_path):
    """The bytes of every entry match its key, whatever another thread does meanwhile."""
    data = np.zeros((64, 64, 64, 8), 'f4')
    img = nib.Nifti1Image(data, np.eye(4))

    def edit(value):
        data[..., value % 8] = value

    paths = _resolved_while_editing(img, Store(tmp_path / 'store'), edit, times=10)
    for path in paths:
        written = nib.load(path)
        key = Path(path).parent.name
        fresh = nib.Nifti1Image(np.asanyarray(written.dataobj), np.eye(4))
        assert nt.image_digest(fresh) == key, 'an entry holds other bytes than its key'


@pytest.mark.parametrize('ext', ['.nii', '.nii.gz', '.img', '.img.gz', '.mgh', '.mgz'])
def test_manifest_hashes_are_those_of_the_files_written(ext, tmp_path):
    """The writer hashes the bytes as it writes them: the manifest must match the files."""
    import json

    import xxhash

    img = nib.Nifti1Image(np.arange(60, dtype='f4').reshape(3, 4, 5), np.eye(4))
    path = Path(nt.as_filename(img, formats=[ext], store=Store(tmp_path)))
    image = path.name.replace('.hdr', '.img')
    manifest = json.loads((path.parent / f'.{image}.json').read_text())
    for name, xxh3 in manifest['xxh3'].items():
        assert xxh3 == xxhash.xxh3_128((path.parent / name).read_bytes()).hexdigest(), name


def test_an_entry_holds_its_key_while_another_thread_edits_the_header(tmp_path):
    """Header and affine edits racing the write never give an entry another header."""
    img = nib.Nifti1Image(np.zeros((8, 8, 8), 'f4'), np.eye(4))

    def edit(value):
        img.header['descrip'] = str(value).encode()
        img.affine[0, 3] = value

    # a short pause: edits still land inside writes, but a tight loop starves every
    # resolution into "kept changing" on a busy machine
    paths = _resolved_while_editing(img, Store(tmp_path / 'store'), edit, 30, pause=0.001)
    assert paths
    for path in paths:
        written = nib.load(path)
        # the image as it was when this entry was written, rebuilt from the entry
        again = nib.Nifti1Image(np.zeros((8, 8, 8), 'f4'), np.eye(4))
        again.header['descrip'] = written.header['descrip']
        again.affine[0, 3] = written.affine[0, 3]
        assert nt.image_digest(again) == Path(path).parent.name, 'header not the key'


def test_a_header_edit_while_the_write_is_planned_is_never_stored_under_the_old_key(
    tmp_path, monkeypatch
):
    """The edit lands between the snapshot that is hashed and the header that is written."""
    import nipype_nibtrack.export as export_mod

    img = nib.Nifti1Image(np.zeros((4, 4, 4), 'f4'), np.eye(4))
    real = export_mod.data_source
    # export's calls: choose_plan's plan, then the write's own plan: the edit lands there
    edits = iter([None, b'edited while written'])

    def edit_then_read(image):
        edit = next(edits, None)
        if edit is not None:
            image.header['descrip'] = edit
        return real(image)

    monkeypatch.setattr(export_mod, 'data_source', edit_then_read)
    path = Path(nt.as_filename(img, store=Store(tmp_path)))
    monkeypatch.undo()
    written = nib.load(path)
    assert written.header['descrip'] == img.header['descrip']
    assert path.parent.name == nt.image_digest(img)


def _killed_while_sealing(store: Store, digest: str, name: str) -> None:
    """Run ``store.put`` in a child killed (SIGKILL) just as its seal renames the sealed
    copy of the manifest into place: the copy stays behind in the entry."""
    pid = os.fork()
    if pid == 0:

        def hook(event: str, args: tuple) -> None:
            if event == 'os.rename' and str(args[0]).endswith('.sealing'):
                os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(hook)
        store.put(digest, name, _text('voxels'))
        os._exit(0)  # not reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _sealing_leftovers(store: Store) -> list[str]:
    return sorted(p.name for p in store.objects.rglob('*.sealing'))


def test_a_seal_killed_midway_leaves_no_content_and_gc_cleans_it(tmp_path):
    store = Store(tmp_path / 'store')
    _killed_while_sealing(store, DIGEST, 'brain.nii')
    assert _sealing_leftovers(store) == ['..brain.nii.json.sealing']
    # the unsealed manifest stands: the entry is intact and handed out as it is
    found = store.lookup(DIGEST, 'brain.nii')
    assert found is not None and found.read_text() == 'voxels'
    assert store.info().files == 1  # the leftover is no image file
    report = store.gc(older_than_days=0)  # the entry was used now: kept, leftover gone
    assert (report.removed, report.kept) == (0, 1)
    assert report.freed_bytes > 0
    assert _sealing_leftovers(store) == []
    assert sorted(p.name for p in found.parent.iterdir()) == ['.brain.nii.json', 'brain.nii']
    assert store.lookup(DIGEST, 'brain.nii') == found


def test_a_leftover_seal_goes_when_its_entry_is_written_again(tmp_path):
    store = Store(tmp_path / 'store')
    _killed_while_sealing(store, DIGEST, 'brain.nii')
    entry = store.entry_dir(DIGEST)
    (entry / 'brain.nii').write_text('damaged')  # the next put writes the entry again
    path, written = store.put(DIGEST, 'brain.nii', _text('voxels'))
    assert written and path.read_text() == 'voxels'
    assert sorted(p.name for p in entry.iterdir()) == ['.brain.nii.json', 'brain.nii']


def test_gc_leaves_the_seal_of_an_entry_being_written(tmp_path):
    """A seal in progress holds the entry's lock: gc never removes its copy under it."""
    store = Store(tmp_path / 'store')
    _killed_while_sealing(store, DIGEST, 'brain.nii')
    with store._hold(DIGEST):  # as a writer sealing it now
        report = store.gc(older_than_days=0)
        assert report.skipped_busy == 1
        assert _sealing_leftovers(store) == ['..brain.nii.json.sealing']
