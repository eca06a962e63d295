"""Where the pydra front-end turns an image into a file name.

Every resolution of the front-end (coercing a field, hashing a task, pickling a job)
goes through :func:`image_path`, the core's :func:`~nipype_nibtrack.resolve_memoised`:
pydra hashes a task's inputs at each checksum and pickles them for each job, and the
same image is answered again for a few system calls while it and its files stay as
they were (a dirty image is not digested and looked up in the store each time). The
answer is the one :func:`~nipype_nibtrack.resolve` gives; the memo only keeps it while
everything it was computed from holds (see :mod:`nipype_nibtrack.state`).
"""

from __future__ import annotations

from typing import Any

from .. import resolve_memoised

__all__ = ['image_path']


def image_path(img: Any, formats: tuple[str, ...] | None = None) -> str:
    """The file ``img`` resolves to for a reader of ``formats`` (None: its own format).

    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> path = os.path.join(data_path, 'anatomical.nii')
    >>> image_path(nib.load(path)) == path
    True
    """
    return resolve_memoised(img, formats=formats).path
