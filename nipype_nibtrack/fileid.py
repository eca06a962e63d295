"""Identity of a file on disk: what changes whenever its content may have changed.

``(device, inode, size, mtime_ns, ctime_ns)``: an in-place rewrite changes mtime and
ctime, a replacement changes the inode, and restoring mtime by hand still moves ctime.

Timestamps come from the kernel's coarse clock (one tick, up to 10 ms): two rewrites of
the same size within a tick leave the same identity. Like git's "racily clean" index
entries, an identity is only trusted to stand for content once it has *settled*: both
timestamps at least :data:`RACY_NS` in the past.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import NamedTuple

__all__ = ['RACY_NS', 'FileId', 'absolute', 'all_settled', 'fd_id', 'kernel_path', 'path_id']

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
