"""Mirror modules: where image-aware interface classes live.

Every module ``nipype.interfaces.X`` has a mirror ``nipype_nibtrack.interfaces.X``, and
every other module ``M`` defining an interface (a user's own) a mirror
``nipype_nibtrack.nipype.accepted.M``. A mirror is made on import by a meta path finder,
in any interpreter: it reads every name from the original module, handing out the
image-aware class (:func:`~nipype_nibtrack.nipype.accept.accept_images`) for an
interface with a file input, the mirror for a submodule, and the original object for
anything else. So ``from nipype_nibtrack.interfaces import fsl`` works like ``from
nipype.interfaces import fsl``; pickles, ``Workflow.export()`` scripts and nipype's
package labels (the third component of ``__module__``) all find the classes.

>>> from nipype_nibtrack.interfaces.fsl import preprocess
>>> preprocess.FLIRT.__module__, preprocess.Info is __import__('nipype').interfaces.fsl.Info
('nipype_nibtrack.interfaces.fsl.preprocess', True)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from typing import Any

from .. import renew_after_fork

__all__ = ['install', 'mirror_name', 'original_name']

_NIPYPE = 'nipype.interfaces'
_INTERFACES = 'nipype_nibtrack.interfaces'
_ACCEPTED = 'nipype_nibtrack.nipype.accepted'


def mirror_name(module: str) -> str:
    """The name of the mirror of ``module``.

    >>> mirror_name('nipype.interfaces.fsl.preprocess'), mirror_name('mylab.tools')
    ('nipype_nibtrack.interfaces.fsl.preprocess', 'nipype_nibtrack.nipype.accepted.mylab.tools')
    """
    if module == _NIPYPE or module.startswith(_NIPYPE + '.'):
        return _INTERFACES + module[len(_NIPYPE) :]
    return f'{_ACCEPTED}.{module}'


def original_name(mirror: str) -> str | None:
    """The module ``mirror`` mirrors; None for a name that is no mirror (or the root).

    >>> original_name('nipype_nibtrack.interfaces.fsl'), original_name('nipype_nibtrack')
    ('nipype.interfaces.fsl', None)
    """
    if mirror == _INTERFACES or mirror.startswith(_INTERFACES + '.'):
        return _NIPYPE + mirror[len(_INTERFACES) :]
    if mirror.startswith(_ACCEPTED + '.'):
        return mirror[len(_ACCEPTED) + 1 :]
    return None


def _mirrored(value: Any) -> Any:
    if isinstance(value, types.ModuleType):
        name = value.__name__
        if name == _NIPYPE or name.startswith(_NIPYPE + '.'):
            return importlib.import_module(mirror_name(name))
        return value
    if isinstance(value, type):
        from nipype.interfaces.base import BaseInterface

        if issubclass(value, BaseInterface):
            from .accept import accept_images

            return accept_images(value)
    return value


_lock = threading.RLock()
renew_after_fork(globals(), '_lock')


def _public(module: types.ModuleType) -> list[str]:
    return [name for name in vars(module) if not name.startswith('_')]


def populate(module: types.ModuleType, original: str) -> None:
    """Make ``module`` the mirror of the module named ``original`` (imported here).

    Defines the module's ``__getattr__`` and ``__dir__`` (PEP 562) and its
    ``__doc__``; names are looked up on first use, then kept in the module; ``__all__``
    is the original's at the time it is read.
    """

    def __getattr__(name: str) -> Any:
        source = importlib.import_module(original)
        if name == '__all__':  # ``from mirror import *`` takes what the original gives now
            public = getattr(source, '__all__', None)
            return list(public if public is not None else _public(source))
        # other dunder names describe the mirror itself: never the original's __file__
        if name.startswith('__') and name.endswith('__'):
            raise AttributeError(f'module {module.__name__!r} has no attribute {name!r}')
        try:
            value = getattr(source, name)
        except AttributeError:
            raise AttributeError(
                f'module {module.__name__!r} has no attribute {name!r} '
                f'(nor has {original!r}, which it mirrors)'
            ) from None
        with _lock:
            value = _mirrored(value)
            module.__dict__.setdefault(name, value)
            return module.__dict__[name]

    def __dir__() -> list[str]:
        return sorted(set(dir(importlib.import_module(original))) | set(module.__dict__))

    module.__doc__ = importlib.import_module(original).__doc__
    module.__getattr__ = __getattr__
    module.__dir__ = __dir__
    module._nibtrack_mirrors = original


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        original = original_name(module.__name__)
        if original is None:  # nipype_nibtrack.nipype.accepted: the root of user mirrors
            module.__doc__ = 'Mirrors of modules defining interfaces passed to accept_images.'
            return
        populate(module, original)


class _Finder(importlib.abc.MetaPathFinder):
    """Claims the names of mirror modules (never ``nipype_nibtrack.interfaces`` itself)."""

    _loader = _Loader()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname == _ACCEPTED:
            return importlib.machinery.ModuleSpec(fullname, self._loader, is_package=True)
        original = original_name(fullname)
        if original is None or fullname == _INTERFACES:
            return None
        source = sys.modules.get(original)  # __main__ has no spec to find
        if source is not None:
            package = hasattr(source, '__path__')
        else:
            found = importlib.util.find_spec(original)
            if found is None:
                return None
            package = found.submodule_search_locations is not None
        spec = importlib.machinery.ModuleSpec(fullname, self._loader, is_package=package)
        if package:
            spec.submodule_search_locations = []
        return spec


_finder = _Finder()


def install() -> None:
    """Put the finder of mirror modules first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _finder)
