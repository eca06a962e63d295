"""A content-addressed store of written images.

Layout under the store root::

    objects/ab/ab12...ef/<stem><ext>         the image (plus .hdr for pairs)
    objects/ab/ab12...ef/.<stem><ext>.json   manifest: size and xxh3 of every file of the entry
                                             (whole, or by parts), and the version of the
                                             digest that keyed it
    objects/ab/ab12...ef/..<stem><ext>.json.sealing  the manifest being sealed (see
                                             Store._seal); gc removes one a kill left
    tmp/<digest>.<random>/                   writes in progress
    locks/<digest>.lock                      flock: exclusive to write or delete, shared to use

An entry is written in ``tmp/`` on the same filesystem, then hard-linked into place:
``link`` never replaces an existing file, so an entry, once there, is never rewritten
or touched (nipype hashes files by size and mtime: a rewrite would rerun every node
downstream). The manifest is linked before the image, so an image without a matching
manifest was never completed and is never handed out.

Before an entry is handed out its files are checked against the manifest: size always,
xxh3 of the bytes for files up to :data:`VERIFY_MAX_BYTES` (of the whole file, or of its
parts: an image's voxels are hashed after their dtype and shape, as the data digest
hashes them, so that a writer hashes them once), memoised per file identity
once it has settled (see :mod:`.fileid`), so that reusing an unchanged entry costs a
``stat``. A damaged entry is written again under its lock; an intact one never is.

The store never follows a symbolic link below its root, never unpickles anything, and
never lets a name escape its entry directory. The directory's mtime records the last
use; :meth:`Store.gc` re-reads it under the entry's lock before deleting, and a lookup
refreshes it under the same lock (shared), so an entry being handed out is never lost.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .digest import DIGEST_VERSION, _Memo
from .fileid import FileId
from .locks import renew_after_fork

__all__ = [
    'ENV_VAR',
    'RECENT_SECONDS',
    'VERIFY_MAX_BYTES',
    'Store',
    'StoreError',
    'chosen_store',
    'default_store_path',
    'get_store',
    'set_store',
]

logger = logging.getLogger('nipype_nibtrack')

ENV_VAR = 'NIBTRACK_STORE'
#: Entries used more recently than this (seconds) are never deleted by :meth:`Store.gc`:
#: the grace period during which a tool may still be reading a path it was handed.
RECENT_SECONDS = 3600.0
#: Files up to this size have their bytes re-hashed (xxh3, ~10 ms for 64 MiB from the
#: page cache) when first reused in a process; larger ones get a size check only.
VERIFY_MAX_BYTES = 64 << 20

_HEX = re.compile(r'^[0-9a-f]{32}$')
_NAME_MAX_BYTES = 200  # file systems allow 255 bytes; the manifest adds '.' and '.json'
_MANIFEST_MAX_BYTES = 1 << 16
_BLOCK_BYTES = 1 << 24
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted in an entry never blocks a reader (fstat then refuses it)
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_ACCESS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
#: errno values that say the store, not the image being written, is the problem.
_STORE_ERRNOS = _SPACE | _ACCESS | frozenset({errno.ENAMETOOLONG, errno.EMLINK, errno.EXDEV})


def _names_a_file_in(err: OSError, folder: Path) -> bool:
    """True when ``err`` names a file in ``folder``: an entry being written, whatever
    its errno, is the store's problem (a read of the image raises its own errors).

    >>> _names_a_file_in(OSError(5, 'Input/output error', '/s/tmp/x/a.nii'), Path('/s/tmp/x'))
    True
    >>> _names_a_file_in(OSError(5, 'Input/output error'), Path('/s/tmp/x'))
    False
    """
    name = err.filename
    if not isinstance(name, (str, os.PathLike)):
        return False
    return Path(os.path.dirname(os.fspath(name))) == folder


class StoreError(OSError):
    """Writing to or reading from the store failed.

    The message names the store, the cause and what to do about it.
    """


class _Busy(Exception):
    """The entry's lock is held by another writer, reader or gc."""


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


# (path, identity, expected xxh3) of entry files whose bytes were checked in this process
_verified = _Memo(4096)

# Descriptors holding store locks: a forked child closes its copies, so that a lock
# taken by another thread of the parent is not held on for the child's whole life.
_held_fds: set[int] = set()
_held_lock = threading.Lock()


def _close_inherited_locks() -> None:
    for fd in list(_held_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class Store:
    """A content-addressed store rooted at ``root``.

    Parameters
    ----------
    root : path-like
        Created if missing. The default location (:func:`default_store_path`) is
        created private to the user (mode 0700); a path given here is used as is.
    verify_max_bytes : int
        Files up to this size are re-hashed before their first reuse in a process.

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

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        private: bool = False,
        verify_max_bytes: int = VERIFY_MAX_BYTES,
    ):
        self.root = Path(root).expanduser().absolute()
        # plain strings on the lookup path: pathlib costs more than the syscalls there
        self._objects = os.path.join(self.root, 'objects')
        self._locks = os.path.join(self.root, 'locks')
        self._private = private
        self._ready = False
        self.verify_max_bytes = verify_max_bytes

    def __repr__(self) -> str:
        return f'Store({str(self.root)!r})'

    @property
    def objects(self) -> Path:
        return self.root / 'objects'

    # ----------------------------------------------------------------------- errors

    def _error(self, err: OSError, doing: str) -> StoreError:
        """A StoreError naming the store, the cause and what to do."""
        if err.errno in (errno.ENOTDIR, errno.EEXIST) and (problem := self._root_problem()):
            return problem
        cause = err.strerror or str(err)
        if err.errno in _SPACE:
            advice = (
                'Free space there (nibtrack store gc --max-bytes N deletes the least '
                f'recently used entries) or set {ENV_VAR} to a directory with room'
            )
        elif err.errno in _ACCESS:
            advice = (
                'Make it writable by this user (check its permissions, and that its file '
                f'system is not mounted read-only) or set {ENV_VAR} to a writable directory'
            )
        elif err.errno == errno.EXDEV:
            advice = f'Keep objects/ and tmp/ on one file system, or set {ENV_VAR} elsewhere'
        else:
            advice = f'Check that directory, or set {ENV_VAR} to another one'
        return StoreError(
            err.errno, f'{doing} in the image store at {self.root} failed: {cause}. {advice}'
        )

    def _root_problem(self) -> StoreError | None:
        """A StoreError when the root, or a folder above it, exists but is no directory."""
        for path in (self.root, *self.root.parents):
            try:
                st = os.stat(path)  # the root itself may be a link to a directory
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                return None
            if stat.S_ISDIR(st.st_mode):
                return None
            what = 'the store root' if path == self.root else f'{path}, above the store root,'
            return StoreError(
                errno.ENOTDIR,
                f'{what} is a file, not a directory, so the image store at {self.root} '
                f'cannot be used. Set {ENV_VAR} (or nt.set_store) to a directory, or move '
                f'that file away',
            )
        return None

    def _planted(self, path: Path) -> StoreError:
        problem = self._root_problem()
        if problem is not None:
            return problem
        return StoreError(
            errno.ELOOP,
            f'{path} in the image store at {self.root} is a symbolic link or not a '
            'directory; the store never follows links below its root. Remove it '
            f'(rm -r {shlex.quote(str(path))}) or set {ENV_VAR} to another directory',
        )

    # ----------------------------------------------------------------------- layout

    def _prepare(self) -> None:
        if self._ready:
            return
        try:
            if self._private and not os.path.lexists(self.root):
                os.makedirs(self.root, mode=0o700)
            for sub in ('objects', 'tmp', 'locks'):
                os.makedirs(self.root / sub, mode=0o700 if self._private else 0o777, exist_ok=True)
        except OSError as err:
            raise self._error(err, 'creating its folders') from err
        for sub in ('objects', 'tmp', 'locks'):
            self._real_dir(self.root / sub)
        self._ready = True

    def _real_dir(self, path: Path) -> bool:
        """True for a real directory, False when missing; a link or a file is refused."""
        st = _lstat(path)
        if st is None:
            return False
        if not stat.S_ISDIR(st.st_mode):
            raise self._planted(path)
        return True

    def entry_dir(self, digest: str) -> Path:
        if not _HEX.match(digest):
            raise ValueError(f'not a store digest: {digest!r}')
        return self.objects / digest[:2] / digest

    def _entry_exists(self, digest: str) -> bool:
        entry = self.entry_dir(digest)
        return all(self._real_dir(p) for p in (self.objects, entry.parent, entry))

    def _entry_fd(self, digest: str, *, create: bool) -> int | None:
        """A descriptor of the entry directory reached without following links.

        None when it is missing (``create`` False); a link on the way is refused.
        """
        try:
            fd = self._open_dir(self._objects)
        except FileNotFoundError:
            if create:
                raise
            return None
        path = self._objects
        try:
            for part in (digest[:2], digest):
                path = os.path.join(path, part)
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700 if self._private else 0o777, dir_fd=fd)
                try:
                    child = os.open(part, _O_DIR, dir_fd=fd)
                except FileNotFoundError:
                    if create:
                        raise
                    os.close(fd)
                    return None
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise self._planted(path) from err
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_dir(self, path: str | Path) -> int:
        try:
            return os.open(path, _O_DIR)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self._planted(Path(path)) from err
            raise

    # ----------------------------------------------------------------------- locks

    @contextlib.contextmanager
    def _hold(self, digest: str, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
        """Hold the entry's lock; yields False when a shared lock has no file to lock on.

        ``flock`` on ``locks/<digest>.lock``, opened without following links and never
        truncated. Raises :class:`_Busy` when ``wait`` is False and the lock is taken.
        """
        name = f'{digest}.lock'
        while True:
            opened = self._open_lock(name, shared)
            if opened is None:
                yield False
                return
            locks, fd = opened
            with _held_lock:
                _held_fds.add(fd)
            try:
                mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
                try:
                    fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise _Busy(digest) from None
                # gc may have unlinked the lock file before we locked it: that guards nothing
                held = os.fstat(fd)
                try:
                    now = os.stat(name, dir_fd=locks, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                    continue
                yield True
                return
            finally:
                with _held_lock:
                    _held_fds.discard(fd)
                os.close(fd)
                os.close(locks)

    def _open_lock(self, name: str, shared: bool) -> tuple[int, int] | None:
        """Descriptors of ``locks/`` and of the lock file ``name`` in it.

        None when a shared lock is asked for and there is no lock file to open (a
        read-only store, which nobody can gc either).
        """
        try:
            locks = self._open_dir(self._locks)
        except StoreError:
            raise
        except OSError as err:
            if shared and err.errno in (*_ACCESS, errno.ENOENT):
                return None
            if err.errno == errno.ENOENT:  # removed since the store was prepared
                self._ready = False
                self._prepare()
                return self._open_lock(name, shared)
            raise self._error(err, f'locking {name}') from err
        try:
            fd = self._open_lock_file(locks, name, shared)
        except BaseException:
            os.close(locks)
            raise
        if fd is None:
            os.close(locks)
            return None
        return locks, fd

    def _open_lock_file(self, locks: int, name: str, shared: bool) -> int | None:
        mode = 0o600 if self._private else 0o666
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(name, flags, mode, dir_fd=locks)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise self._planted(self.root / 'locks' / name) from err
            if err.errno not in (*_ACCESS, errno.ENOENT):
                raise self._error(err, f'locking {name}') from err
            first = err
        try:  # flock needs no write access: a read-only store can still be locked
            return os.open(name, _O_READ, dir_fd=locks)
        except OSError:
            if shared:
                return None
            raise self._error(first, f'locking {name}') from first

    # ----------------------------------------------------------------------- lookup

    def lookup(self, digest: str, name: str) -> Path | None:
        """The complete, intact entry ``name`` of ``digest``, or None.

        Checks every file of the entry against its manifest (size, and xxh3 up to
        ``verify_max_bytes``) and refreshes the entry's last use. Never follows links.

        Raises
        ------
        StoreError
            A directory of the store on the way to the entry is a symbolic link.

        Examples
        --------
        >>> import tempfile
        >>> store = Store(tempfile.mkdtemp())
        >>> store.lookup('cd' * 16, 'brain.nii') is None
        True
        >>> path, _ = store.put('cd' * 16, 'brain.nii', lambda p: p.write_bytes(b'voxels'))
        >>> store.lookup('cd' * 16, 'brain.nii') == path
        True
        >>> _ = path.write_bytes(b'damaged')  # someone else writes into the store
        >>> store.lookup('cd' * 16, 'brain.nii') is None
        True
        """
        if not _HEX.match(digest):
            raise ValueError(f'not a store digest: {digest!r}')
        fd = self._entry_fd(digest, create=False)  # no lock file is made for a miss
        if fd is None:
            return None
        try:
            # gc deletes only under the exclusive lock: what is checked here stays
            with self._hold(digest, shared=True):
                return self._check_in(fd, digest, name)[0]
        finally:
            os.close(fd)

    def _check(self, digest: str, name: str) -> tuple[Path | None, str | None]:
        """(path, None) for an intact entry, else (None, what is damaged or None)."""
        fd = self._entry_fd(digest, create=False)
        if fd is None:
            return None, None
        try:
            return self._check_in(fd, digest, name)
        finally:
            os.close(fd)

    def _check_in(self, fd: int, digest: str, name: str) -> tuple[Path | None, str | None]:
        with contextlib.suppress(OSError):  # last use, for gc; a read-only store keeps it
            os.utime(fd)
        manifest = _read_manifest(fd, name, digest)
        if manifest is None:
            if _lstat(name, fd) is not None:
                return None, 'no valid manifest'
            return None, None
        entry = os.path.join(self._objects, digest[:2], digest)
        for fname, (size, xxh3, mark) in manifest.items():
            damage = self._damage(fd, entry, fname, size, xxh3, mark)
            if damage is not None:
                return None, f'{fname}: {damage}'
        return Path(entry, name), None

    def _damage(
        self,
        dir_fd: int,
        entry: str,
        fname: str,
        size: int,
        xxh3: tuple | None,
        mark: tuple[int, int, int | None] | None = None,
    ) -> str | None:
        st = _lstat(fname, dir_fd)
        if st is None:
            return 'missing'
        if not stat.S_ISREG(st.st_mode):
            return 'not a regular file'
        if st.st_size != size:
            return f'{st.st_size} bytes instead of {size}'
        # A file too large to re-hash at every first use is trusted by its size only
        # while it is the file written (same inode, mtime and ctime; see _seal): a tool
        # that rewrote or replaced its input in the store, at the same size, even with
        # its mtime set back, is caught and re-hashed
        untouched = mark is not None and (st.st_ino, st.st_mtime_ns, st.st_ctime_ns) == mark
        if xxh3 is None:
            return None if mark is None or untouched else 'rewritten since it was stored'
        if size > self.verify_max_bytes and untouched:
            return None
        ident = FileId.from_stat(st)
        key = (entry, fname, ident, xxh3)
        if _verified.get(key):
            return None
        try:
            got, stable = _file_xxh3(fname, dir_fd, tuple(layout for layout, _ in xxh3))
        except OSError as err:
            return f'unreadable ({err.strerror or err})'
        if got != tuple(hexes for _, hexes in xxh3):
            return 'content differs from its manifest'
        if stable == ident and ident.settled():
            _verified.put(key, True)  # unchanged while read, and no rewrite can hide in a tick
        return None

    # ----------------------------------------------------------------------- write

    def put(self, digest: str, name: str, write: Callable[[Path], object]) -> tuple[Path, bool]:
        """Return the entry ``name`` of ``digest``, writing it with ``write(path)`` if needed.

        ``write`` writes the file(s) under the path it is given, in a private temporary
        folder of the store; it may return ``{file name: xxh3-128 hex}`` of the bytes it
        wrote, which the manifest then takes without reading the files again; or, for a
        file, a list of parts ``(start, seed hex, xxh3-128 hex)``: the xxh3 of the bytes
        ``seed`` followed by the file's bytes from ``start`` to the next part's start
        (to its end for the last part; the first starts at 0). An
        ``OSError`` it raises that is the store's (no space, read-only, permissions)
        becomes a :class:`StoreError`; anything else passes.

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
        with self._hold(digest):
            found, damage = self._check(digest, name)
            if found is not None:
                return found, False
            if damage is not None:
                logger.warning(
                    'store entry %s/%s is damaged (%s): writing it again',
                    self.entry_dir(digest),
                    name,
                    damage,
                )
            path = self._write(digest, name, write)
            self._seal(digest, name)
            return path, True

    def _seal(self, digest: str, name: str) -> None:
        """Add the files' final ctimes to the entry's manifest (``ctime``).

        A large file is trusted without re-hashing only while it keeps the inode, mtime
        and ctime it was stored with: mtime alone is the writer's to set back
        (``os.utime``), ctime is not. Linking into the entry and removing the tmp
        folder move ctime, so it is read after both. Best effort: a manifest left
        unsealed only makes its large files hashed again at first use.
        """
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError, KeyError):
            entry_fd = self._entry_fd(digest, create=False)
            if entry_fd is None:
                return
            try:
                manifest = _manifest_name(name)
                fd = os.open(manifest, _O_READ, dir_fd=entry_fd)
                try:
                    data = json.loads(os.read(fd, _MANIFEST_MAX_BYTES))
                finally:
                    os.close(fd)
                ctimes = {}
                for fname, mark in data['written'].items():
                    st = _lstat(fname, entry_fd)
                    if st is not None and [st.st_ino, st.st_mtime_ns] == mark:
                        ctimes[fname] = st.st_ctime_ns
                data['ctime'] = ctimes
                sealed = _sealing_name(name)
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(sealed, flags, 0o644, dir_fd=entry_fd)
                try:
                    try:
                        view = memoryview(json.dumps(data).encode())
                        while view:
                            view = view[os.write(fd, view) :]
                    finally:
                        os.close(fd)
                    os.replace(sealed, manifest, src_dir_fd=entry_fd, dst_dir_fd=entry_fd)
                except BaseException:  # never leave a half-written copy beside the entry
                    with contextlib.suppress(OSError):
                        os.unlink(sealed, dir_fd=entry_fd)
                    raise
            finally:
                os.close(entry_fd)

    def _write(self, digest: str, name: str, write: Callable[[Path], object]) -> Path:
        entry = self.entry_dir(digest)
        if not self._real_dir(self.root / 'tmp'):  # removed since the store was prepared
            self._ready = False
            self._prepare()
        try:
            tmpdir = Path(tempfile.mkdtemp(prefix=f'{digest}.', dir=self.root / 'tmp'))
        except OSError as err:
            raise self._error(err, f'writing {name}') from err
        try:
            try:
                result = write(tmpdir / name)
            except StoreError:
                raise
            except OSError as err:
                if err.errno not in _STORE_ERRNOS and not _names_a_file_in(err, tmpdir):
                    raise
                raise self._error(err, f'writing {name}') from err
            try:
                self._publish(tmpdir, digest, name, result if isinstance(result, dict) else {})
            except StoreError:
                raise
            except OSError as err:
                raise self._error(err, f'storing {name}') from err
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return entry / name

    def _publish(self, tmpdir: Path, digest: str, name: str, known: dict) -> None:
        """Hash the files written in ``tmpdir``, write the manifest, link them into place.

        ``known`` maps file names to the xxh3 of the bytes the writer wrote (hashed as it
        wrote them, in this process, into its private folder), whole or by parts (see
        :meth:`put`): those are not read again.
        """
        tmp_fd = self._open_dir(tmpdir)
        try:
            files: dict[str, tuple[int, str | None]] = {}
            parts: dict[str, list] = {}
            # (inode, mtime) of each file: linking into the entry keeps both, and any
            # later rewrite or replacement (a tool writing over its input) moves one
            written: dict[str, list[int]] = {}
            for fname in sorted(os.listdir(tmp_fd)):
                claim = known.get(fname)
                whole = isinstance(claim, str) and _HEX.match(claim)
                if whole or _parts(claim) is not None:
                    st = os.stat(fname, dir_fd=tmp_fd, follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and (whole or _parts(claim, st.st_size)):
                        files[fname] = (st.st_size, claim if whole else None)
                        if not whole:
                            parts[fname] = [[int(n), seed, h] for n, seed, h in claim]
                        written[fname] = [st.st_ino, st.st_mtime_ns]
                        continue
                ((xxh3,),), ident = _file_xxh3(fname, tmp_fd)
                if ident is None:
                    raise StoreError(
                        errno.EAGAIN,
                        f'{fname} changed while it was stored in the image store at '
                        f'{self.root}: another process writes in its tmp/ folder. Retry',
                    )
                files[fname] = (ident.size, xxh3)
                written[fname] = [ident.ino, ident.mtime_ns]
            if name not in files or any(not _safe_name(f) for f in files):
                raise StoreError(
                    errno.EIO,
                    f'writing {name} in the image store at {self.root} produced '
                    f'{sorted(files)}; nothing was stored. This is a bug: please report it',
                )
            manifest = _manifest_name(name)
            text = json.dumps(
                {
                    'version': 3,
                    'digest_version': DIGEST_VERSION,
                    'digest': digest,
                    'files': {f: v[0] for f, v in files.items()},
                    'xxh3': {f: v[1] for f, v in files.items() if v[1] is not None},
                    'parts': parts,
                    'written': written,
                }
            ).encode()
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(manifest, flags, 0o644, dir_fd=tmp_fd)
            try:
                view = memoryview(text)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            entry_fd = self._entry_fd(digest, create=True)
            try:
                # A stale partial entry (a killed writer, a damaged file) goes first
                for fname in [*files, manifest, _sealing_name(name)]:
                    try:
                        os.unlink(fname, dir_fd=entry_fd)
                    except FileNotFoundError:
                        pass
                    except IsADirectoryError:  # planted in the entry: never followed
                        shutil.rmtree(fname, dir_fd=entry_fd)
                for fname in [*(f for f in files if f != name), manifest, name]:
                    os.link(
                        fname, fname, src_dir_fd=tmp_fd, dst_dir_fd=entry_fd, follow_symlinks=False
                    )
            finally:
                os.close(entry_fd)
        finally:
            os.close(tmp_fd)

    # ----------------------------------------------------------------------- gc and info

    def _entries(self) -> list[_Entry]:
        entries = []
        if not self._real_dir(self.objects):
            return entries
        for shard in self.objects.iterdir():
            st = _lstat(shard)
            if st is None or not stat.S_ISDIR(st.st_mode):
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
        keep_recent_seconds: float = RECENT_SECONDS,
    ) -> GcReport:
        """Delete entries unused for ``older_than_days``, then the least recently used
        until the store holds at most ``max_bytes``.

        An entry is deleted only under its lock, after its last use is read again
        there: one being written or handed out (its lock is held) or used in the last
        ``keep_recent_seconds`` (one hour by default: the time a tool has to open a
        path it was handed) is never deleted. Leftovers of killed writers go too.

        Examples
        --------
        >>> import tempfile
        >>> store = Store(tempfile.mkdtemp())
        >>> _ = store.put('ab' * 16, 'old.txt', lambda p: p.write_text('x'))
        >>> store.gc(older_than_days=0).removed  # used just now: kept
        0
        >>> store.gc(older_than_days=0, keep_recent_seconds=0).removed
        1
        """
        entries = sorted(self._entries(), key=lambda e: e.used)
        total = sum(e.size for e in entries)
        removed = freed = busy = 0
        for entry in entries:
            if not self._unwanted(
                entry.used, older_than_days, max_bytes, total, keep_recent_seconds
            ):
                continue
            try:
                with self._hold(entry.path.name, wait=False):
                    # The listing is stale: a lookup may have used the entry since
                    st = _lstat(entry.path)
                    if st is None or not stat.S_ISDIR(st.st_mode):
                        continue
                    if not self._unwanted(
                        st.st_mtime, older_than_days, max_bytes, total, keep_recent_seconds
                    ):
                        continue
                    shutil.rmtree(entry.path)
            except _Busy:
                busy += 1
                continue
            except OSError as err:
                logger.warning('gc could not delete %s: %s', entry.path, err)
                continue
            removed += 1
            freed += entry.size
            total -= entry.size
        busy += self._clean_tmp()
        sealing_busy, sealing_bytes = self._clean_sealing(entries)
        self._clean_locks()
        return GcReport(
            removed, freed + sealing_bytes, len(entries) - removed, busy + sealing_busy
        )

    def _clean_sealing(self, entries: list[_Entry]) -> tuple[int, int]:
        """Remove the copies of manifests a killed :meth:`_seal` left in kept entries.

        A seal writes ``.<manifest>.sealing`` and renames it over the manifest, under the
        entry's exclusive lock: a copy found while the lock can be taken is a leftover.
        Returns (entries busy, bytes freed).
        """
        busy = freed = 0
        for entry in entries:
            try:
                names = [n for n in os.listdir(entry.path) if _SEALING.match(n)]
            except OSError:  # deleted above, or not readable
                continue
            if not names:
                continue
            try:
                with self._hold(entry.path.name, wait=False):
                    for leftover in names:
                        st = _lstat(entry.path / leftover)
                        if st is None or not stat.S_ISREG(st.st_mode):
                            continue
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path / leftover)
                            freed += st.st_size
            except _Busy:
                busy += 1
            except OSError as err:
                logger.warning('gc could not clean %s: %s', entry.path, err)
        return busy, freed

    @staticmethod
    def _unwanted(
        used: float, older: float | None, max_bytes: int | None, total: int, recent: float
    ) -> bool:
        age = time.time() - used
        if age < recent:
            return False
        return (older is not None and age > older * 86400) or (
            max_bytes is not None and total > max_bytes
        )

    def _clean_tmp(self) -> int:
        busy = 0
        tmp = self.root / 'tmp'
        if not self._real_dir(tmp):
            return 0
        for leftover in tmp.iterdir():
            digest = leftover.name.split('.', 1)[0]
            if not _HEX.match(digest):
                continue
            try:
                with self._hold(digest, wait=False):
                    shutil.rmtree(leftover, ignore_errors=True)
            except _Busy:
                busy += 1
        return busy

    def _clean_locks(self) -> None:
        """Remove lock files of digests with neither an entry nor a write in progress."""
        locks = self.root / 'locks'
        if not self._real_dir(locks) or not self._real_dir(self.root / 'tmp'):
            return
        writing = {p.name.split('.', 1)[0] for p in (self.root / 'tmp').iterdir()}
        for lock in locks.iterdir():
            digest = lock.name.removesuffix('.lock')
            if not _HEX.match(digest) or digest in writing or self._entry_exists(digest):
                continue
            with contextlib.suppress(_Busy), self._hold(digest, wait=False):
                # Holders that opened this file notice it is gone and lock a new one
                if not self._entry_exists(digest):
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()


def _manifest_name(name: str) -> str:
    return f'.{name}.json'


def _sealing_name(name: str) -> str:
    """The copy of the manifest of entry ``name`` that :meth:`Store._seal` renames into
    place: never content (no file name the store hands out starts with a dot)."""
    return f'.{_manifest_name(name)}.sealing'


_SEALING = re.compile(r'^\.\..+\.json\.sealing$')


def _safe_name(name: object) -> bool:
    """A plain file name: no separator, no leading dot, bounded length."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith('.')
        and '/' not in name
        and '\0' not in name
        and len(name.encode('utf-8', 'surrogateescape')) <= _NAME_MAX_BYTES
    )


def _read_manifest(entry_fd: int, name: str, digest: str) -> dict[str, tuple] | None:
    """{file: (size, hashes or None, mark)} of the entry ``name``, or None when it is not
    valid; hashes are ``((layout, hexes), ...)``, one claim per way the manifest hashed
    the file (whole, by parts), every one to be checked."""
    try:
        fd = os.open(_manifest_name(name), _O_READ, dir_fd=entry_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MANIFEST_MAX_BYTES:
            return None
        data = json.loads(os.read(fd, _MANIFEST_MAX_BYTES))
        files, hashes, written = data['files'], data.get('xxh3', {}), data.get('written', {})
        by_parts, ctimes = data.get('parts', {}), data.get('ctime', {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    finally:
        os.close(fd)
    if data.get('digest', digest) != digest or not isinstance(files, dict) or name not in files:
        return None
    if data.get('digest_version', DIGEST_VERSION) != DIGEST_VERSION:
        # keyed by another definition of the digest: never read as this one. (Entries
        # older than this field have keys made with another digest prefix, which no
        # digest of this version can equal: they are never reached.)
        return None
    if not all(isinstance(d, dict) for d in (hashes, written, by_parts, ctimes)):
        return None
    out = {}
    for fname, size in files.items():
        xxh3 = hashes.get(fname)
        if not _safe_name(fname) or type(size) is not int or size < 0:
            return None
        if xxh3 is not None and not (isinstance(xxh3, str) and _HEX.match(xxh3)):
            return None
        claims = [] if xxh3 is None else [(_WHOLE, (xxh3,))]
        if fname in by_parts:
            layout = _parts(by_parts[fname], size)
            if layout is None:
                return None
            claims.append(layout)
        mark = written.get(fname)
        if mark is not None:
            if not (isinstance(mark, list) and len(mark) == 2):
                return None
            if not all(type(n) is int for n in mark):
                return None
            # without the ctime sealed after publishing, the mark proves nothing
            ctime = ctimes.get(fname)
            mark = (*mark, ctime if type(ctime) is int else None)
        out[fname] = (size, tuple(claims) or None, mark)
    return out


#: A file hashed whole: one part from byte 0, after no seed
_WHOLE = ((0, b''),)
_MAX_PARTS = 16
_MAX_SEED_BYTES = 1 << 12


def _parts(claim: object, size: int | None = None) -> tuple[tuple, tuple] | None:
    """(layout, hexes) of a list of parts ``[start, seed hex, xxh3 hex]``, or None when it
    is not one: starts from 0, increasing, none beyond ``size``.

    >>> _parts([[0, '', 'ab' * 16], [352, '2829', 'cd' * 16]], 400)[0]
    ((0, b''), (352, b'()'))
    >>> _parts([[0, '', 'ab' * 16], [500, '', 'cd' * 16]], 400) is None
    True
    """
    if not isinstance(claim, (list, tuple)) or not 0 < len(claim) <= _MAX_PARTS:
        return None
    layout, hexes, last = [], [], -1
    for part in claim:
        if not (isinstance(part, (list, tuple)) and len(part) == 3):
            return None
        start, seed, xxh3 = part
        if type(start) is not int or start <= last or (size is not None and start > size):
            return None
        if not (isinstance(seed, str) and len(seed) <= 2 * _MAX_SEED_BYTES):
            return None
        if not (isinstance(xxh3, str) and _HEX.match(xxh3)):
            return None
        try:
            layout.append((start, bytes.fromhex(seed)))
        except ValueError:
            return None
        hexes.append(xxh3)
        last = start
    if layout[0][0] != 0:
        return None
    return tuple(layout), tuple(hexes)


class _PartHashes:
    """The xxh3-128 of each part of a file fed in order (see :func:`_parts`)."""

    def __init__(self, layout: tuple):
        self._starts = [start for start, _ in layout]
        self._hashers = []
        for _, seed in layout:
            hasher = xxhash.xxh3_128()
            hasher.update(seed)
            self._hashers.append(hasher)

    def feed(self, pos: int, chunk: memoryview) -> None:
        end = pos + len(chunk)
        stops = [*self._starts[1:], end]
        for start, stop, hasher in zip(self._starts, stops, self._hashers, strict=True):
            lo, hi = max(start, pos), min(stop, end)
            if lo < hi:
                hasher.update(chunk[lo - pos : hi - pos])

    def hexes(self) -> tuple[str, ...]:
        return tuple(h.hexdigest() for h in self._hashers)


def _file_xxh3(
    name: str, dir_fd: int, layouts: tuple = (_WHOLE,)
) -> tuple[tuple[tuple[str, ...], ...], FileId | None]:
    """xxh3-128 of a file's bytes, hashed in one read by each of ``layouts`` (whole by
    default, see :func:`_parts`), and its identity (None if it changed while read)."""
    fd = os.open(name, _O_READ, dir_fd=dir_fd)
    try:
        before = FileId.from_stat(os.fstat(fd))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, 'not a regular file')
        streams = [_PartHashes(layout) for layout in layouts]
        view = memoryview(bytearray(min(_BLOCK_BYTES, max(before.size, 1))))
        pos = 0
        while n := os.readv(fd, [view]):
            for stream in streams:
                stream.feed(pos, view[:n])
            pos += n
        after = FileId.from_stat(os.fstat(fd))
    finally:
        os.close(fd)
    return tuple(s.hexes() for s in streams), before if after == before else None


def _lstat(path: str | Path, dir_fd: int | None = None) -> os.stat_result | None:
    try:
        return os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _check_name(name: str) -> None:
    if not _safe_name(name):
        raise ValueError(f'not a safe store file name: {name!r}')


_store: Store | None = None
_store_lock = threading.Lock()
renew_after_fork(globals(), '_held_lock', '_store_lock')


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


def chosen_store() -> Store | None:
    """The store given to :func:`set_store` in this process, or None.

    None means the default location applies (``$NIBTRACK_STORE``, else the user's
    cache), which child processes find by themselves; a store chosen in code is not
    inherited by a fresh interpreter, so a front-end may carry it to its workers.

    >>> import tempfile
    >>> _ = set_store(tempfile.mkdtemp())
    >>> chosen_store() is get_store()
    True
    >>> _ = set_store(None)
    >>> chosen_store() is None
    True
    """
    with _store_lock:
        return _store
