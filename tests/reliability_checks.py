"""Fault injection, hostile input and concurrency checks of the core, usable outside pytest.

The promise under test: a tool is never handed a path whose content differs from the
image it was given, a user's file is never modified, and every failure says what
happened and what to do.

Each check builds what it needs under a fresh folder ``work``, injects its faults for
real (a full tmpfs, a read-only mount, SIGKILL at every file-system step of a write,
bytes flipped in a store entry, a source file replaced between the check and the
hand-out, symlinks planted in the store...), asserts the promise and returns an
:class:`Outcome`: what was tried, what came out, how many faults were injected.
``tests/test_reliability.py`` and ``tests/test_hostile_input.py`` run them under pytest;
``benchmarks/reliability_report.py`` runs them all and writes the figures.
"""

from __future__ import annotations

import contextlib
import errno
import gc as _gc
import hashlib
import importlib
import io
import json
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

import nipype_nibtrack as nt
from nipype_nibtrack.digest import _Memo
from nipype_nibtrack.resolve import ImageReadError
from nipype_nibtrack.store import Store, StoreError
from tests.conftest import assert_same_content, reload_exact

# the package exports functions named like these modules: take the modules themselves
resolve_mod = importlib.import_module('nipype_nibtrack.resolve')
store_mod = importlib.import_module('nipype_nibtrack.store')

# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Outcome:
    """What a check tried and what came out; ``injected`` faults (or inputs) it used."""

    text: str
    injected: int = 1


class Skip(Exception):
    """The check cannot run here (not root, no second file system); the reason says why."""


@dataclass(frozen=True)
class Check:
    name: str
    group: str  # 'fault', 'security' or 'input'
    run: Callable[[Path], Outcome]
    needs_root: bool = False
    slow: bool = False

    @property
    def doc(self) -> str:
        return (self.run.__doc__ or self.name).strip().splitlines()[0]


CHECKS: list[Check] = []


def check(group: str, *, needs_root: bool = False, slow: bool = False) -> Callable:
    def register(fn: Callable[[Path], Outcome]) -> Callable[[Path], Outcome]:
        CHECKS.append(Check(fn.__name__, group, fn, needs_root, slow))
        return fn

    return register


def checks(group: str) -> list[Check]:
    return [c for c in CHECKS if c.group == group]


def is_root() -> bool:
    return os.geteuid() == 0


def run_under_pytest(chk: Check, work: Path) -> Outcome:
    """Run ``chk`` in a test: skipped when it cannot run here, except under ``CI=true``
    (CI runs as root and must run everything)."""
    import pytest

    ci = os.environ.get('CI', '').lower() == 'true'
    if chk.needs_root and not is_root():
        reason = f'{chk.name} injects its fault with mount: run as root'
        pytest.fail(reason + ' (CI=true)') if ci else pytest.skip(reason)
    try:
        return chk.run(work)
    except Skip as why:
        pytest.fail(f'{why} (CI=true)') if ci else pytest.skip(str(why))


# --------------------------------------------------------------------------- helpers


def noise(seed: Any, shape: tuple[int, ...] = (12, 12, 12)) -> np.ndarray:
    """Reproducible float32 noise for any seed (strings and tuples included)."""
    key = int.from_bytes(hashlib.sha256(repr(seed).encode()).digest()[:8], 'little')
    return np.random.default_rng(key).standard_normal(shape).astype(np.float32)


def memory_image(seed: Any, shape: tuple[int, ...] = (12, 12, 12), descrip: str = '') -> Any:
    img = nib.Nifti1Image(noise(seed, shape), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header['descrip'] = descrip.encode() or f'seed {seed}'.encode()
    return img


def same_content(path: str | os.PathLike, img: Any) -> None:
    """The file at ``path`` holds exactly what ``img`` holds (data bit for bit)."""
    assert_same_content(reload_exact(path), img)


def fingerprint(*paths: Path) -> dict[str, tuple]:
    """sha256, mtime and inode of each existing file: equal means untouched."""
    out = {}
    for path in paths:
        if os.path.lexists(path) and path.is_file():
            st = path.stat()
            out[str(path)] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                st.st_mtime_ns,
                st.st_ino,
            )
    return out


def leftovers(store: Store) -> list[str]:
    tmp = store.root / 'tmp'
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


def image_files(store: Store) -> list[Path]:
    if not store.objects.is_dir():
        return []
    return sorted(p for p in store.objects.rglob('*') if p.is_file() and p.name[0] != '.')


def expect(kind: type[BaseException], fn: Callable[[], Any], *needles: str) -> BaseException:
    """Run ``fn``, which must raise ``kind`` with every needle in its message."""
    try:
        fn()
    except kind as err:
        message = str(err)
        missing = [n for n in needles if n not in message]
        assert not missing, f'{type(err).__name__} message lacks {missing}: {message}'
        return err
    raise AssertionError(f'{kind.__name__} not raised')


_TMP = re.compile(re.escape(tempfile.gettempdir()) + r'/[^/\s\'"]+')


def short(err: BaseException, width: int = 120) -> str:
    """``Type: message`` on one line, temporary folders shown as ``<tmp>``."""
    text = _TMP.sub('<tmp>', ' '.join(str(err).split()))
    return f'{type(err).__name__}: {text[:width]}{"..." if len(text) > width else ""}'


def fit(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8."""
    while len(text.encode()) > limit:
        text = text[:-1]
    return text


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (a string) or unset (None) environment variables, restored afterwards."""
    old = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (root only), unmounted afterwards."""
    if not is_root():
        raise Skip('mounting a tmpfs needs root')
    path.mkdir(parents=True, exist_ok=True)
    _run('mount', '-t', 'tmpfs', '-o', f'size={size},mode=0755', 'tmpfs', str(path))
    try:
        yield path
    finally:
        try:
            _run('umount', str(path))
        except subprocess.CalledProcessError:
            _run('umount', '-l', str(path))


def remount(path: Path, options: str) -> None:
    _run('mount', '-o', f'remount,{options}', str(path))


def fork(fn: Callable[[], Any]) -> int:
    """Run ``fn()`` in a forked child that exits 0 (done) or 1 (raised); return its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 120) -> int:
    """The child's wait status, killing it after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        time.sleep(0.002)


def _error_names_store(err: StoreError, store: Store, *needles: str) -> None:
    message = str(err)
    assert str(store.root) in message, f'the store is not named: {message}'
    assert 'NIBTRACK_STORE' in message, f'no remedy given: {message}'
    for needle in needles:
        assert needle in message, f'{needle!r} not said: {message}'


# =========================================================================== faults


@check('fault', needs_root=True)
def no_space_on_a_small_tmpfs(work: Path) -> Outcome:
    """No space left while writing a store entry (a 1 MiB tmpfs), then room made."""
    img = memory_image('enospc', (128, 128, 64))  # 4 MiB
    with tmpfs(work / 'mnt', '1m') as mnt:
        store = Store(mnt / 'store')
        err = expect(StoreError, lambda: nt.resolve(img, store=store))
        assert err.errno == errno.ENOSPC, err
        _error_names_store(err, store, 'No space left on device', 'Free space')
        assert leftovers(store) == [], leftovers(store)
        assert store.lookup(nt.image_digest(img), 'image.nii') is None
        remount(mnt, 'size=64m')
        res = nt.resolve(img, store=store)
        assert res.action == 'written', res
        same_content(res.path, img)
    return Outcome(
        '4 MiB into a 1 MiB tmpfs: StoreError (ENOSPC) naming the store and saying '
        '"Free space"; tmp/ empty, no entry; written once the tmpfs grew'
    )


@check('fault')
def no_space_injected_at_each_step(work: Path) -> Outcome:
    """ENOSPC injected in the data write, the temp folder, the manifest and each link."""
    real_link, real_write, real_export = os.link, os.write, resolve_mod.export_image

    def half_then_enospc(img: Any, target: Any, path: Any, **kwargs: Any) -> Any:
        real_export(img, target, path, **kwargs)
        with open(path, 'r+b') as f:  # the disk filled up half way through the data
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def enospc(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def nth_link(n: int) -> Callable:
        calls = [0]

        def link(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_link(*args, **kwargs)

        return link

    injections = {
        'data write': (resolve_mod, 'export_image', half_then_enospc),
        'temp folder': (store_mod.tempfile, 'mkdtemp', enospc),
        'manifest write': (os, 'write', enospc),
        'first link (.hdr)': (os, 'link', nth_link(1)),
        'manifest link': (os, 'link', nth_link(2)),
        'image link': (os, 'link', nth_link(3)),
    }
    for i, (where, (obj, name, fake)) in enumerate(injections.items()):
        store = Store(work / f'store{i}')
        img = memory_image(('enospc', i))
        with patched(obj, name, fake):
            err = expect(
                StoreError, lambda i=img, s=store: nt.resolve(i, formats=('.img',), store=s)
            )
        assert os.write is real_write and os.link is real_link
        assert err.errno == errno.ENOSPC, (where, err)
        _error_names_store(err, store, 'No space left on device', 'Free space')
        assert leftovers(store) == [], (where, leftovers(store))
        assert store.lookup(nt.image_digest(img), 'image.img') is None, where
        res = nt.resolve(img, formats=('.img',), store=store)
        assert res.action == 'written', (where, res)
        same_content(res.path, img)
    return Outcome(
        f'ENOSPC in the {", ".join(injections)}: each a StoreError naming the store; '
        'no partial entry handed out; the next attempt written',
        len(injections),
    )


@check('fault')
def read_only_store(work: Path) -> Outcome:
    """A read-only store: entries still reused, new ones refused clearly, then written."""
    old, new = memory_image('ro-old'), memory_image('ro-new')
    with contextlib.ExitStack() as stack:
        if is_root():  # root ignores permissions: make the file system read-only instead
            mnt = stack.enter_context(tmpfs(work / 'mnt', '16m'))
            store = Store(mnt / 'store')
            first = nt.resolve(old, store=store)
            remount(mnt, 'ro')
            how, code = 'a tmpfs remounted read-only', errno.EROFS

            def make_writable() -> None:
                remount(mnt, 'rw')

        else:
            store = Store(work / 'store')
            first = nt.resolve(old, store=store)
            dirs = [store.root, *(store.root / d for d in ('objects', 'tmp', 'locks'))]
            for d in dirs:
                d.chmod(0o555)
            how, code = 'directories made 0555', errno.EACCES

            def make_writable() -> None:
                for d in dirs:
                    d.chmod(0o755)

            stack.callback(make_writable)
        again = nt.resolve(old, store=store)
        assert (again.action, again.path) == ('reused', first.path), again
        err = expect(StoreError, lambda: nt.resolve(new, store=store))
        assert err.errno == code, err
        _error_names_store(err, store, 'writable')
        fresh = Store(store.root / 'objects' / 'nested-new-store')
        err2 = expect(StoreError, lambda: nt.resolve(new, store=fresh))
        _error_names_store(err2, fresh, 'writable')
        make_writable()
        res = nt.resolve(new, store=store)
        assert res.action == 'written', res
        same_content(res.path, new)
    return Outcome(
        f'{how}: existing entry reused; a new one refused with StoreError naming the '
        'store and "writable" (also when the store cannot be created); written after',
        2,
    )


@check('fault')
def store_on_another_file_system(work: Path) -> Outcome:
    """The store on another file system than the temporary directory and the source."""
    elsewhere = work / 'tmpdir'
    elsewhere.mkdir()
    with contextlib.ExitStack() as stack:
        if is_root():
            mnt = stack.enter_context(tmpfs(work / 'mnt', '64m'))
        elif os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK):
            mnt = Path(tempfile.mkdtemp(dir='/dev/shm'))
            stack.callback(shutil.rmtree, mnt, True)
        else:
            raise Skip('no second file system: needs root (tmpfs) or /dev/shm')
        if os.stat(mnt).st_dev == os.stat(elsewhere).st_dev:
            raise Skip(f'{mnt} is on the same file system as {elsewhere}')
        stack.enter_context(patched(tempfile, 'tempdir', str(elsewhere)))
        store = Store(mnt / 'store')
        src = work / 'source.nii'
        nib.save(memory_image('xdev'), src)
        img = nt.load(src)
        img.header['descrip'] = b'edited'
        res = nt.resolve(img, store=store)
        converted = nt.resolve(nt.load(src), formats=('.nii.gz',), store=store)
        for r in (res, converted):
            assert r.action == 'written', r
            assert os.stat(r.path).st_dev == os.stat(mnt).st_dev != os.stat(elsewhere).st_dev
        same_content(res.path, img)
        same_content(converted.path, nt.load(src))
        assert list(elsewhere.iterdir()) == [], list(elsewhere.iterdir())
    return Outcome(
        'store on a tmpfs, TMPDIR and the source on disk: written in place (tmp/ lives '
        'in the store), nothing in TMPDIR',
        2,
    )


# Audit events of file-system operations: the points at which a writer is killed
_FS_EVENTS = frozenset(
    {
        'open',
        'os.mkdir',
        'os.link',
        'os.remove',
        'os.rmdir',
        'os.rename',
        'os.utime',
        'os.listdir',
        'os.scandir',
        'fcntl.flock',
        'shutil.rmtree',
        'tempfile.mkdtemp',
    }
)


def _resolve_killed_at(root: Path, img: Any, formats: tuple[str, ...], kill_at: int) -> Any:
    """In a child: resolve ``img``, SIGKILLed at the ``kill_at``-th file-system event."""

    def child() -> None:
        count, active = [0], [False]

        def hook(event: str, args: tuple) -> None:
            if active[0] and event in _FS_EVENTS:
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        sys.addaudithook(hook)
        active[0] = True
        nt.resolve(img, formats=formats, store=Store(root))
        active[0] = False
        (root.parent / f'{root.name}.events').write_text(str(count[0]))

    return fork(child)


def _after_a_kill(root: Path, img: Any, formats: tuple[str, ...], name: str) -> str:
    """What a killed writer left: never a partial entry; the next attempt completes."""
    store = Store(root)
    digest = nt.image_digest(img)
    found = store.lookup(digest, name) if root.exists() else None
    if found is not None:
        same_content(found, img)
    res = nt.resolve(img, formats=formats, store=store)
    same_content(res.path, img)
    assert res.path == str(store.entry_dir(digest) / name), res
    store.gc()
    assert leftovers(store) == [], leftovers(store)
    assert len(image_files(store)) == (2 if name.endswith('.img') else 1)
    return 'complete' if found is not None else 'absent'


@check('fault')
def killed_at_every_step_of_a_write(work: Path) -> Outcome:
    """SIGKILL at every file-system step of a write (single file and pair)."""
    kills, states = 0, {'absent': 0, 'complete': 0}
    for formats, name in ((('.nii',), 'image.nii'), (('.img',), 'image.img')):
        img = memory_image(('kill', name), (16, 16, 16))
        # a first write here: whatever is imported lazily is imported before the count
        nt.resolve(memory_image('warm-up'), formats=formats, store=Store(work / 'warm-up'))
        dry = work / f'dry{name}'
        status = wait(_resolve_killed_at(dry, img, formats, kill_at=10**9))
        assert status == 0, f'dry run failed: {status}'
        steps = int((work / f'dry{name}.events').read_text())
        assert steps > 20, steps
        for k in range(1, steps + 1):
            root = work / f'k{k}{name}'
            status = wait(_resolve_killed_at(root, img, formats, kill_at=k))
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
            kills += 1
            states[_after_a_kill(root, img, formats, name)] += 1
            shutil.rmtree(root)
    return Outcome(
        f'{kills} writers killed, one at each file-system step: {states["absent"]} left '
        f'no entry, {states["complete"]} a complete one; none partial; every next '
        'attempt correct; gc cleared tmp/',
        kills,
    )


@check('fault')
def killed_at_random_times(work: Path) -> Outcome:
    """SIGKILL at random moments of a slow (gzip) write, 12 times."""
    img = memory_image('random-kill', (96, 96, 96))  # 3.4 MiB of noise: a slow .nii.gz
    formats, name = ('.nii.gz',), 'image.nii.gz'
    nt.image_digest(img)
    start = time.monotonic()
    assert wait(_resolve_killed_at(work / 'dry', img, formats, kill_at=10**9)) == 0
    duration = time.monotonic() - start
    rng = random.Random(2924)
    states = {'absent': 0, 'complete': 0}
    for i in range(12):
        root = work / f'r{i}'
        pid = _resolve_killed_at(root, img, formats, kill_at=10**9)
        time.sleep(rng.uniform(0, duration))
        os.kill(pid, signal.SIGKILL)
        wait(pid)
        states[_after_a_kill(root, img, formats, name)] += 1
        shutil.rmtree(root)
    return Outcome(
        f'12 writers killed at random within a {duration * 1000:.0f} ms write: '
        f'{states["absent"]} left no entry, {states["complete"]} a complete one; none '
        'partial; every next attempt correct',
        12,
    )


def _flip(path: Path, offset: int = -100) -> None:
    with open(path, 'r+b') as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _flip_keep_mtime(path: Path) -> None:
    st = path.stat()
    _flip(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_same_size(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-200:] = bytes(200)
    tmp = path.with_name('.swap')
    tmp.write_bytes(raw)
    os.replace(tmp, path)


def _manifest(path: Path) -> Path:
    return path.with_name(f'.{path.name}.json')


def _edit_manifest(edit: Callable[[dict, str], None]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = json.loads(_manifest(path).read_text())
        edit(data, path.name)
        _manifest(path).write_text(json.dumps(data))

    return damage


def _append(path: Path) -> None:
    with open(path, 'ab') as f:
        f.write(b'junk')


def _symlink_to_copy(path: Path) -> None:
    outside = path.parents[4] / 'outside-copy.nii'  # beside the store root
    shutil.copy(path, outside)
    path.unlink()
    path.symlink_to(outside)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / 'inside').write_text('planted')


_DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    'truncated': ('.nii', lambda p: os.truncate(p, p.stat().st_size // 2)),
    'grown': ('.nii', _append),
    'one byte flipped (same size)': ('.nii', _flip),
    'byte flipped, mtime restored': ('.nii', _flip_keep_mtime),
    'replaced by same-size other content': ('.nii', _replace_same_size),
    'removed': ('.nii', lambda p: p.unlink()),
    'replaced by a symlink to a copy': ('.nii', _symlink_to_copy),
    'replaced by a directory': ('.nii', _directory),
    'manifest garbage': ('.nii', lambda p: _manifest(p).write_text('{not json')),
    'manifest removed': ('.nii', lambda p: _manifest(p).unlink()),
    'manifest size wrong': ('.nii', _edit_manifest(lambda d, n: d['files'].update({n: 1}))),
    'manifest digest wrong': (
        '.nii',
        _edit_manifest(lambda d, n: d['xxh3'].update({n: '0' * 32})),
    ),
    'manifest names ../escape': (
        '.nii',
        _edit_manifest(lambda d, n: d['files'].update({'../../escape': 1})),
    ),
    'pair .hdr removed': ('.img', lambda p: p.with_suffix('.hdr').unlink()),
    'pair .hdr byte flipped': ('.img', lambda p: _flip(p.with_suffix('.hdr'), 60)),
}


@check('fault')
def damaged_store_entries(work: Path) -> Outcome:
    """Store entries damaged by someone else after they were written (15 kinds)."""
    cases = []
    for i, (kind, (ext, _)) in enumerate(_DAMAGE.items()):
        store = Store(work / f's{i}' / 'store')
        img = memory_image(('damage', i))
        res = nt.resolve(img, formats=(ext,), store=store)
        cases.append((kind, store, img, Path(res.path)))
    time.sleep(1.1)  # let identities settle: lookups below memoise the verified bytes
    for _, store, _img, path in cases:
        assert store.lookup(path.parent.name, path.name) == path
    outside = {}
    for kind, store, img, path in cases:
        _DAMAGE[kind][1](path)
        outside.update(fingerprint(*store.root.parent.glob('outside-*')))
        assert store.lookup(path.parent.name, path.name) is None, f'{kind}: handed out'
        res = nt.resolve(img, formats=(path.suffix,), store=store)
        assert (res.action, res.path) == ('written', str(path)), (kind, res)
        assert path.is_file() and not path.is_symlink(), kind
        same_content(path, img)
        assert store.lookup(path.parent.name, path.name) == path, kind
    for name, before in outside.items():
        assert fingerprint(Path(name))[name] == before, f'{name} was modified'
    # An intact entry is never rewritten, even when its bytes are checked again
    kind, store, img, path = cases[0]
    before = path.stat()
    with patched(store_mod, '_verified', _Memo()):
        again = nt.resolve(img, formats=('.nii',), store=store)
    after = path.stat()
    assert again.action == 'reused', again
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    return Outcome(
        f'{len(cases)} kinds ({", ".join(_DAMAGE)}): each detected before hand-out, '
        'rewritten at the same path, files outside the store untouched; an intact '
        'entry re-checked is never rewritten',
        len(cases),
    )


def _mutate_after_check(mutate: Callable[[], None]) -> Any:
    """Replace ``resolve``'s cleanliness check by one that mutates the file once, after."""
    real = resolve_mod.cleanliness
    done = [False]

    def check_then_mutate(img: Any, **options: Any) -> Any:
        verdict = real(img, **options)  # defer_files: the files are checked at hand-out
        if not done[0]:
            done[0] = True
            mutate()
        return verdict

    return patched(resolve_mod, 'cleanliness', check_then_mutate)


def _rewrite(path: Path, img: Any) -> None:
    """Replace ``path`` by ``img`` written to a new file (new inode)."""
    tmp = path.with_name('new-' + path.name)
    nib.save(img, tmp)
    os.replace(tmp, path)


@check('fault')
def source_changed_before_hand_out(work: Path) -> Outcome:
    """The source deleted, replaced or rewritten between the check and the hand-out."""
    store = Store(work / 'store')
    results = []

    def case(label: str, mutate: Callable[[Path], None], **load: Any) -> Any:
        src = work / f'{len(results)}-src.nii'
        nib.save(memory_image('source', (8, 8, 8), 'original'), src)
        img = nt.load(src, **load)
        if load.get('keep_file_open'):
            np.asanyarray(img.dataobj)  # the descriptor is opened on first access
        if label.startswith('cache'):
            img.get_fdata()
        assert nt.dirty_reason(img) is None
        with _mutate_after_check(lambda: mutate(src)):
            try:
                res = nt.resolve(img, store=store)
            except ImageReadError as err:
                results.append((label, short(err, 60)))
                # deleted, or replaced by another file: the voxels it held are gone
                gone = ('no longer exists', 'no longer the file')
                assert str(src) in str(err) and any(g in str(err) for g in gone), err
                return None
        same_content(res.path, img)
        results.append((label, res.action))
        return res

    def other_header(src: Path) -> None:
        img = nib.load(src, mmap=False)
        new = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine * 2, img.header)
        _rewrite(src, new)

    def other_data(src: Path) -> None:
        img = nib.load(src, mmap=False)
        _rewrite(src, nib.Nifti1Image(np.asanyarray(img.dataobj) + 1, img.affine, img.header))

    def touched(src: Path) -> None:
        os.utime(src, ns=(0, 0))

    def in_place_affine(src: Path) -> None:
        raw = bytearray(src.read_bytes())
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)))
        hdr['srow_x'][3] += 5
        hdr['sform_code'] = 2
        raw[: len(hdr.binaryblock)] = hdr.binaryblock
        with open(src, 'r+b') as f:
            f.write(raw)

    deleted = case('deleted', lambda s: s.unlink())
    assert deleted is None
    held = case('deleted, kept open', lambda s: s.unlink(), keep_file_open=True)
    assert held.action == 'written', held
    res = case('replaced, other affine', other_header)
    assert res is None, res  # another inode: its voxels are not the image's (issue 9)
    res = case('rewritten in place, other affine', in_place_affine)
    assert res.action == 'written', res
    res = case('cache filled, replaced, other data', other_data)
    assert res.action == 'written', res
    res = case('touched only', touched)
    assert res.action == 'original', res
    # another inode is another file (issue 9): its voxels are not the image's, and the
    # image holds none in memory, so it is refused rather than read from the new file
    res = case('replaced, same content', lambda s: _rewrite(s, nib.load(s, mmap=False)))
    assert res is None, res
    return Outcome(
        'between check and hand-out: ' + '; '.join(f'{k} -> {v}' for k, v in results),
        len(results),
    )


@check('fault')
def source_changed_while_written(work: Path) -> Outcome:
    """The source rewritten between the digest and the write of a dirty image."""
    store = Store(work / 'store')
    src = work / 'src.nii'
    nib.save(memory_image('digest-race', (8, 8, 8)), src)
    img = nt.load(src)
    img.header['descrip'] = b'edited'
    real = resolve_mod.image_digest
    done = [False]

    def digest_then_rewrite(value: Any) -> str:
        digest = real(value)
        if not done[0]:
            done[0] = True
            data = np.asanyarray(nib.load(src, mmap=False).dataobj)
            with open(src, 'r+b') as f:  # same size, same inode, new data
                f.seek(352)
                f.write((data + 1).astype('<f4').tobytes(order='F'))
        return digest

    with patched(resolve_mod, 'image_digest', digest_then_rewrite):
        res = nt.resolve(img, store=store)
    same_content(res.path, img)
    assert Path(res.path).parent.name == nt.image_digest(img), 'stored under a stale digest'
    assert len(image_files(store)) == 1
    return Outcome(
        'source rewritten after the digest: resolved again; stored under the new digest'
    )


def _aged(store: Store, path: str, days: float = 2) -> None:
    when = time.time() - days * 86400
    os.utime(Path(path).parent, (when, when))


@check('fault')
def gc_racing_resolvers(work: Path) -> Outcome:
    """gc racing a lookup, a write and its own stale listing (4 interleavings)."""
    outcomes = []

    # 1. a resolver is inside its lookup: gc cannot delete the entry
    store = Store(work / 's1')
    img = memory_image('gc-1')
    path = nt.resolve(img, store=store).path
    _aged(store, path)
    inside, go = threading.Event(), threading.Event()
    real_check = Store._check_in

    def slow_check(self: Store, *args: Any) -> Any:
        inside.set()
        go.wait(30)
        return real_check(self, *args)

    got: list = []
    with patched(Store, '_check_in', slow_check):
        reader = threading.Thread(target=lambda: got.append(nt.resolve(img, store=store)))
        reader.start()
        assert inside.wait(30)
        report = store.gc(older_than_days=0, keep_recent_seconds=0)
        go.set()
        reader.join(30)
    assert report.removed == 0 and report.skipped_busy >= 1, report
    assert got and got[0].path == path and os.path.isfile(path), got
    same_content(path, img)
    outcomes.append('lookup in progress: gc skipped it (busy)')

    # 2. gc is deleting the entry: a resolver waits, then writes it again
    store = Store(work / 's2')
    img = memory_image('gc-2')
    path = nt.resolve(img, store=store).path
    _aged(store, path)
    deleting, go = threading.Event(), threading.Event()
    real_rmtree = shutil.rmtree
    gc_thread: list = []

    def slow_rmtree(target: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() in gc_thread and Path(target) == Path(path).parent:
            deleting.set()
            go.wait(30)
        return real_rmtree(target, *args, **kwargs)

    got = []
    with patched(store_mod.shutil, 'rmtree', slow_rmtree):
        collector = threading.Thread(target=lambda: store.gc(older_than_days=1))
        gc_thread.append(collector)
        collector.start()
        assert deleting.wait(30)
        reader = threading.Thread(target=lambda: got.append(nt.resolve(img, store=store)))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and not got, 'a resolver got an entry being deleted'
        go.set()
        collector.join(30)
        reader.join(30)
    assert got and (got[0].action, got[0].path) == ('written', path), got
    same_content(path, img)
    outcomes.append('gc deleting: the resolver waited, then rewrote it')

    # 3. gc listed an old entry; it is reused before gc locks it: gc keeps it
    store = Store(work / 's3')
    img = memory_image('gc-3')
    path = nt.resolve(img, store=store).path
    _aged(store, path)
    real_entries = Store._entries

    def listing_then_reuse(self: Store) -> Any:
        listing = real_entries(self)
        assert nt.resolve(img, store=store).action == 'reused'
        return listing

    with patched(Store, '_entries', listing_then_reuse):
        report = store.gc(older_than_days=1)
    assert report.removed == 0 and os.path.isfile(path), report
    outcomes.append('stale listing: last use re-read under the lock, entry kept')

    # 4. an entry being written: gc leaves it and its temporary folder alone
    store = Store(work / 's4')
    img = memory_image('gc-4')
    writing, go = threading.Event(), threading.Event()
    real_export = resolve_mod.export_image

    def slow_export(*args: Any, **kwargs: Any) -> Any:
        out = real_export(*args, **kwargs)
        writing.set()
        go.wait(30)
        return out

    got = []
    with patched(resolve_mod, 'export_image', slow_export):
        writer = threading.Thread(target=lambda: got.append(nt.resolve(img, store=store)))
        writer.start()
        assert writing.wait(30)
        report = store.gc(older_than_days=0, keep_recent_seconds=0)
        busy_tmp = leftovers(store)
        go.set()
        writer.join(30)
    assert report.skipped_busy >= 1 and len(busy_tmp) == 1, (report, busy_tmp)
    assert got and got[0].action == 'written', got
    same_content(got[0].path, img)
    assert leftovers(store) == []
    outcomes.append('write in progress: gc left it and its tmp/ folder')
    return Outcome('; '.join(outcomes), 4)


# =========================================================================== security


@check('security')
def store_directories_and_modes(work: Path) -> Outcome:
    """The default store is created 0700; a store path given by the user is used as is."""
    with environment(XDG_CACHE_HOME=str(work), NIBTRACK_STORE=None):
        nt.set_store(None)
        default = nt.get_store()
        path = nt.as_filename(memory_image('private'))
        assert Path(path).is_relative_to(default.root), path
        for d in (default.root, *(default.root / s for s in ('objects', 'tmp', 'locks'))):
            mode = stat.S_IMODE(d.stat().st_mode)
            assert mode == 0o700, (d, oct(mode))
    given = work / 'given'
    given.mkdir(mode=0o755)
    given.chmod(0o755)
    Store(given).put('0' * 32, 'x.nii', lambda p: p.write_text('x'))
    assert stat.S_IMODE(given.stat().st_mode) == 0o755
    return Outcome('default store and its folders 0700; a given store keeps its own mode', 2)


def _planted_symlinks(work: Path) -> list[tuple[str, str]]:
    img = memory_image('planted')
    digest = nt.image_digest(img)
    shard = digest[:2]
    results = []

    def attempt(label: str, plant: Callable[[Store, Path], None], refused: bool) -> None:
        base = work / str(len(results))
        victim = base / 'victim'  # the user's files, and a complete-looking crafted entry
        Store(victim).put(digest, 'image.nii', lambda p: p.write_bytes(b'attacker data'))
        (victim / 'precious.txt').write_text('user data')
        store = Store(base / 'store')
        nt.resolve(memory_image('other'), store=store)  # a store in use
        plant(store, victim)
        before = fingerprint(*victim.rglob('*'))
        if refused:
            err = expect(StoreError, lambda: nt.resolve(img, store=store), 'symbolic link')
            assert str(store.root) in str(err), err
            results.append((label, 'refused, StoreError naming it'))
        else:
            res = nt.resolve(img, store=store)
            assert Path(res.path).is_relative_to(store.root) and not os.path.islink(res.path)
            same_content(res.path, img)
            results.append((label, f'not followed, entry {res.action}'))
        assert fingerprint(*victim.rglob('*')) == before, f'{label}: user files modified'
        assert (victim / 'precious.txt').read_text() == 'user data'

    def replace(link: Path, target: Path) -> None:
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)

    for label, sub in (
        ('objects/ -> crafted store', 'objects'),
        ('shard -> crafted shard', f'objects/{shard}'),
        ('entry -> crafted entry', f'objects/{shard}/{digest}'),
        ('tmp/ -> user folder', 'tmp'),
        ('locks/ -> user folder', 'locks'),
    ):
        target = 'victim' if sub in ('tmp', 'locks') else f'victim/{sub}'
        attempt(label, lambda s, v, sub=sub, t=target: replace(s.root / sub, v.parent / t), True)
    attempt(
        'lock file -> user file',
        lambda s, v: (s.root / 'locks' / f'{digest}.lock').symlink_to(v / 'precious.txt'),
        True,
    )

    def plant_in_entry(name: str) -> Callable[[Store, Path], None]:
        def plant(store: Store, victim: Path) -> None:
            path = Path(nt.resolve(img, store=store).path)  # a genuine entry...
            crafted = Store(victim).entry_dir(digest) / name
            (path.parent / name).unlink()
            (path.parent / name).symlink_to(crafted)  # ...one file swapped for a link

        return plant

    attempt('manifest -> crafted manifest', plant_in_entry('.image.nii.json'), False)
    attempt('image -> crafted image', plant_in_entry('image.nii'), False)
    return results


@check('security')
def planted_symlinks(work: Path) -> Outcome:
    """Symlinks planted inside the store: never followed, never written through."""
    results = _planted_symlinks(work)
    return Outcome('; '.join(f'{k}: {v}' for k, v in results), len(results))


@check('security')
def names_never_escape(work: Path) -> Outcome:
    """Names from file names or image data never escape the store or exceed limits."""
    store = Store(work / 'store')
    stems = [
        '../../../etc/passwd',
        '..',
        '.hidden',
        'a/b',
        'mean func;rm -rf ~;$(reboot)`id`',
        'line\nbreak',
        'é' * 100 + 'sujet',
        'x' * 250,
        '-rf',
        ' spaces ',
    ]
    names = []
    for stem in stems:
        src_dir = work / 'src' / str(len(names))
        src_dir.mkdir(parents=True)
        # a file name cannot hold '/': the image's own file_map can
        src = src_dir / (fit(stem.replace('/', '_'), 251) + '.nii')
        nib.save(memory_image(('stem', stem)), src)
        img = nt.load(src)
        img.header['descrip'] = b'edited'
        if '/' in stem:
            img.set_filename(str(src_dir / (stem + '.nii')))  # in memory only
        path = Path(nt.as_filename(img, formats=('.nii.gz',), store=store))
        assert path.parent.parent.parent == store.objects, path
        name = path.name
        assert name.isascii() and not name.startswith(('.', '-')), name
        assert len(name.encode()) <= 87 and '/' not in name and '\n' not in name, name
        assert name == shlex.quote(name), name  # nothing a shell would interpret
        names.append(name)
    for bad in ('../x.nii', '.x.nii', 'a/b.nii', 'é' * 101 + '.nii', ''):
        expect(ValueError, lambda b=bad: store.put('1' * 32, b, lambda p: None), 'not a safe')
    expect(ValueError, lambda: store.lookup('../../etc', 'passwd'), 'not a store digest')
    return Outcome(
        f'{len(stems)} hostile source names -> store names such as {names[4]!r}, '
        f'{names[6]!r}: ASCII, no separator, no leading dot or dash, <= 87 bytes; unsafe '
        'names and digests refused by the store',
        len(stems) + 6,
    )


class _Bomb:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (Path(self.marker), 'unpickled'))


@check('security')
def nothing_unpickled_from_the_store(work: Path) -> Outcome:
    """Pickles planted in the store are never loaded; the core never imports pickle."""
    store = Store(work / 'store')
    img = memory_image('bomb')
    path = Path(nt.resolve(img, store=store).path)
    marker = work / 'UNPICKLED'
    bomb = pickle.dumps(_Bomb(str(marker)))
    for planted in (
        _manifest(path),
        path.with_name('image.pklz'),
        path.with_name('.image.pklz.json'),
        store.root / 'tmp' / f'{path.parent.name}.x' / 'image.nii',
    ):
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_bytes(bomb)
    res = nt.resolve(img, store=store)
    same_content(res.path, img)
    store.lookup(path.parent.name, 'image.pklz')
    store.info()
    store.gc(older_than_days=0, keep_recent_seconds=0)
    assert not marker.exists(), 'something was unpickled from the store'
    core = Path(nt.__file__).parent
    for module in ('store', 'resolve', 'rules', 'digest', 'export', 'provenance', 'fileid'):
        text = (core / f'{module}.py').read_text()
        for word in ('import pickle', 'pickle.load', 'import marshal', 'import shelve'):
            assert word not in text, (module, word)
    return Outcome(
        '4 pickles planted in entries, manifests and tmp/: none loaded; the core '
        'modules never import pickle',
        4,
    )


# =========================================================================== inputs


def _source(work: Path, name: str = 'src.nii', img: Any = None) -> Path:
    path = work / name
    nib.save(memory_image(name) if img is None else img, path)
    return path


def _raises(kind: type[BaseException], value: Any, *needles: str, **kwargs: Any) -> Outcome:
    err = expect(kind, lambda: nt.resolve(value, **kwargs), *needles)
    return Outcome(short(err))


def _written_exactly(img: Any, store: Store, raw: np.ndarray | None = None, **kwargs: Any) -> Any:
    """Resolve ``img``: written with exactly its content (``raw``: these stored bytes),
    then reused from the same path."""
    res = nt.resolve(img, store=store, **kwargs)
    if raw is None:
        same_content(res.path, img)
    else:
        out = np.asanyarray(reload_exact(res.path).dataobj)
        assert out.dtype == raw.dtype and out.tobytes() == raw.tobytes(), res.path
    again = nt.resolve(img, store=store, **kwargs)
    assert (again.action, again.path) == ('reused', res.path), again
    return res


@check('input')
def none(work: Path) -> Outcome:
    """None."""
    return _raises(TypeError, None, 'NoneType')


@check('input')
def integer(work: Path) -> Outcome:
    """An int."""
    return _raises(TypeError, 3, 'int')


@check('input')
def list_of_paths(work: Path) -> Outcome:
    """A list of paths."""
    return _raises(TypeError, [str(_source(work))], 'list')


@check('input')
def numpy_array(work: Path) -> Outcome:
    """A bare numpy array."""
    return _raises(TypeError, np.zeros((2, 2, 2)), 'ndarray')


@check('input')
def header_object(work: Path) -> Outcome:
    """A nibabel header instead of an image."""
    return _raises(TypeError, nib.Nifti1Header(), 'Nifti1Header', 'nibabel.load')


@check('input')
def bytes_path(work: Path) -> Outcome:
    """A path as bytes."""
    return _raises(TypeError, bytes(_source(work)), 'bytes')


@check('input')
def empty_string(work: Path) -> Outcome:
    """An empty string."""
    return _raises(ValueError, '', 'empty')


@check('input')
def nul_in_path(work: Path) -> Outcome:
    """A path with a NUL character."""
    return _raises(ValueError, 'a\0b.nii', 'NUL')


@check('input')
def directory(work: Path) -> Outcome:
    """A directory."""
    return _raises(IsADirectoryError, str(work), str(work), 'directory')


@check('input')
def missing_path(work: Path) -> Outcome:
    """A path that does not exist."""
    return _raises(FileNotFoundError, work / 'nope.nii', str(work / 'nope.nii'), 'does not exist')


@check('input')
def broken_symlink(work: Path) -> Outcome:
    """A symlink whose target is gone."""
    link = work / 'link.nii'
    link.symlink_to(work / 'gone.nii')
    return _raises(FileNotFoundError, link, 'broken symbolic link', str(work / 'gone.nii'))


@check('input')
def symlink_loop(work: Path) -> Outcome:
    """Two symlinks pointing at each other."""
    (work / 'a.nii').symlink_to(work / 'b.nii')
    (work / 'b.nii').symlink_to(work / 'a.nii')
    return _raises(OSError, work / 'a.nii', str(work / 'a.nii'), 'symbolic links')


@check('input')
def symlink_to_an_image(work: Path) -> Outcome:
    """A clean image loaded through a symlink."""
    src = _source(work)
    link = work / 'link.nii'
    link.symlink_to(src)
    res = nt.resolve(nt.load(link), store=Store(work / 'store'))
    assert (res.action, res.path) == ('original', str(link)), res
    return Outcome('clean: its own (link) path, which reads the same bytes')


@check('input')
def truncated_nifti_clean(work: Path) -> Outcome:
    """A truncated NIfTI file, image unchanged: its header still matches, but a tool
    given the file fails; never handed out, a clear error naming the file and sizes."""
    src = _source(work)
    os.truncate(src, src.stat().st_size - 1000)
    before = fingerprint(src)
    img = nt.load(src)
    out = _raises(ImageReadError, img, str(src), 'truncated', 'header needs')
    assert fingerprint(src) == before
    return out


@check('input')
def truncated_nifti_dirty(work: Path) -> Outcome:
    """A truncated NIfTI file, header edited: its data cannot be read."""
    src = _source(work)
    os.truncate(src, src.stat().st_size - 1000)
    img = nt.load(src)
    img.header['descrip'] = b'edited'
    return _raises(ImageReadError, img, str(src), 'truncated', store=Store(work / 'store'))


@check('input')
def truncated_gzip_dirty(work: Path) -> Outcome:
    """A truncated .nii.gz, header edited."""
    src = _source(work, 'src.nii.gz', memory_image('gz', (32, 32, 32)))
    os.truncate(src, src.stat().st_size // 2)
    img = nt.load(src)
    img.header['descrip'] = b'edited'
    return _raises(ImageReadError, img, str(src), store=Store(work / 'store'))


@check('input')
def header_claims_more_data(work: Path) -> Outcome:
    """A header claiming more data than the file has (dim enlarged)."""
    src = _source(work)
    raw = bytearray(src.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)))
    hdr['dim'][3] = 200
    raw[: len(hdr.binaryblock)] = hdr.binaryblock
    src.write_bytes(raw)
    store = Store(work / 'store')
    unchanged = expect(ImageReadError, lambda: nt.resolve(nt.load(src), store=store), str(src))
    img = nt.load(src)
    img.header['descrip'] = b'edited'
    err = expect(ImageReadError, lambda: nt.resolve(img, store=store), str(src))
    return Outcome(f'unchanged: {short(unchanged, 60)}; dirty: {short(err, 60)}')


@check('input')
def wrong_magic(work: Path) -> Outcome:
    """A .nii file with a wrong magic."""
    src = _source(work)
    raw = bytearray(src.read_bytes())
    raw[344:348] = b'XXXX'
    src.write_bytes(raw)
    err = expect(Exception, lambda: nt.load(src), str(src))
    res = nt.resolve(src)
    assert res.action == 'path', res
    return Outcome(f'load: {short(err, 50)}; as a path: passed as given')


@check('input')
def magic_broken_after_load(work: Path) -> Outcome:
    """The file's magic broken on disk after the image was loaded."""
    src = _source(work)
    img = nt.load(src)
    raw = bytearray(src.read_bytes())
    raw[344:348] = b'XXXX'
    src.write_bytes(raw)
    res = _written_exactly(img, Store(work / 'store'))
    return Outcome(f'dirty ({res.reason[:50]}...): written from memory, exact')


@check('input')
def bytesio_backed_image(work: Path) -> Outcome:
    """An image reading its data from a BytesIO."""
    img = nib.Nifti1Image.from_bytes(memory_image('bio').to_bytes())
    return _raises(ValueError, img, 'in-memory file object', 'np.asanyarray')


@check('input')
def keep_file_open(work: Path) -> Outcome:
    """An image opened with keep_file_open=True, clean then its file replaced."""
    src = _source(work)
    store = Store(work / 'store')
    img = nt.load(src, keep_file_open=True)
    np.asanyarray(img.dataobj)
    assert nt.resolve(img, store=store).action == 'original'
    want = np.asanyarray(img.dataobj).copy()
    _rewrite(src, nib.Nifti1Image(want + 1, img.affine, img.header))
    res = _written_exactly(img, store)
    assert np.array_equal(np.asanyarray(reload_exact(res.path).dataobj), want)
    return Outcome(
        f'clean: original path; file replaced: {res.reason}, written from the held file'
    )


@check('input')
def gifti(work: Path) -> Outcome:
    """A GIFTI surface."""
    coords = np.eye(3, dtype=np.float32)
    img = nib.GiftiImage(darrays=[nib.gifti.GiftiDataArray(coords, 'NIFTI_INTENT_POINTSET')])
    path = work / 'surf.gii'
    nib.save(img, path)
    res = _written_exactly(nt.load(path), Store(work / 'store'))
    return Outcome(f'always dirty (no file link): written as {Path(res.path).name}, XML exact')


@check('input')
def five_dimensional(work: Path) -> Outcome:
    """A 5D image, clean and edited."""
    src = _source(work, 'five.nii', memory_image('5d', (4, 4, 3, 2, 2)))
    store = Store(work / 'store')
    assert nt.resolve(nt.load(src), store=store).action == 'original'
    img = nt.load(src)
    img.get_fdata()[1, 1, 1, 1, 1] = -1
    _written_exactly(img, store)
    return Outcome('clean: original; edited: written, all 5 axes exact')


@check('input')
def big_endian(work: Path) -> Outcome:
    """A big-endian NIfTI file."""
    img = nib.Nifti1Image(
        np.arange(60, dtype='>i2').reshape(3, 4, 5), np.eye(4), nib.Nifti1Header(endianness='>')
    )
    src = _source(work, 'be.nii', img)
    assert src.read_bytes()[:4] == (348).to_bytes(4, 'big')
    store = Store(work / 'store')
    assert nt.resolve(nt.load(src), store=store).action == 'original'
    img = nt.load(src)
    img.get_fdata()[0, 0, 0] = 1000.5
    _written_exactly(img, store)
    return Outcome('clean: original; edited: written, values exact')


@check('input')
def nan_and_negative_zero(work: Path) -> Outcome:
    """NaN and -0.0 in the data: cleanliness and digest agree."""
    data = noise('nan', (4, 4, 4))
    data[0, 0, 0], data[1, 1, 1] = np.nan, -0.0
    src = _source(work, 'nan.nii', nib.Nifti1Image(data, np.eye(4)))
    store = Store(work / 'store')
    img = nt.load(src)
    img.get_fdata()  # a filled cache, NaN and -0.0 included
    assert nt.dirty_reason(img) is None
    assert nt.image_digest(img) == nt.image_digest(nt.load(src))
    img.get_fdata()[1, 1, 1] = 0.0  # -0.0 -> 0.0: equal as numbers, not as bits
    assert nt.dirty_reason(img) == 'data edited after get_fdata()'
    assert nt.image_digest(img) != nt.image_digest(nt.load(src))
    res = _written_exactly(img, store)
    out = np.asanyarray(reload_exact(res.path).dataobj)
    assert not np.signbit(out[1, 1, 1]) and np.isnan(out[0, 0, 0])
    return Outcome(
        'NaN kept clean with equal digests; -0.0 -> 0.0 seen as an edit, written bit-exact'
    )


@check('input')
def non_contiguous_array(work: Path) -> Outcome:
    """A strided, non-contiguous view as data."""
    base = noise('strided', (16, 16, 16))
    img = nib.Nifti1Image(base[::2, 1::2, ::-2], np.eye(4))
    twin = nib.Nifti1Image(np.ascontiguousarray(base[::2, 1::2, ::-2]), np.eye(4))
    res = _written_exactly(img, Store(work / 'store'))
    assert nt.image_digest(img) == nt.image_digest(twin)
    return Outcome(f'written exact; same digest as its contiguous copy ({res.action})')


@check('input')
def fortran_ordered(work: Path) -> Outcome:
    """A Fortran-ordered array and its C-ordered twin."""
    data = noise('fortran', (5, 6, 7))
    store = Store(work / 'store')
    a = _written_exactly(nib.Nifti1Image(np.asfortranarray(data), np.eye(4)), store)
    b = nt.resolve(nib.Nifti1Image(np.ascontiguousarray(data), np.eye(4)), store=store)
    assert (b.action, b.path) == ('reused', a.path), b
    return Outcome('written exact; the C-ordered twin reuses the same file')


@check('input')
def memmapped_array(work: Path) -> Outcome:
    """A numpy memmap as data."""
    mm = np.memmap(work / 'raw.dat', dtype='f4', mode='w+', shape=(6, 6, 6))
    mm[:] = noise('memmap', (6, 6, 6))
    mm.flush()
    store = Store(work / 'store')
    res = _written_exactly(nib.Nifti1Image(mm, np.eye(4)), store)
    twin = nt.resolve(nib.Nifti1Image(np.array(mm), np.eye(4)), store=store)
    assert twin.path == res.path
    return Outcome('written exact; same file as the in-memory copy')


@check('input')
def complex_dtype(work: Path) -> Outcome:
    """complex64 data."""
    data = (noise('re', (4, 4, 4)) + 1j * noise('im', (4, 4, 4))).astype(np.complex64)
    src = _source(work, 'complex.nii', nib.Nifti1Image(data, np.eye(4)))
    store = Store(work / 'store')
    assert nt.resolve(nt.load(src), store=store).action == 'original'
    img = nt.load(src)
    img.header['descrip'] = b'edited'
    _written_exactly(img, store, raw=data)
    return Outcome('clean: original; edited: written as complex64, exact')


@check('input')
def rgb_dtype(work: Path) -> Outcome:
    """RGB24 structured data."""
    rgb = np.zeros((4, 4, 4), dtype=[('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
    rgb['R'] = np.arange(64).reshape(4, 4, 4)
    rgb['B'] = 255
    store = Store(work / 'store')
    src = _source(work, 'rgb.nii', nib.Nifti1Image(rgb, np.eye(4)))
    assert nt.resolve(nt.load(src), store=store).action == 'original'
    _written_exactly(nib.Nifti1Image(rgb, np.eye(4)), store, raw=rgb)
    return Outcome('clean: original; in memory: written as RGB24, exact')


@check('input')
def scaled_integers(work: Path) -> Outcome:
    """int16 data with scaling, cache edited with a fraction."""
    img = nib.Nifti1Image(noise('scaled', (6, 6, 6)) * 100, np.eye(4), dtype=np.int16)
    src = _source(work, 'scaled.nii', img)
    store = Store(work / 'store')
    img = nt.load(src)
    assert img.dataobj.slope != 1.0
    assert nt.resolve(img, store=store).action == 'original'
    edited = nt.load(src)
    edited.get_fdata()[2, 2, 2] = 0.123456789
    _written_exactly(edited, store)
    header_only = nt.load(src)
    header_only.header['descrip'] = b'edited'
    res = _written_exactly(header_only, store)
    out = reload_exact(res.path).dataobj
    assert (out.slope, out.inter) == (img.dataobj.slope, img.dataobj.inter)
    return Outcome('clean: original; cache edit written exact; header edit keeps slope/inter')


@check('input')
def zero_sized_axis(work: Path) -> Outcome:
    """An image with a zero-length axis."""
    store = Store(work / 'store')
    img = nib.Nifti1Image(np.zeros((0, 3, 3), 'f4'), np.eye(4))
    res = nt.resolve(img, store=store)
    out = reload_exact(res.path)
    assert out.shape == (0, 3, 3) and np.asanyarray(out.dataobj).size == 0, out.shape
    assert nt.resolve(img, store=store).path == res.path
    return Outcome('written: the header keeps shape (0, 3, 3), no voxels')


@check('input')
def no_affine(work: Path) -> Outcome:
    """An image without an affine."""
    img = nib.Nifti1Image(noise('noaff', (3, 3, 3)), None)
    res = _written_exactly(img, Store(work / 'store'), raw=np.asanyarray(img.dataobj))
    out = reload_exact(res.path)
    assert np.array_equal(out.affine, img.header.get_best_affine())
    return Outcome("written exact; the tool sees the header's default affine, as nibabel does")


def _test_f_interface() -> Any:
    """A nipype command ``test -f <in_file>``: it fails unless the shell gets the path."""
    from nipype.interfaces.base import CommandLine, CommandLineInputSpec, File

    class TestInput(CommandLineInputSpec):
        in_file = File(exists=True, argstr='%s', position=0, mandatory=True)

    class TestFile(CommandLine):
        _cmd = 'test -f'
        input_spec = TestInput

    return nt.accept_images(TestFile)


@check('input')
def shell_metacharacters_in_names(work: Path) -> Outcome:
    """File names with spaces, unicode and shell metacharacters, through a real command."""
    store = nt.set_store(Store(work / 'store'))
    try:
        test_f = _test_f_interface()
        names = ['sub 01.nii', 'séance_été.nii', 'a;b&c|d$(touch PWNED)`id`\'".nii', '-rf.nii']
        for name in names:
            src = _source(work, name)
            clean, dirty = nt.load(src), nt.load(src)
            dirty.header['descrip'] = b'edited'
            for img, want in ((clean, str(src)), (dirty, None)):
                interface = test_f(in_file=img)
                argv = shlex.split(interface.cmdline)
                path = argv[2]
                assert want is None or path == want, (argv, want)
                assert want is not None or Path(path).is_relative_to(store.root), argv
                result = interface.run(cwd=str(work))
                assert result.runtime.returncode == 0
        assert not (work / 'PWNED').exists()
    finally:
        nt.set_store(None)
    return Outcome(
        f'{len(names)} names, clean and dirty: test -f <path> ran, shell-quoted, nothing injected'
    )


@check('input')
def long_unicode_stem(work: Path) -> Outcome:
    """A source stem at the file-system name limit, multi-byte unicode."""
    stem = fit('sujet-é' * 60, 255 - len('.nii'))
    src = _source(work, stem + '.nii')
    img = nt.load(src)
    img.header['descrip'] = b'edited'
    res = _written_exactly(img, Store(work / 'store'), formats=('.nii.gz',))
    name = Path(res.path).name
    assert len(name.encode()) <= 87, name
    return Outcome(
        f'{len((stem + ".nii").encode())}-byte source name -> {name!r} ({len(name)} bytes)'
    )


@check('input')
def read_only_source(work: Path) -> Outcome:
    """A read-only source file (and directory)."""
    (work / 'ro').mkdir()
    src = _source(work / 'ro', 'src.nii')
    before = fingerprint(src)
    src.chmod(0o444)
    (work / 'ro').chmod(0o555)
    try:
        store = Store(work / 'store')
        assert nt.resolve(nt.load(src), store=store).action == 'original'
        img = nt.load(src)
        img.affine[0, 3] += 1
        _written_exactly(img, store)
    finally:
        (work / 'ro').chmod(0o755)
    assert fingerprint(src) == before
    return Outcome('clean: original; edited: written to the store; source untouched')


# ------------------------------------------------------------------ the > 2 GiB image


def add_one(img: Any) -> Any:
    """A Function-node body (module level, so that nodes holding it pickle)."""
    return img


@check('input', slow=True)
def image_over_2_gib(work: Path) -> Outcome:
    """A 2.15 GB image (nipype issue 2924): travels as a path, never pickled whole."""
    from nipype.interfaces.utility import Function
    from nipype.pipeline import engine as pe

    shape = (1024, 1024, 1025)  # int16: 2 149 580 800 bytes > 2 GiB
    src = work / 'huge.nii'
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(np.eye(4), 1)
    hdr.set_sform(np.eye(4), 1)
    marks = {(0, 0, 0): 1, (1023, 1023, 1024): -2, (512, 7, 300): 3}
    with open(src, 'wb') as f:
        hdr.write_to(f)
        f.write(b'\0' * (352 - f.tell()))
        f.truncate(352 + 2 * int(np.prod(shape)))  # sparse: zeros cost no disk
        for (i, j, k), value in marks.items():  # Fortran order on disk
            f.seek(352 + 2 * (i + shape[0] * (j + shape[1] * k)))
            f.write(np.int16(value).tobytes())
    store = nt.set_store(Store(work / 'store'))
    try:
        img = nt.load(src)
        start = time.perf_counter()
        assert nt.as_filename(img) == str(src)
        clean_s = time.perf_counter() - start
        img.header['descrip'] = b'edited in memory'
        node = pe.Node(
            Function(input_names=['img'], output_names=['out'], function=add_one), name='n'
        )
        node.inputs.img = img
        start = time.perf_counter()
        payload = pickle.dumps(deepcopy(node))  # what MultiProc sends to a worker
        dirty_s = time.perf_counter() - start
        assert len(payload) < 64 * 1024, len(payload)
        worker = pickle.loads(payload)
        back = worker.inputs.img
        path = back.get_filename()
        assert Path(path).is_relative_to(store.root), path
        assert back.shape == shape and back.header['descrip'] == b'edited in memory'
        data = back.dataobj
        for (i, j, k), value in marks.items():
            assert data[i, j, k] == value
        got, want = np.asanyarray(data), np.asanyarray(img.dataobj)
        step = 64
        for z in range(0, shape[2], step):  # every voxel, a slab at a time
            assert np.array_equal(got[..., z : z + step], want[..., z : z + step]), z
        size = os.path.getsize(path)
        del got, want, data, back, worker, img, node
        _gc.collect()
    finally:
        nt.set_store(None)
        shutil.rmtree(work / 'store', ignore_errors=True)
        src.unlink()
    return Outcome(
        f'{size / 1e9:.2f} GB: clean as_filename {clean_s * 1000:.1f} ms, no data read; '
        f'dirty node pickled for MultiProc in {dirty_s:.1f} s as {len(payload)} bytes '
        '(a store path), every voxel equal in the worker'
    )


# =========================================================================== concurrency


@dataclass
class ConcurrencyReport:
    processes: int
    threads: int
    rounds: int
    resolutions: int = 0
    wrong_paths: int = 0
    errors: list[str] = field(default_factory=list)
    contents: int = 0
    entries: int = 0
    max_files_per_content: int = 0
    max_paths_per_content: int = 0
    damaged: int = 0
    damaged_rewritten: int = 0
    rewritten_after_gc: int = 0
    gc_passes: int = 0
    gc_removed: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f'{self.processes} processes x {self.threads} threads x {self.rounds} rounds: '
            f'{self.resolutions} resolutions of {self.contents} contents, '
            f'{self.wrong_paths} wrong paths handed out, {len(self.errors)} errors, '
            f'{self.max_paths_per_content} path and {self.max_files_per_content} file per '
            f'content; {self.damaged_rewritten} of {self.damaged} damaged entries rewritten; '
            f'gc ran {self.gc_passes} passes alongside, deleted {self.gc_removed} idle '
            f'entries and {self.rewritten_after_gc} were written again when needed '
            f'({self.seconds:.1f} s)'
        )


SHARED = 6
DISTINCT = 2

_GC_LOOP = """
import os, sys
from nipype_nibtrack.cli import main
print('ready', flush=True)
while not os.path.exists(sys.argv[1]):
    main(['store', 'gc', '--older-than', '1'])
"""


def _expected(key: tuple) -> tuple[np.ndarray, bytes]:
    return noise(key, (10, 10, 10)), repr(key).encode()[:79]


def _build(key: tuple, sources: Path) -> Any:
    data, descrip = _expected(key)
    if key[0] == 'shared' and key[1] % 2:  # a loaded file, its header edited
        img = nt.load(sources / f'shared{key[1]}.nii')
    else:  # an array in memory
        img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header['descrip'] = descrip
    return img


def _verify(path: str, key: tuple) -> bool:
    data, descrip = _expected(key)
    try:
        out = nib.load(path, mmap=False)
        got = np.asanyarray(out.dataobj)
    except Exception:
        return False
    return got.tobytes() == data.tobytes() and out.header['descrip'].item() == descrip


def _worker(p: int, threads: int, root: str, sources: Path, out: Path) -> None:
    store = Store(root)
    results: list = []
    lock = threading.Lock()

    def thread(t: int) -> None:
        keys = [('shared', k) for k in range(SHARED)] + [
            ('distinct', p, t, j) for j in range(DISTINCT)
        ]
        random.Random(f'{p}-{t}').shuffle(keys)
        for key in keys:
            try:
                res = nt.resolve(_build(key, sources), store=store)
                row = [list(key), res.path, res.action, _verify(res.path, key), None]
            except Exception as err:  # counted and reported, never hidden
                row = [list(key), None, None, False, short(err, 200)]
            with lock:
                results.append(row)

    pool = [threading.Thread(target=thread, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    out.write_text(json.dumps(results))


def run_concurrency(
    work: Path, processes: int = 16, threads: int = 16, rounds: int = 3
) -> ConcurrencyReport:
    """Many resolvers at once, sharing some contents, against one store.

    Round 1 starts empty; before round 2 two shared entries are damaged (truncated, one
    byte flipped); before round 3 every entry is aged by two days while a separate
    process runs ``nibtrack store gc --older-than 1`` in a loop. Every returned path is
    re-read by its resolver right away, and by this process at the end of each round.
    """
    report = ConcurrencyReport(processes, threads, rounds)
    root = work / 'store'
    sources = work / 'sources'
    sources.mkdir(parents=True)
    for k in range(1, SHARED, 2):
        data, _ = _expected(('shared', k))
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), sources / f'shared{k}.nii')
    store = Store(root)
    seen: dict[tuple, set[str]] = {}
    start = time.monotonic()
    for rnd in range(rounds):
        gc_proc = None
        stop = work / f'stop{rnd}'
        if rnd == 1:
            for k, how in ((0, 'truncate'), (1, 'flip')):
                path = Path(next(iter(seen[('shared', k)])))
                _flip(path) if how == 'flip' else os.truncate(path, path.stat().st_size - 7)
                report.damaged += 1
        if rnd == 2:
            for entry in store._entries():
                when = time.time() - 2 * 86400
                os.utime(entry.path, (when, when))
            gc_proc = subprocess.Popen(
                [sys.executable, '-c', _GC_LOOP, str(stop)],
                env={**os.environ, 'NIBTRACK_STORE': str(root)},
                stdout=subprocess.PIPE,
                text=True,
            )
            assert gc_proc.stdout.readline().strip() == 'ready'
        pids = [
            fork(
                lambda p=p, r=rnd: _worker(p, threads, str(root), sources, work / f'r{r}p{p}.json')
            )
            for p in range(processes)
        ]
        statuses = [wait(pid, timeout=600) for pid in pids]
        if gc_proc is not None:
            stop.write_text('')
            out, _ = gc_proc.communicate(timeout=120)
            lines = [line for line in out.splitlines() if line.startswith('removed')]
            report.gc_passes += len(lines)
            report.gc_removed += sum(int(line.split()[1]) for line in lines)
        assert statuses == [0] * processes, statuses
        for p in range(processes):
            rows = json.loads((work / f'r{rnd}p{p}.json').read_text())
            for key, path, action, ok, error in rows:
                key = tuple(key)
                report.resolutions += 1
                if action == 'written' and rnd == 1:
                    report.damaged_rewritten += 1
                if action == 'written' and rnd == 2:
                    report.rewritten_after_gc += 1
                if error is not None:
                    report.errors.append(error)
                    continue
                if not ok or not _verify(path, key):  # right away, and still at the end
                    report.wrong_paths += 1
                seen.setdefault(key, set()).add(path)
    report.seconds = time.monotonic() - start
    report.contents = len(seen)
    report.entries = len(store._entries())
    report.max_paths_per_content = max(len(paths) for paths in seen.values())
    per_entry = {}
    for path in image_files(store):
        per_entry[path.parent.name] = per_entry.get(path.parent.name, 0) + 1
    report.max_files_per_content = max(per_entry.values())
    return report
