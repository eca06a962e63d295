"""A content-addressed store of written images.

Layout under the store root::

    objects/ab/ab12...ef/<stem><ext>         the image (plus .hdr for pairs)
    objects/ab/ab12...ef/.<stem><ext>.json   manifest: size of every file of the entry
    tmp/<digest>.<random>/                   writes in progress
    locks/<digest>.lock                      one writer per digest (filelock)

An entry is written in ``tmp/`` on the same filesystem, then hard-linked into place:
``link`` never replaces an existing file, so an entry, once there, is never rewritten
or touched (nipype hashes files by size and mtime: a rewrite would rerun every node
downstream). The manifest is linked before the image, so an image without a matching
manifest was never completed and is never handed out. The directory's mtime records
the last use, for :meth:`Store.gc`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ['ENV_VAR', 'Store', 'StoreError', 'default_store_path', 'get_store', 'set_store']

ENV_VAR = 'NIBTRACK_STORE'
_HEX = re.compile(r'^[0-9a-f]{32}$')
_RECENT_SECONDS = 3600.0


class StoreError(OSError):
    """Writing to or reading from the store failed; the message names the store."""


def default_store_path() -> Path:
    """``$NIBTRACK_STORE``, else ``$XDG_CACHE_HOME/nipype_nibtrack/store`` (``~/.cache``).

    >>> import os
    >>> os.environ.get('NIBTRACK_STORE') is None or str(default_store_path()) != ''
    True
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().absolute()
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(cache).absolute() / 'nipype_nibtrack' / 'store'


@dataclass(frozen=True)
class StoreInfo:
    """Location and size of a store."""

    location: str
    entries: int
    files: int
    bytes: int


@dataclass(frozen=True)
class GcReport:
    """What :meth:`Store.gc` removed and kept."""

    removed: int
    freed_bytes: int
    kept: int
    skipped_busy: int


@dataclass(frozen=True)
class _Entry:
    path: Path
    used: float
    size: int


class Store:
    """A content-addressed store rooted at ``root``.

    Parameters
    ----------
    root : path-like
        Created if missing. The default location (:func:`default_store_path`) is
        created private to the user (mode 0700); a path given here is used as is.

    Examples
    --------
    >>> import tempfile
    >>> store = Store(tempfile.mkdtemp())
    >>> digest = '0123456789abcdef0123456789abcdef'
    >>> path, written = store.put(digest, 'brain.txt', lambda p: p.write_text('voxels'))
    >>> written, path.name, path.read_text()
    (True, 'brain.txt', 'voxels')
    >>> store.put(digest, 'brain.txt', lambda p: p.write_text('other'))[1]
    False
    >>> store.info().entries
    1
    """

    def __init__(self, root: str | os.PathLike, *, private: bool = False):
        self.root = Path(root).expanduser().absolute()
        self._private = private
        self._ready = False

    def __repr__(self) -> str:
        return f'Store({str(self.root)!r})'

    @property
    def objects(self) -> Path:
        return self.root / 'objects'

    def _prepare(self) -> None:
        if self._ready:
            return
        try:
            if self._private and not self.root.exists():
                os.makedirs(self.root, mode=0o700)
            for sub in ('objects', 'tmp', 'locks'):
                os.makedirs(self.root / sub, mode=0o700 if self._private else 0o777, exist_ok=True)
        except OSError as err:
            raise StoreError(
                err.errno,
                f'cannot create the image store at {self.root}: {err.strerror}. '
                f'Set {ENV_VAR} to a writable directory',
            ) from err
        self._ready = True

    def entry_dir(self, digest: str) -> Path:
        if not _HEX.match(digest):
            raise ValueError(f'not a store digest: {digest!r}')
        return self.objects / digest[:2] / digest

    def _lock(self, digest: str) -> FileLock:
        return FileLock(str(self.root / 'locks' / f'{digest}.lock'), thread_local=False)

    def lookup(self, digest: str, name: str) -> Path | None:
        """The complete entry ``name`` of ``digest``, or None. Never follows symlinks."""
        entry = self.entry_dir(digest)
        manifest = _read_manifest(entry, name)
        if manifest is None:
            return None
        for fname, size in manifest.items():
            st = _lstat(entry / fname)
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_size != size:
                return None
        with contextlib.suppress(OSError):  # last use, for gc; never the file itself
            os.utime(entry)
        return entry / name

    def put(self, digest: str, name: str, write: Callable[[Path], object]) -> tuple[Path, bool]:
        """Return the entry ``name`` of ``digest``, writing it with ``write(path)`` if needed.

        Returns
        -------
        (path, written)
            ``written`` is False when a complete entry was reused untouched.
        """
        _check_name(name)
        found = self.lookup(digest, name)
        if found is not None:
            return found, False
        self._prepare()
        with self._lock(digest):
            found = self.lookup(digest, name)
            if found is not None:
                return found, False
            return self._write(digest, name, write), True

    def _write(self, digest: str, name: str, write: Callable[[Path], object]) -> Path:
        entry = self.entry_dir(digest)
        tmpdir = Path(tempfile.mkdtemp(prefix=f'{digest}.', dir=self.root / 'tmp'))
        try:
            write(tmpdir / name)
            files = {f: (tmpdir / f).stat().st_size for f in sorted(os.listdir(tmpdir))}
            if name not in files:
                raise StoreError(errno.EIO, f'writing {name} produced {sorted(files)}')
            manifest = _manifest_name(name)
            (tmpdir / manifest).write_text(json.dumps({'digest': digest, 'files': files}))
            if _lstat(entry) is not None and not stat.S_ISDIR(_lstat(entry).st_mode):
                raise StoreError(errno.EEXIST, f'{entry} is not a directory; remove it')
            entry.mkdir(parents=True, exist_ok=True)
            # A stale partial entry (a killed writer, a damaged file) goes first
            for fname in [*files, manifest]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry / fname)
            for fname in [*(f for f in files if f != name), manifest, name]:
                os.link(tmpdir / fname, entry / fname)
        except StoreError:
            raise
        except OSError as err:
            raise StoreError(
                err.errno,
                f'could not write {name} to the image store at {self.root}: '
                f'{err.strerror or err}. Free space there or set {ENV_VAR} to another '
                'directory',
            ) from err
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return entry / name

    def _entries(self) -> list[_Entry]:
        entries = []
        if not self.objects.is_dir():
            return entries
        for shard in self.objects.iterdir():
            if not shard.is_dir() or shard.is_symlink():
                continue
            for entry in shard.iterdir():
                st = _lstat(entry)
                if st is None or not stat.S_ISDIR(st.st_mode) or not _HEX.match(entry.name):
                    continue
                size = sum(
                    s.st_size
                    for f in entry.iterdir()
                    if (s := _lstat(f)) is not None and stat.S_ISREG(s.st_mode)
                )
                entries.append(_Entry(entry, st.st_mtime, size))
        return entries

    def info(self) -> StoreInfo:
        """Location, number of entries, number of image files and bytes used."""
        entries = self._entries()
        files = sum(1 for e in entries for f in e.path.iterdir() if not f.name.startswith('.'))
        return StoreInfo(str(self.root), len(entries), files, sum(e.size for e in entries))

    def gc(
        self,
        older_than_days: float | None = None,
        max_bytes: int | None = None,
        *,
        keep_recent_seconds: float = _RECENT_SECONDS,
    ) -> GcReport:
        """Delete entries unused for ``older_than_days``, then the least recently used
        until the store holds at most ``max_bytes``.

        An entry being written (its lock is held) or used in the last
        ``keep_recent_seconds`` (one hour by default) is never deleted. Leftovers of
        killed writers are removed.
        """
        now = time.time()
        entries = sorted(self._entries(), key=lambda e: e.used)
        total = sum(e.size for e in entries)
        removed = freed = busy = 0
        for entry in entries:
            old = older_than_days is not None and now - entry.used > older_than_days * 86400
            over = max_bytes is not None and total > max_bytes
            if not (old or over) or now - entry.used < keep_recent_seconds:
                continue
            try:
                with self._lock(entry.path.name).acquire(timeout=0):
                    shutil.rmtree(entry.path)
            except Timeout:
                busy += 1
                continue
            removed += 1
            freed += entry.size
            total -= entry.size
        busy += self._clean_tmp()
        return GcReport(removed, freed, len(entries) - removed, busy)

    def _clean_tmp(self) -> int:
        busy = 0
        tmp = self.root / 'tmp'
        if not tmp.is_dir():
            return 0
        for leftover in tmp.iterdir():
            digest = leftover.name.split('.', 1)[0]
            if not _HEX.match(digest):
                continue
            try:
                with self._lock(digest).acquire(timeout=0):
                    shutil.rmtree(leftover, ignore_errors=True)
            except Timeout:
                busy += 1
        return busy


def _manifest_name(name: str) -> str:
    return f'.{name}.json'


def _read_manifest(entry: Path, name: str) -> dict[str, int] | None:
    path = entry / _manifest_name(name)
    st = _lstat(path)
    if st is None or not stat.S_ISREG(st.st_mode):
        return None
    try:
        files = json.loads(path.read_text())['files']
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, dict) or name not in files:
        return None
    if any('/' in f or f.startswith('..') for f in files):
        return None
    return files


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _check_name(name: str) -> None:
    if not name or '/' in name or '\0' in name or name.startswith('.') or len(name) > 200:
        raise ValueError(f'not a safe store file name: {name!r}')


_store: Store | None = None
_store_lock = threading.Lock()


def get_store() -> Store:
    """The store in use: the one given to :func:`set_store`, else the default location.

    >>> isinstance(get_store(), Store)
    True
    """
    with _store_lock:
        if _store is not None:
            return _store
        env = os.environ.get(ENV_VAR)
        return Store(default_store_path(), private=not env)


def set_store(location: str | os.PathLike | Store | None) -> Store:
    """Use ``location`` as the store from now on (None: back to the default).

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> set_store(root).root == Store(root).root
    True
    >>> _ = set_store(None)
    """
    global _store
    with _store_lock:
        _store = (
            None
            if location is None
            else (location if isinstance(location, Store) else Store(location))
        )
    return get_store()
