"""The layering: the core without any engine, the pydra front-end switched on with pydra.

Every check runs in a fresh interpreter: this process has imported both engines.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
ENGINE_MODULES = ('nipype', 'pydra', 'traits', 'fileformats', 'cloudpickle', 'networkx')
PYDRA_HOOKED = (
    'from pydra.utils.typing import TypeParser\n'
    "print(getattr(TypeParser.coerce, '_nibtrack', False))\n"
)


def _run(code: str, python: str = sys.executable, env: dict | None = None, cwd=None) -> str:
    out = subprocess.run(
        [python, '-c', textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=cwd
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_core_import_loads_no_engine_module():
    code = f"""
        import sys
        import nipype_nibtrack as nt
        nt.as_filename, nt.Store, nt.cleanliness_rule
        print(sorted(m for m in sys.modules if m.split('.')[0] in {ENGINE_MODULES!r}))
    """
    assert _run(code) == '[]'


@pytest.mark.parametrize(
    'order',
    [
        'import nipype_nibtrack\nfrom pydra.compose import python\n',
        'from pydra.compose import python\nimport nipype_nibtrack\n',
        'import nipype_nibtrack\nfrom pydra.tasks.mrtrix3.v3_1 import MrConvert\n',
        'import nipype_nibtrack.pydra\n',
    ],
    ids=['engine-after', 'engine-before', 'task-package', 'explicit'],
)
def test_pydra_front_end_on_whichever_is_imported_first(order):
    code = order + PYDRA_HOOKED + "import sys; print('nipype' in sys.modules)\n"
    assert _run(code).split() == ['True', 'False']  # and nipype 1.x stays out


def test_pydra_alone_is_left_alone():
    assert _run('from pydra.compose import python\n' + PYDRA_HOOKED) == 'False'


# ------------------------------------------------------------------- without nipype


def _link_distribution(target: Path, name: str) -> None:
    """Link an installed distribution (package, its .libs, its metadata) into ``target``."""
    spec = importlib.util.find_spec(name)
    origin = Path(spec.origin).resolve()
    site = origin.parent.parent if spec.submodule_search_locations else origin.parent
    for entry in site.iterdir():
        lowered = entry.name.lower()
        if lowered == name or lowered.startswith((f'{name}.', f'{name}-')):
            (target / entry.name).symlink_to(entry)


def _core_requirements() -> list[str]:
    """numpy, nibabel, xxhash and what nibabel needs here, without its extras."""
    needed = {'numpy', 'nibabel', 'xxhash'}
    for line in importlib.metadata.requires('nibabel') or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({'extra': ''}):
            needed.add(req.name.lower().replace('-', '_'))
    return sorted(needed)


def _install_ours(target: Path, scratch: Path) -> None:
    """``pip install --no-deps`` of a copy of this tree (a build writes into its source)."""
    source = scratch / 'source'
    shutil.copytree(ROOT / 'nipype_nibtrack', source / 'nipype_nibtrack')
    for name in ('setup.cfg', 'pyproject.toml', 'README.md'):
        shutil.copy(ROOT / name, source / name)
    isolation = [] if importlib.util.find_spec('wheel') is None else ['--no-build-isolation']
    pip = [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', *isolation]
    out = subprocess.run(
        [*pip, '--target', str(target), str(source)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope='module')
def bare_python(tmp_path_factory) -> tuple[str, dict]:
    """A venv with the core's requirements (linked from this one) and our package as pip
    installs it: no nipype, no pydra."""
    base = tmp_path_factory.mktemp('bare')
    venv.create(base / 'venv', with_pip=False)
    deps = base / 'deps'
    deps.mkdir()
    for name in _core_requirements():
        _link_distribution(deps, name)
    _install_ours(deps, base)
    env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTHON', 'VIRTUAL_ENV'))}
    env['PYTHONPATH'] = str(deps)
    env['NIBTRACK_STORE'] = str(base / 'store')
    env['HOME'] = str(base)
    return str(base / 'venv' / 'bin' / 'python'), env


@pytest.mark.slow
def test_core_works_where_nipype_is_not_installed(bare_python, tmp_path):
    python, env = bare_python
    from nibabel.testing import data_path  # imports pytest, which the bare venv lacks

    src = shutil.copy(os.path.join(data_path, 'anatomical.nii'), tmp_path)
    code = f"""
        import importlib.util, os, sys
        import numpy as np, nibabel as nib
        assert importlib.util.find_spec('nipype') is None
        assert importlib.util.find_spec('pydra') is None
        import nipype_nibtrack as nt
        from nipype_nibtrack.cli import main
        print(nt.__file__)

        src = {src!r}
        img = nt.load(src)
        assert not nt.is_dirty(img) and nt.as_filename(img) == src
        img.get_fdata()[1, 2, 3] += 5
        assert nt.dirty_reason(img) == 'data edited after get_fdata()'
        stored = nt.as_filename(img, formats=['.nii.gz'])
        assert stored.startswith(os.environ['NIBTRACK_STORE']) and stored.endswith('.nii.gz')
        np.testing.assert_array_equal(nib.load(stored).get_fdata(), img.get_fdata())
        assert nt.as_filename(img, formats=['.nii.gz']) == stored  # written once, reused
        assert nt.image_digest(nt.load(src)) == nt.image_digest(nib.load(src))
        assert main(['store', 'info']) == 0
        try:
            nt.accept_images
        except ImportError as err:
            print('accept_images:', type(err).__name__, err.name)
        print(sorted(m for m in sys.modules if m.split('.')[0] in {ENGINE_MODULES!r}))
    """
    lines = _run(code, python, env, cwd=tmp_path).splitlines()  # not this tree: its copy
    assert lines[0].startswith(str(Path(env['PYTHONPATH']) / 'nipype_nibtrack'))
    assert lines[-2] == 'accept_images: ModuleNotFoundError nipype'
    assert lines[-1] == '[]'
    assert any('entries' in line for line in lines)  # `nibtrack store info` printed


@pytest.mark.slow
def test_the_installed_package_has_both_front_ends(bare_python):
    _, env = bare_python
    site = Path(env['PYTHONPATH']) / 'nipype_nibtrack'
    for front_end in ('nipype', 'pydra'):
        assert (site / front_end / '__init__.py').is_file()
