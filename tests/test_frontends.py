"""Front-ends switch on with their engine, and the core imports no engine."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from nipype_nibtrack.frontends import when_imported

HOOKED = (
    'from nipype.interfaces.base.specs import BaseTraitedSpec\n'
    "print(getattr(BaseTraitedSpec._get_sorteddict, '_nibtrack', False))\n"
)


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_core_import_loads_no_engine():
    code = """
        import sys
        import nipype_nibtrack as nt
        print(sorted(m for m in ('nipype', 'pydra', 'traits') if m in sys.modules))
    """
    assert _run(code) == '[]'


@pytest.mark.parametrize(
    'order',
    ['import nipype_nibtrack\nimport nipype\n', 'import nipype\nimport nipype_nibtrack\n'],
    ids=['engine-after', 'engine-before'],
)
def test_nipype_hooks_on_whichever_is_imported_first(order):
    assert _run(order + HOOKED) == 'True'


def test_nipype_hooks_when_a_submodule_is_imported_first():
    code = 'import nipype_nibtrack\nimport nipype.interfaces.fsl\n' + HOOKED
    assert _run(code) == 'True'


def test_no_hooks_without_nipype_nibtrack():
    # the package changes nothing in a process that never imported it
    assert _run('import nipype\n' + HOOKED) == 'False'


def test_engine_module_keeps_its_own_loader():
    code = """
        import nipype_nibtrack, nipype
        print(type(nipype.__loader__).__name__, type(nipype.__spec__.loader).__name__)
    """
    assert _run(code) == 'SourceFileLoader SourceFileLoader'


def test_when_imported_runs_callbacks_once_in_order(tmp_path, monkeypatch):
    name = 'nibtrack_frontends_probe'
    (tmp_path / f'{name}.py').write_text('value = 42\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported(name, lambda: seen.append(sys.modules[name].value))
    when_imported(name, lambda: seen.append('second'))
    assert seen == []
    try:
        __import__(name)
        __import__(name)
        when_imported(name, lambda: seen.append('already imported'))
    finally:
        sys.modules.pop(name, None)
    assert seen == [42, 'second', 'already imported']


def test_lazy_nipype_names_of_the_top_package():
    code = """
        import sys
        import nipype_nibtrack as nt
        print(nt.accept_images.__module__, 'nipype' in sys.modules)
    """
    assert _run(code) == 'nipype_nibtrack.nipype.accept True'
    with pytest.raises(AttributeError, match='no attribute'):
        import nipype_nibtrack as nt

        _ = nt.no_such_name
