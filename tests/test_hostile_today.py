"""Hostile tests of the day's changes: the compiled gather, deferred clean verdicts,
manifest parts in the store, and the image walker."""

from __future__ import annotations

import numpy as np
import pytest

from nipype_nibtrack import digest

PADDED = [
    np.dtype([('a', 'u1'), ('b', '>f8')], align=True),
    np.dtype([('a', 'u1'), ('b', '<f8')], align=True),
    np.dtype({'names': ['a', 'b'], 'formats': ['u1', '>i4'], 'offsets': [0, 5], 'itemsize': 12}),
    np.dtype({'names': ['a'], 'formats': ['u1'], 'offsets': [3], 'itemsize': 7}),
    np.dtype([('r', [('x', 'u1'), ('y', '<i2')], 2)], align=True),  # padding in a subarray
]


def _with_padding(dtype: np.dtype, shape: tuple, fill: int) -> np.ndarray:
    """Records with the same field values and padding bytes set to ``fill``."""
    raw = np.full(int(np.prod(shape)) * dtype.itemsize, fill, np.uint8)
    arr = raw.view(dtype).reshape(shape)
    for name in dtype.names:
        arr[name] = np.zeros((), dtype[name])  # fields: zeros; padding: fill
    return arr


@pytest.mark.parametrize('dtype', PADDED, ids=str)
@pytest.mark.parametrize('layout', ['C', 'F', 'reversed'])
def test_a_record_digest_ignores_padding_and_the_kernel(monkeypatch, dtype, layout):
    # Padding bytes are no content: copies (numpy's, the kernel's, a byte swap) leave
    # them as they find them, so digests hashed whatever the path left there.
    digests = set()
    for fill in (0, 0xAB):
        arr = _with_padding(dtype, (6, 7, 3), fill)
        arr = {'C': arr, 'F': np.asfortranarray(arr), 'reversed': arr[::-1, :, ::-1]}[layout]
        for kernel in (digest._kernel, None):
            monkeypatch.setattr(digest, '_kernel', kernel)
            digests.add((digest.array_digest(arr, 'F'), digest.array_digest(arr, 'C')))
    assert len(digests) == 1
