"""Where the nipype layer turns an image into a file name, and what a node's hash used.

Every resolution of the layer goes through :func:`resolve_image`, the core's
:func:`~nipype_nibtrack.resolve_memoised`: answered again for a few system calls while
the image and its files stay as they were. While a node is hashed (:func:`recording`),
each resolution is recorded, so that the node keeps exactly what its hash was computed
from (the image, the formats asked for, the file) and drops the hash when the image
would now resolve elsewhere (:mod:`.nodes`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from .. import Resolution, resolve_memoised

__all__ = ['recording', 'resolve_image']

# id(image) -> (image, [(formats, path), ...]): the image is held, so the id stays its own
_recorded: ContextVar[dict[int, tuple[Any, list]] | None] = ContextVar('recorded', default=None)


def resolve_image(img: Any, formats: tuple[str, ...] | None = None) -> Resolution:
    """Resolve ``img`` for a reader of ``formats``; recorded while a node is hashed.

    >>> import os, nibabel as nib
    >>> from nibabel.testing import data_path
    >>> img = nib.load(os.path.join(data_path, 'anatomical.nii'))
    >>> with recording() as seen:
    ...     path = resolve_image(img).path
    >>> seen[id(img)] == (img, [(None, path)])
    True
    """
    resolution = resolve_memoised(img, formats=formats)
    seen = _recorded.get()
    if seen is not None:
        entry = seen.setdefault(id(img), (img, []))
        if (formats, resolution.path) not in entry[1]:
            entry[1].append((formats, resolution.path))
    return resolution


@contextlib.contextmanager
def recording() -> Iterator[dict[int, tuple[Any, list]]]:
    """Record every :func:`resolve_image` made until the block ends (nested: its own)."""
    seen: dict[int, tuple[Any, list]] = {}
    token = _recorded.set(seen)
    try:
        yield seen
    finally:
        _recorded.reset(token)
