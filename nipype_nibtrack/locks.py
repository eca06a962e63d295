"""Locks a forked child takes afresh.

Only the forking thread lives on in a child of ``os.fork()``: a lock another thread
held at that moment stays held forever there, and the child's first answer hangs
(multiprocessing's fork workers, nipype's MultiProc on Linux). Every module-level lock
of the package, core and front-ends, is listed with :func:`renew_after_fork`, which
puts a fresh lock of the same kind in its place in each forked child.
"""

from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ['renew_after_fork']

_KINDS = {type(threading.Lock()): threading.Lock, type(threading.RLock()): threading.RLock}
_renewed: list[tuple[dict[str, Any], str]] = []


def renew_after_fork(namespace: dict[str, Any], *names: str) -> None:
    """Replace the locks ``names`` of a module's ``namespace`` by fresh ones in each
    forked child (the lock's kind, plain or reentrant, is kept).

    Examples
    --------
    Call it once per module, after the locks are made::

        _lock = threading.Lock()
        renew_after_fork(globals(), '_lock')

    Only locks can be renewed (``tests/test_locks.py`` forks with every one held):

    >>> renew_after_fork({'_cache': {}}, '_cache')
    Traceback (most recent call last):
    ...
    TypeError: _cache is not a threading.Lock or RLock
    """
    for name in names:
        if type(namespace[name]) not in _KINDS:
            raise TypeError(f'{name} is not a threading.Lock or RLock')
    _renewed.extend((namespace, name) for name in names)


def _renew() -> None:
    for namespace, name in _renewed:
        namespace[name] = _KINDS[type(namespace[name])]()


os.register_at_fork(after_in_child=_renew)
