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
    >>> import os, threading
    >>> space = {'_lock': threading.Lock()}
    >>> renew_after_fork(space, '_lock')
    >>> held = space['_lock']
    >>> held.acquire()
    True
    >>> pid = os.fork()
    >>> if pid == 0:  # the child: a fresh lock, free
    ...     os._exit(0 if space['_lock'] is not held and space['_lock'].acquire(False) else 1)
    >>> os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    0
    >>> held.release()
    """
    for name in names:
        if type(namespace[name]) not in _KINDS:
            raise TypeError(f'{name} is not a threading.Lock or RLock')
        _renewed.append((namespace, name))


def _renew() -> None:
    for namespace, name in _renewed:
        namespace[name] = _KINDS[type(namespace[name])]()


os.register_at_fork(after_in_child=_renew)
