"""Identity of a file on disk: what changes whenever its content may have changed.

``(device, inode, size, mtime_ns, ctime_ns)``: an in-place rewrite changes mtime and
ctime, a replacement changes the inode, and restoring mtime by hand still moves ctime.
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = ['FileId', 'fd_id', 'path_id']


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
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def same_file(self, other: FileId | None) -> bool:
        """True when ``other`` is the same inode on the same device.

        >>> FileId(1, 2, 3, 4, 5).same_file(FileId(1, 2, 9, 9, 9))
        True
        """
        return other is not None and (self.dev, self.ino) == (other.dev, other.ino)


def path_id(path: str | os.PathLike) -> FileId | None:
    """Identity of the file at ``path`` (following symlinks), None when it is missing.

    >>> path_id('/no/such/file') is None
    True
    """
    try:
        return FileId.from_stat(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def fd_id(fd: int) -> FileId:
    """Identity of the file an open descriptor refers to (it may no longer have a name)."""
    return FileId.from_stat(os.fstat(fd))
