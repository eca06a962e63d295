"""nipype's interface modules and the interface classes they define.

Shared by the tests that compare every wrapped class with its original and by the
plugin that runs nipype's own suite against the wrapped classes
(``tests/nipype_suite/plugin.py``): both must walk the same classes.
"""

from __future__ import annotations

import importlib
import pkgutil
import types
import warnings


def interface_modules(unimportable: dict[str, str] | None = None) -> list[types.ModuleType]:
    """Every module of ``nipype.interfaces`` but its tests, imported.

    A module that fails to import (an optional dependency is missing: it fails the same
    way as shipped) is left out, and recorded in ``unimportable`` with its error.
    """
    import nipype.interfaces

    modules = []
    for info in pkgutil.walk_packages(nipype.interfaces.__path__, 'nipype.interfaces.'):
        if '.tests' in info.name:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                modules.append(importlib.import_module(info.name))
        except Exception as err:
            if unimportable is not None:
                unimportable[info.name] = f'{type(err).__name__}: {err}'
    return modules


def defined_interfaces(module: types.ModuleType) -> list[type]:
    """The interface classes ``module`` defines (not those it imports), in its order."""
    from nipype.interfaces.base import BaseInterface

    return [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, BaseInterface)
        and value.__module__ == module.__name__
    ]


def interface_classes() -> list[type]:
    """Every interface class nipype defines, module by module."""
    return [klass for module in interface_modules() for klass in defined_interfaces(module)]
