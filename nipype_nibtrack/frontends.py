"""Engine front-ends switch themselves on when their engine is imported.

The core knows no workflow engine. A front-end is a subpackage of ours that installs its
hooks when imported; :func:`when_imported` arranges for it to be imported as soon as
the engine it serves is, whether the engine was imported before ``nipype_nibtrack`` or
after. A user of the engine then never has to remember a second import line.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .locks import renew_after_fork

__all__ = ['when_imported']

_pending: dict[str, list[Callable[[], Any]]] = {}
_lock = threading.RLock()
renew_after_fork(globals(), '_lock')
_searching = threading.local()


# Loader and finder by protocol, not by importlib.abc's base classes: importing
# importlib.abc loads importlib.resources, ~1% of nibabel's own import time.
class _RunAfter:
    """Runs a module with its own loader, then the callbacks waiting for it."""

    def __init__(self, loader: Any, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            # tools that inspect the module (pkgutil, inspect) see its own loader again
            module.__loader__ = self._loader
            if module.__spec__ is not None:
                module.__spec__.loader = self._loader
        _run(self._name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _Finder:
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _pending or getattr(_searching, 'active', False):
            return None
        _searching.active = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            _searching.active = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RunAfter(spec.loader, fullname)
        return spec


_finder = _Finder()


def _run(name: str) -> None:
    with _lock:
        callbacks = _pending.pop(name, [])
        if not _pending and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
    for callback in callbacks:
        callback()


def when_imported(module: str, callback: Callable[[], Any]) -> None:
    """Call ``callback`` once ``module`` has been imported: now if it already is.

    Examples
    --------
    >>> seen = []
    >>> when_imported('json', lambda: seen.append('json'))
    >>> seen
    ['json']
    """
    with _lock:
        if module not in sys.modules:
            _pending.setdefault(module, []).append(callback)
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
            return
    callback()


def import_later(module: str) -> Callable[[], Any]:
    """A callback importing ``module`` (a front-end of ours)."""
    return lambda: importlib.import_module(module)
