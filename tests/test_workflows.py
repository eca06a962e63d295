"""The example workflows, end to end with elastix; the FLIRT path through ``cmdline``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import realign
import recover_motion

import nipype_nibtrack as nt

ROOT = Path(__file__).resolve().parents[1]


def require(tool: str) -> None:
    """Skip without ``tool`` outside CI; under CI a missing tool is a failure."""
    if shutil.which(tool):
        return
    message = f'{tool} is not installed (sudo apt-get install elastix mrtrix3)'
    if os.environ.get('CI') == 'true':
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def store(tmp_path, monkeypatch):
    root = tmp_path / 'store'
    monkeypatch.setenv('NIBTRACK_STORE', str(root))
    return nt.Store(root)


def store_files(store: nt.Store) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in store.objects.rglob('*') if p.is_file()}


def test_realign_twice_second_run_writes_and_runs_nothing(tmp_path, store):
    require('elastix')
    anat = nt.load(realign.DATA / 'anatomical.nii')
    mean = realign.mean_functional(nib.load(realign.DATA / 'example4d.nii.gz'))
    workflow = realign.build_workflow(mean, anat, tool='elastix', base_dir=tmp_path / 'work')

    first = realign.run(workflow)
    assert first['nodes']['realign.register'][0] == 'ran'
    assert first['store_files_written'] == 1
    written = store_files(store)

    second = realign.run(workflow)
    assert second['nodes']['realign.register'] == ('cached', None)
    assert second['store_files_written'] == 0
    assert store_files(store) == written  # nothing rewritten, nothing touched

    (node,) = [n for n in second['graph'].nodes() if n.name == 'register']
    inputs = node.result.inputs
    assert inputs['fixed_image'] == str(realign.DATA / 'anatomical.nii')
    assert inputs['moving_image'].startswith(str(store.objects))
    assert Path(inputs['moving_image']).name == 'image.nii'
    warped = nib.load(node.result.outputs.warped_file)
    assert warped.shape == anat.shape


def test_realign_moving_image_is_the_mean_bit_for_bit(tmp_path, store):
    require('elastix')
    series = nib.load(realign.DATA / 'example4d.nii.gz')
    mean = realign.mean_functional(series)
    graph = realign.build_workflow(
        mean, realign.DATA / 'anatomical.nii', tool='elastix', base_dir=tmp_path
    ).run()
    (node,) = [n for n in graph.nodes() if n.name == 'register']
    handed = nib.load(node.result.inputs['moving_image'])
    assert np.array_equal(handed.get_fdata(dtype=np.float32), mean.get_fdata(dtype=np.float32))
    assert np.allclose(handed.affine, mean.affine, atol=1e-5)


def test_editing_the_mean_in_place_reruns_the_registration(tmp_path, store):
    require('elastix')
    mean = realign.mean_functional(nib.load(realign.DATA / 'example4d.nii.gz'))
    workflow = realign.build_workflow(
        mean, realign.DATA / 'anatomical.nii', tool='elastix', base_dir=tmp_path
    )
    realign.run(workflow)
    mean.dataobj[10, 10, 10] += 1
    again = realign.run(workflow)
    assert again['nodes']['realign.register'][0] == 'ran'
    assert again['store_files_written'] == 1


def test_flirt_path_through_cmdline(store):
    """FSL is not installable here: the same node, checked through its command line."""
    anat = nt.load(realign.DATA / 'anatomical.nii')
    mean = realign.mean_functional(nib.load(realign.DATA / 'example4d.nii.gz'))
    node, moving_field, reference_field = realign.registration_node('flirt')
    setattr(node.inputs, moving_field, mean)
    setattr(node.inputs, reference_field, anat)
    cmdline = node.interface.cmdline
    stored = nt.as_filename(mean, formats=('.nii', '.nii.gz'))
    assert cmdline.startswith(f'flirt -in {stored} -ref {anat.get_filename()} ')
    assert '-out image_flirt.nii.gz' in cmdline  # NIFTI_GZ output type, stem from the store
    assert '-dof 6' in cmdline and '-cost mutualinfo' in cmdline
    assert node.inputs.in_file is mean  # resolution does not replace the user's image


def test_flirt_and_elastix_workflows_differ_only_by_the_tool_node(tmp_path):
    flirt = realign.build_workflow('a', 'b', tool='flirt', base_dir=tmp_path)
    elastix = realign.build_workflow('a', 'b', tool='elastix', base_dir=tmp_path)
    names = [sorted(n.name for n in wf._graph.nodes()) for wf in (flirt, elastix)]
    assert names[0] == names[1] == ['inputnode', 'register']


MOTION = recover_motion.rigid_motion((3.0, -2.0, 4.0), (2.0, -4.0, 1.0))


@pytest.fixture(scope='module')
def motion_run(tmp_path_factory):
    """Register an in-memory moved copy of the anatomical image back to it, once."""
    require('elastix')
    work = tmp_path_factory.mktemp('motion')
    nt.set_store(work / 'store')
    try:
        reference = nt.load(recover_motion.DATA / 'anatomical.nii')
        moved = recover_motion.moved_copy(reference, MOTION)
        reason = nt.dirty_reason(moved)
        workflow = realign.build_workflow(
            moved, reference, tool='elastix', base_dir=work, name='motion'
        )
        (node,) = [n for n in workflow.run().nodes() if n.name == 'register']
        return reference, reason, node, nt.get_store()
    finally:
        nt.set_store(None)


def test_moved_image_goes_through_the_store_reference_by_path(motion_run):
    reference, reason, node, store = motion_run
    assert reason == "affine differs from the file's"
    assert node.result.inputs['fixed_image'] == reference.get_filename()
    assert node.result.inputs['moving_image'].startswith(str(store.objects))


def test_recovers_the_applied_rigid_motion(motion_run):
    reference, _, node, _ = motion_run
    recovery = recover_motion.compare(MOTION, node.result.outputs.transform[0], reference)
    assert recovery.corner_error_mm < recover_motion.TOLERANCE_MM
    assert recovery.rotation_error_deg < recover_motion.TOLERANCE_DEG


def test_a_wrong_expected_motion_is_rejected(motion_run):
    """The comparison can fail: half a millimetre off is outside the tolerance."""
    reference, _, node, _ = motion_run
    wrong = MOTION.copy()
    wrong[0, 3] += 0.5
    assert not recover_motion.compare(wrong, node.result.outputs.transform[0], reference).ok


def test_realign_script_help_and_run(tmp_path, store):
    require('elastix')
    script = ROOT / 'workflows' / 'realign.py'
    help_text = subprocess.run(
        [sys.executable, str(script), '--help'], capture_output=True, text=True, check=True
    ).stdout
    for option in ('--tool', '--plugin', '--base-dir'):
        assert option in help_text
    run = subprocess.run(
        [sys.executable, str(script), '--base-dir', str(tmp_path / 'w')],
        capture_output=True,
        text=True,
        check=True,
    )
    assert 'run 1:' in run.stdout and 'node realign.register: ran' in run.stdout
    assert 'run 2:' in run.stdout and 'node realign.register: cached' in run.stdout
    assert run.stdout.rstrip().endswith('image files written to the store: 0')
    assert 'written to the store as' in run.stderr + run.stdout
    assert 'passed by its original path' in run.stderr + run.stdout


def test_demo_needs_no_test_dependencies():
    """The demo installs the package without test extras: it must not import pytest."""
    code = (
        'import runpy, sys\n'
        "sys.modules['pytest'] = None  # any import of pytest now fails\n"
        "sys.argv = ['realign.py', '--help']\n"
        f"runpy.run_path({str(ROOT / 'workflows' / 'realign.py')!r}, run_name='__main__')\n"
    )
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert '--tool' in run.stdout
