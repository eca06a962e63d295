"""The realignment workflow end to end with elastix; the FLIRT path through ``cmdline``.

One module-wide story runs the default series (8 volumes) under MultiProc: a first run,
a cached rerun, and a rerun after one voxel of volume 5 changed in memory. The command
line runs a shorter series under Linear.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hypothesis.strategies as st
import matplotlib.image
import motion  # workflows/, on the path through the root conftest.py
import nibabel as nib
import numpy as np
import pytest
import realign
import simulate
from hypothesis import given, settings
from nipype.utils.filemanip import loadpkl

import nipype_nibtrack as nt

ROOT = Path(__file__).resolve().parents[1]
PERTURBED = 5
DOWNSTREAM = {
    'realign',  # the MapNode gathering the volumes
    'mean',
    'motion',
    'coregister',
    'motion_picture',
    'coregistration_picture',
}


def require(tool: str) -> None:
    """Skip without ``tool`` outside CI; under CI a missing tool is a failure."""
    if shutil.which(tool):
        return
    message = f'{tool} is not installed (sudo apt-get install elastix)'
    if os.environ.get('CI') == 'true':
        pytest.fail(message)
    pytest.skip(message)


def node_states(outcome: dict) -> dict[str, str]:
    """``{'realign.mean': 'ran', 'volume 3': 'cached', ...}`` from a run's report."""
    states = {}
    for node_dir, (state, _) in outcome['progress'].items():
        volume = realign._volume(node_dir)
        states[f'volume {volume}' if volume is not None else Path(node_dir).name] = state
    return states


@pytest.fixture(scope='module')
def story(tmp_path_factory):
    """Run the default series three times: first, cached, after one voxel of volume 5."""
    require('elastix')
    work = tmp_path_factory.mktemp('story')
    nt.set_store(work / 'store')
    try:
        series = simulate.functional_series()
        anatomical = nt.load(simulate.anatomical_path())
        workflow = realign.build_workflow(series, anatomical, tool='elastix', base_dir=work)
        outcomes = []
        for perturb in (False, False, True):
            if perturb:
                np.asarray(series.volumes[PERTURBED].dataobj)[32, 38, 30] += 1.0
            outcomes.append(realign.run(workflow, 'MultiProc'))
        yield series, anatomical, outcomes, nt.get_store()
    finally:
        nt.set_store(None)


def test_every_volume_within_tolerance_of_the_true_motion(story):
    series, anatomical, outcomes, _ = story
    found = realign.findings(outcomes[0]['graph'], series, 'elastix', anatomical)
    assert found.errors.shape == (8, 2)
    assert found.ok, found.errors
    assert found.max_mm <= 0.3 and found.max_deg <= 0.3
    # the series really moved: the errors are small against motions of up to 2 mm / 2 deg
    assert np.abs(series.trace[:, :3]).max() > 1.0 and np.abs(series.trace[:, 3:]).max() > 1.5
    # the parameters themselves, in the same convention, agree too
    assert np.abs(found.estimated - series.trace).max() < 0.15
    # the mean functional lands on the anatomical image (truth: the offset's inverse)
    mm, deg = found.coregistration_error
    assert mm < 1.0 and deg < 0.5, (mm, deg)


@pytest.mark.parametrize(
    'wrong',
    [
        'half a millimetre in y for one volume',
        'half a degree about z for one volume',
        'the truth of the previous volume',
        'the inverse motion (the other direction)',
        'the motion in ITK LPS coordinates, not RAS',
        'the rotation centre at the world origin',
    ],
)
def test_a_wrong_truth_fails_the_check(story, wrong):
    """The check can fail: each mistake a comparison could make is caught."""
    series, _, outcomes, _ = story
    estimated = np.array(realign.node_result(outcomes[0]['graph'], 'motion').outputs.parameters)
    truth = series.motion.copy()
    v = 4  # the volume after the sudden move
    if wrong.startswith('half a millimetre'):
        truth[v] = motion.rigid((0, 0.5, 0, 0, 0, 0)) @ truth[v]
    elif wrong.startswith('half a degree'):
        truth[v] = motion.rigid((0, 0, 0, 0, 0, 0.5), series.centre) @ truth[v]
    elif wrong.startswith('the truth of the previous'):
        truth[v] = truth[v - 1]
    elif wrong.startswith('the inverse'):
        truth[v] = np.linalg.inv(truth[v])
    elif wrong.startswith('the motion in ITK'):
        lps = np.diag([-1.0, -1, 1, 1])
        truth[v] = lps @ truth[v] @ lps
    else:
        truth[v] = motion.rigid(series.trace[v], (0, 0, 0))
    errors = [
        motion.residual(motion.rigid(p, series.centre), t, series.brain)
        for p, t in zip(estimated, truth, strict=True)
    ]
    assert max(mm for mm, _ in errors) > realign.TOLERANCE_MM or (
        max(deg for _, deg in errors) > realign.TOLERANCE_DEG
    )


def test_first_run_runs_every_node_and_stores_every_volume(story):
    _, anatomical, outcomes, store = story
    first = outcomes[0]
    assert first['volumes_registered'] == list(range(8))
    assert first['nodes_cached'] == 0
    assert first['nodes_run'] == 8 + len(DOWNSTREAM)
    assert first['store_files_written'] == 8 + 1  # the volumes, then the mean
    coregister = realign.node_result(first['graph'], 'coregister')
    assert coregister.inputs['fixed_image'] == anatomical.get_filename()  # by its own path
    assert coregister.inputs['moving_image'].startswith(str(store.objects))  # the mean


def test_rerun_runs_no_node_and_writes_no_file(story):
    _, _, outcomes, _ = story
    second = outcomes[1]
    assert second['nodes_run'] == 0
    assert second['nodes_cached'] == 8 + len(DOWNSTREAM)
    assert second['volumes_registered'] == []
    assert second['store_files_written'] == 0
    assert second['files_written'] == []  # nothing in the work directory or the store
    assert set(node_states(second).values()) == {'cached'}


def test_one_changed_voxel_reruns_that_volume_and_what_depends_on_it(story):
    _, _, outcomes, _ = story
    third = outcomes[2]
    assert third['volumes_registered'] == [PERTURBED]
    states = node_states(third)
    downstream = expected_downstream(outcomes[0], third)
    ran = {name for name, state in states.items() if state == 'ran'}
    assert ran == {f'volume {PERTURBED}'} | downstream
    cached = {name for name, state in states.items() if state == 'cached'}
    others = {f'volume {v}' for v in range(8) if v != PERTURBED}
    assert cached == others | (DOWNSTREAM - downstream)
    assert third['store_files_written'] == 2  # volume 5 as it is now, and the new mean
    # elastix was handed volume 5 as it is now in memory, the changed voxel included
    series = story[0]
    (sub,) = [d for d in third['progress'] if realign._volume(d) == PERTURBED]
    handed = loadpkl(next(Path(sub).glob('result_*.pklz'))).inputs['moving_image']
    now = np.asarray(series.volumes[PERTURBED].dataobj)
    assert np.array_equal(np.asanyarray(nib.load(handed).dataobj), now)
    # no other volume's folder was touched
    others = [f'/_realign{v}/' for v in range(8) if v != PERTURBED]
    assert not [p for p in third['files_written'] if any(o in p for o in others)]
    assert any(f'/_realign{PERTURBED}/' in p for p in third['files_written'])


def expected_downstream(before: dict, after: dict) -> set[str]:
    """The nodes downstream of a changed volume that must run again.

    The motion plot's input is the table of estimates; when the changed voxel leaves
    every estimate the same to the last digit (elastix samples 2,048 random points),
    its hash is the same and it rightly stays cached.
    """
    same = (
        realign.node_result(before['graph'], 'motion').outputs.parameters
        == realign.node_result(after['graph'], 'motion').outputs.parameters
    )
    return DOWNSTREAM - {'motion_picture'} if same else DOWNSTREAM


def _png(path: str) -> np.ndarray:
    assert Path(path).is_absolute()
    assert Path(path).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    return matplotlib.image.imread(path)


def test_both_pictures_are_real_images_with_content(story):
    series, anatomical, outcomes, _ = story
    found = realign.findings(outcomes[2]['graph'], series, 'elastix', anatomical)
    traces, overlay = (_png(p) for p in found.pictures)
    for picture in (traces, overlay):
        assert picture.shape[0] > 400 and picture.shape[1] > 600
        grey = picture[..., :3].mean(axis=2)
        assert grey.std() > 0.1  # not blank: dark brain slices on white, or the reverse
    # the motion plot draws three coloured traces; the overlay red and yellow outlines
    for image in (traces, overlay):
        rgb = image[..., :3]
        colourful = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.4
        assert colourful.mean() > 0.002
    # the overlay shows a brain on black: many grey levels, mostly dark
    levels = np.unique(np.round(overlay[..., :3].mean(axis=2), 2))
    assert len(levels) > 50 and overlay[..., :3].mean() < 0.5


def test_flirt_path_through_cmdline():
    """FSL is not installable here: the same realignment node, checked by its command line."""
    series = simulate.functional_series(2)
    interface, names = realign.registration('flirt', 'realign')
    setattr(interface.inputs, names.moving, series.volumes[1])
    setattr(interface.inputs, names.fixed, series.volumes[0])
    cmdline = interface.cmdline
    moving, fixed = (nt.as_filename(v, formats=('.nii',)) for v in series.volumes[1::-1])
    assert cmdline.startswith(f'flirt -in {moving} -ref {fixed} ')
    assert '-dof 6' in cmdline and '-cost normcorr' in cmdline
    assert interface.inputs.in_file is series.volumes[1]  # the user's image is kept


def test_flirt_and_elastix_workflows_have_the_same_nodes(tmp_path):
    series = simulate.functional_series(2)
    names = [
        sorted(
            n.name
            for n in realign.build_workflow(
                series, simulate.anatomical_path(), tool=t
            )._graph.nodes()
        )
        for t in ('flirt', 'elastix')
    ]
    assert names[0] == names[1]


angles = st.floats(-60, 60)
shifts = st.floats(-20, 20)


six = st.tuples(shifts, shifts, shifts, angles, angles, angles)


@settings(max_examples=200, deadline=None)
@given(six, st.tuples(shifts, shifts, shifts))
def test_parameters_invert_rigid(params, centre):
    back = motion.parameters(motion.rigid(params, centre), centre)
    assert np.allclose(back, params, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(six)
def test_residual_of_an_estimate_that_is_the_truth_is_zero(params):
    m = motion.rigid(params, (5, -10, 20))
    mm, deg = motion.residual(m, m, [[0, 0, 0], [80, 0, 0], [0, 90, -40]])
    assert mm < 1e-6 and deg < 1e-4
    # and a pure translation left over is measured as its length everywhere
    shifted = motion.rigid((0.3, -0.4, 0, 0, 0, 0)) @ m
    assert np.isclose(motion.residual(m, shifted, [[1, 2, 3]])[0], 0.5)


def test_elastix_transform_file_read_in_ras(tmp_path):
    """ITK's LPS: a +2 mm translation along ITK's x is 2 mm towards the right... negated."""
    text = (
        '(Transform "EulerTransform")\n(NumberOfParameters 6)\n'
        '(TransformParameters 0 0 0.1 2 0 0)\n(CenterOfRotationPoint 0 0 0)\n'
    )
    (tmp_path / 't.txt').write_text(text)
    matrix = motion.from_elastix(tmp_path / 't.txt')
    assert np.allclose(matrix[:3, 3], [-2, 0, 0])  # LPS +x is RAS -x
    assert np.isclose(motion.parameters(matrix)[5], np.degrees(0.1))  # z rotation keeps its sign
    (tmp_path / 'b.txt').write_text(text.replace('EulerTransform', 'AffineTransform'))
    with pytest.raises(ValueError, match='not an elastix EulerTransform'):
        motion.from_elastix(tmp_path / 'b.txt')


def test_flirt_matrix_read_in_world_coordinates(tmp_path):
    """FSL's x axis runs against RAS x for a RAS-handed image: a +2 FSL mm shift is -2 mm."""

    img = nib.Nifti1Image(np.zeros((10, 12, 8), 'f4'), np.diag([2.0, 2, 2, 1]))
    shift = np.eye(4)
    shift[0, 3] = 2.0  # moving -> fixed, FSL scaled mm
    np.savetxt(tmp_path / 'm.mat', shift)
    fixed_to_moving = motion.from_flirt(tmp_path / 'm.mat', img, img)
    assert np.allclose(fixed_to_moving[:3, 3], [2.0, 0, 0])


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / 'workflows' / 'realign.py'), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_command_line_linear_summary_and_short_output(tmp_path, monkeypatch):
    require('elastix')
    monkeypatch.setenv('NIBTRACK_STORE', str(tmp_path / 'store'))
    summary = tmp_path / 'summary.json'
    args = ['--plugin', 'Linear', '--volumes', '3', '--base-dir', str(tmp_path / 'w')]
    run = _script(*args, '--runs', '3', '--perturb', '2', '--summary', str(summary), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(summary.read_text())
    assert set(data) == {'runs', 'motion_error', 'pictures'}
    assert set(data['motion_error']) == {'max_mm', 'max_deg'}
    assert len(data['runs']) == 3
    for entry in data['runs']:
        assert set(entry) == {
            'seconds',
            'volumes_registered',
            'nodes_run',
            'nodes_cached',
            'store_files_written',
        }
        assert isinstance(entry['seconds'], float)
    first, second, third = data['runs']
    assert first['volumes_registered'] == [0, 1, 2] and first['nodes_cached'] == 0
    assert second['nodes_run'] == 0 and second['store_files_written'] == 0
    assert third['volumes_registered'] == [2]
    assert third['nodes_run'] in (len(DOWNSTREAM), 1 + len(DOWNSTREAM)), run.stdout
    assert third['nodes_cached'] == 2 + (1 + len(DOWNSTREAM) - third['nodes_run']), run.stdout
    assert data['motion_error']['max_mm'] <= 0.3 and data['motion_error']['max_deg'] <= 0.3
    for picture in data['pictures']:
        assert Path(picture).is_absolute() and picture in run.stdout
        _png(picture)
    # for people: no tool output on the terminal, under 60 lines per run
    assert len(run.stdout.splitlines()) < 60
    assert 'elastix is started at' not in run.stdout + run.stderr
    assert not run.stderr.strip(), run.stderr
    assert 'only volume 2 changed' in run.stdout
    # the tool's output is kept where a user can read it
    assert list((tmp_path / 'w').rglob('stdout.nipype'))


def test_command_line_rejects_a_volume_out_of_range(tmp_path):
    run = _script('--volumes', '3', '--perturb', '3', cwd=tmp_path)
    assert run.returncode == 2 and '--perturb K needs 0 <= K < 3' in run.stderr


def test_demo_needs_no_test_dependencies():
    """The demo installs the package without test extras: it must not import pytest."""
    code = (
        'import runpy, sys\n'
        "sys.modules['pytest'] = None  # any import of pytest now fails\n"
        "sys.modules['hypothesis'] = None\n"
        f'sys.path.insert(0, {str(ROOT / "workflows")!r})\n'
        "sys.argv = ['realign.py', '--help']\n"
        f"runpy.run_path({str(ROOT / 'workflows' / 'realign.py')!r}, run_name='__main__')\n"
    )
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for option in ('--tool', '--plugin', '--base-dir', '--runs', '--volumes', '--perturb'):
        assert option in run.stdout
