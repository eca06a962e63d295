"""Identity of a file on disk: what changes whenever its content may have changed.

``(device, inode, size, mtime_ns, ctime_ns)``: an in-place rewrite changes mtime and
ctime, a replacement changes the inode, and restoring mtime by hand still moves ctime.

Timestamps come from the kernel's coarse clock (one tick, up to 10 ms): two rewrites of
the same size within a tick leave the same identity. Like git's "racily clean" index
entries, an identity is only trusted to stand for content once it has *settled*: both
timestamps at least :data:`RACY_NS` in the past.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterable
from typing import NamedTuple

__all__ = [
    'RACY_NS',
    'READ_FLAGS',
    'FileId',
    'NotRegularFile',
    'absolute',
    'all_settled',
    'fd_id',
    'kernel_path',
    'not_regular',
    'open_regular',
    'path_id',
    'regular_opener',
]

#: How old both timestamps must be before an identity may key a memo (1 s)
RACY_NS = 1_000_000_000
_new = tuple.__new__  # a FileId without NamedTuple's Python-level __new__


class FileId(NamedTuple):
    """Identity of one file, as given by ``stat``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     path_id(f.name) == fd_id(f.fileno())
    True
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileId:
        return _new(cls, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))

    def same_file(self, other: FileId | None) -> bool:
        """True when ``other`` is the same inode on the same device.

        >>> FileId(1, 2, 3, 4, 5).same_file(FileId(1, 2, 9, 9, 9))
        True
        """
        return other is not None and (self.dev, self.ino) == (other.dev, other.ino)

    def settled(self, now_ns: int | None = None) -> bool:
        """True when a same-size rewrite can no longer leave this identity unchanged.

        >>> FileId(1, 2, 3, 0, 0).settled()
        True
        >>> now = time.time_ns()
        >>> FileId(1, 2, 3, now, now).settled(now)
        False
        """
        now_ns = time.time_ns() if now_ns is None else now_ns
        return max(self.mtime_ns, self.ctime_ns) <= now_ns - RACY_NS


def path_id(path: str | os.PathLike) -> FileId | None:
    """Identity of the file at ``path`` (following symlinks), None when it is missing.

    >>> path_id('/no/such/file') is None
    True
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return _new(FileId, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


def fd_id(fd: int) -> FileId:
    """Identity of the file an open descriptor refers to (it may no longer have a name)."""
    return FileId.from_stat(os.fstat(fd))


def all_settled(ids: Iterable[FileId | None]) -> bool:
    """True when every identity has settled (a missing file, None, is stable too).

    >>> all_settled([None, FileId(1, 2, 3, 0, 0)])
    True
    """
    now = time.time_ns()
    return all(ident is None or ident.settled(now) for ident in ids)


def absolute(path: str | os.PathLike) -> str:
    """``path`` joined with the current directory, with no textual normalisation.

    ``os.path.abspath`` folds ``a/link/..`` into ``a``, but the kernel follows ``link``
    first: with ``link -> b/c`` the file is ``b/..``, another one. Joining keeps every
    component for the kernel to walk.

    >>> absolute('/data/link/../x.nii')
    '/data/link/../x.nii'
    >>> absolute('x.nii') == os.path.join(os.getcwd(), 'x.nii')
    True
    """
    path = os.fsdecode(os.fspath(path))
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def kernel_path(path: str) -> str:
    """An absolute path naming the file the kernel opens for ``path``, with no ``..``
    left for a reader to fold as text; the file name is kept as given.

    The directory part is resolved by the kernel (``os.path.realpath``) only when it
    holds a ``..`` component; the file name itself is never resolved, so a symbolic
    link (a git-annex or DataLad file) keeps its name, from which tools derive theirs.

    >>> import tempfile
    >>> root = os.path.realpath(tempfile.mkdtemp())
    >>> os.makedirs(os.path.join(root, 'b', 'c'))
    >>> os.symlink(os.path.join(root, 'b', 'c'), os.path.join(root, 'link'))
    >>> kernel_path(os.path.join(root, 'link', '..', 'x.nii')) == os.path.join(root, 'b', 'x.nii')
    True
    >>> kernel_path('/data/sub-01_T1w.nii.gz')
    '/data/sub-01_T1w.nii.gz'
    """
    path = absolute(path)
    head, name = os.path.split(path)
    if '..' not in head.split(os.sep) or name in ('', '.', '..'):
        return path
    return os.path.join(os.path.realpath(head), name)


# ------------------------------------------------------------- regular files only

#: How the core opens a user's file to read it. ``O_NONBLOCK``: a FIFO put at the path
#: would block ``open`` until a writer comes (forever); with it, ``open`` returns and
#: ``fstat`` tells what was opened (a regular file reads as without it). ``O_NOCTTY``: a
#: terminal at the path never becomes the process's controlling terminal.
READ_FLAGS = (
    os.O_RDONLY
    | getattr(os, 'O_NONBLOCK', 0)
    | getattr(os, 'O_NOCTTY', 0)
    | getattr(os, 'O_CLOEXEC', 0)
)

_KINDS = (
    (stat.S_ISDIR, 'a directory'),
    (stat.S_ISFIFO, 'a FIFO (named pipe)'),
    (stat.S_ISSOCK, 'a socket'),
    (stat.S_ISCHR, 'a character device'),
    (stat.S_ISBLK, 'a block device'),
)


class NotRegularFile(OSError):
    """A path the core would read names a directory, FIFO, socket or device.

    The core reads only regular files: a FIFO blocks its reader, a device such as
    ``/dev/zero`` never ends, and none of them holds an image that stays put.
    """


def _kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), 'not a regular file')


def _not_regular_error(path: str, mode: int) -> NotRegularFile:
    code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
    return NotRegularFile(code, f'{path} is {_kind(mode)}, not a regular file')


def not_regular(path: str | os.PathLike) -> NotRegularFile | None:
    """The error for ``path`` when it names something other than a regular file (links
    followed), else None; a missing file is None too (missing is said elsewhere).

    >>> not_regular('/no/such/file') is None, not_regular(__file__) is None
    (True, True)
    >>> print(not_regular('/dev/null'))
    [Errno 22] /dev/null is a character device, not a regular file
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing, a loop, a folder we may not enter: the open says it
        return None
    return None if stat.S_ISREG(mode) else _not_regular_error(os.fsdecode(path), mode)


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of the regular file at ``path``; never blocks.

    Opened with :data:`READ_FLAGS`, then ``fstat``: what is checked is what was opened,
    so a FIFO or a device swapped in at the path between a ``stat`` and the ``open`` is
    refused too, never read.

    Raises
    ------
    NotRegularFile
        ``path`` names a directory, a FIFO, a socket or a device.
    OSError
        It cannot be opened (missing, no permission...).

    Examples
    --------
    >>> import os, tempfile
    >>> fifo = os.path.join(tempfile.mkdtemp(), 'image.nii')
    >>> os.mkfifo(fifo)
    >>> open_regular(fifo)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    nipype_nibtrack.fileid.NotRegularFile: [Errno 22] ...image.nii is a FIFO (named pipe), ...
    """
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as err:
        if err.errno == errno.ENXIO:  # a socket: open never opens one
            refusal = not_regular(path)
            if refusal is not None:
                raise refusal from None
        raise
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular_error(os.fsdecode(path), mode)
    return fd


def regular_opener(path: str, flags: int) -> int:
    """An ``opener`` for :func:`open` that opens regular files only (for reading).

    >>> with open(__file__, 'rb', opener=regular_opener) as f:
    ...     len(f.read(8))
    8
    """
    return open_regular(path)
