"""pytest plugin: run nipype's own interface suite against image-aware classes.

Enabled with ``-p tests.nipype_suite.plugin`` (see ``scripts/test.sh``). Before any test
module is collected it imports every module of ``nipype.interfaces`` and replaces, in
every nipype module that binds it, each interface class with a file input by its
image-aware class (:func:`nipype_nibtrack.accept_images`). The tests and doctests
shipped with nipype then import, build and run the wrapped classes.

Two things follow from rebinding a name in the module that defines the class, not from
the wrapped classes, and are undone here:

- ``super(FILMGLS, self)`` inside ``FILMGLS``'s own methods looks ``FILMGLS`` up in the
  module, finds the subclass and calls the same method again, forever. The original
  class's methods that name their own class read their globals through a mapping in
  which that one name is still the original class (:class:`_OwnName`); every other
  name is the module's, live.
- the doctest finder keeps only classes whose ``__module__`` is the module collected;
  a wrapped class (which lives in ``nipype_nibtrack.interfaces...``) counts as its
  original, so its docstring examples still run, now against the wrapped class.
"""

from __future__ import annotations

import doctest
import inspect
import sys
import types
from typing import Any

from tests.nipype_interfaces import defined_interfaces, interface_modules

#: Set by :func:`pytest_configure`: original class -> image-aware class.
REPLACED: dict[type, type] = {}
#: Original class -> how many of its methods now read their own names through _OwnName.
OWN_NAMES_KEPT: dict[type, int] = {}
#: Modules of nipype.interfaces that failed to import (they fail the same way as shipped).
UNIMPORTABLE: dict[str, str] = {}


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


class _OwnName(dict):
    """Globals of a class's own methods: the module's, except the class's own names.

    CPython reads the globals of a function through ``__getitem__`` when they are not
    an exact dict, so every other name stays live.
    """

    def __init__(self, module: types.ModuleType, names: set[str], original: type):
        super().__init__(__builtins__=module.__dict__.get('__builtins__', __builtins__))
        self._module, self._names, self._original = module.__dict__, names, original

    def __getitem__(self, key: str) -> Any:
        if key in self._names:
            return self._original
        return self._module[key]

    def __contains__(self, key: object) -> bool:
        return key in self._names or key in self._module


def _rehome(func: Any, module_globals: _OwnName) -> Any:
    new = types.FunctionType(
        func.__code__, module_globals, func.__name__, func.__defaults__, func.__closure__
    )
    new.__kwdefaults__ = func.__kwdefaults__
    new.__dict__.update(func.__dict__)
    for attr in ('__qualname__', '__doc__', '__module__'):
        setattr(new, attr, getattr(func, attr))
    new.__annotations__ = func.__annotations__
    return new


def _keep_own_names(original: type, names: set[str]) -> int:
    """Make the methods of ``original`` that name it (under any of ``names``, aliases
    such as ``AntsJointFusion = JointFusion`` included) find ``original``; returns how
    many methods changed."""
    module = sys.modules[original.__module__]
    own_globals = _OwnName(module, names, original)

    def names_it(func: Any) -> bool:
        return isinstance(func, types.FunctionType) and bool(names & _names(func.__code__))

    fixed = 0
    for attr, value in list(vars(original).items()):
        if isinstance(value, (staticmethod, classmethod)) and names_it(value.__func__):
            setattr(original, attr, type(value)(_rehome(value.__func__, own_globals)))
        elif isinstance(value, property) and any(
            names_it(f) for f in (value.fget, value.fset, value.fdel)
        ):
            parts = (value.fget, value.fset, value.fdel)
            new = [_rehome(f, own_globals) if f is not None else None for f in parts]
            setattr(original, attr, property(*new, value.__doc__))
        elif names_it(value):
            setattr(original, attr, _rehome(value, own_globals))
        else:
            continue
        fixed += 1
    return fixed


def replace_interfaces() -> dict[type, type]:
    """Replace every nipype interface class with a file input by its image-aware class."""
    import nipype_nibtrack as nt
    from nipype_nibtrack.nipype.accept import takes_images

    for module in interface_modules(UNIMPORTABLE):
        for value in defined_interfaces(module):
            if value not in REPLACED and takes_images(value):
                REPLACED[value] = nt.accept_images(value)
    by_id = {id(original): aware for original, aware in REPLACED.items()}
    own_names = {
        original: {original.__name__}
        | {k for k, v in vars(sys.modules[original.__module__]).items() if v is original}
        for original in REPLACED
    }
    for name, module in list(sys.modules.items()):
        if not (name == 'nipype' or name.startswith('nipype.')) or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, type) and id(value) in by_id:
                setattr(module, attr, by_id[id(value)])
    for original, names in own_names.items():
        OWN_NAMES_KEPT[original] = _keep_own_names(original, names)
    return REPLACED


# ------------------------------------------------------------ doctest discovery


def _as_original(obj: Any) -> Any:
    if inspect.isclass(obj) and '_nibtrack_original' in vars(obj):
        return obj._nibtrack_original
    return obj


_from_module = doctest.DocTestFinder._from_module
_find = doctest.DocTestFinder._find


def _patched_from_module(self: Any, module: Any, obj: Any) -> bool:
    return _from_module(self, module, _as_original(obj))


def _patched_find(self: Any, tests: Any, obj: Any, name: str, module: Any, *args: Any) -> Any:
    return _find(self, tests, _as_original(obj), name, module, *args)


# ------------------------------------------------------------ pytest hooks


def pytest_configure(config: Any) -> None:
    replace_interfaces()
    doctest.DocTestFinder._from_module = _patched_from_module
    doctest.DocTestFinder._find = _patched_find


def pytest_report_header(config: Any) -> str:
    return (
        f'nibtrack: {len(REPLACED)} nipype interface classes replaced by image-aware ones '
        f'({len(UNIMPORTABLE)} modules not importable, as shipped); '
        f'{sum(OWN_NAMES_KEPT.values())} methods of {sum(map(bool, OWN_NAMES_KEPT.values()))} '
        'classes that name their own class keep finding the original'
    )
