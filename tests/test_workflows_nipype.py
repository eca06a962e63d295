"""Whole workflows with in-memory images: Linear, MultiProc (fork, forkserver, spawn)
and the batch path; cached reruns execute nothing and write no image."""

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces.utility import Function
from nipype.pipeline import engine as pe

import nipype_nibtrack as nt
from nipype_nibtrack import image_label as iterable_label

sys.path.insert(0, os.path.dirname(__file__))
import nipype_fixtures as nf

Scale = nt.accept_images(nf.Scale)
Mean = nt.accept_images(nf.Mean)

PLUGINS = {
    'Linear': ('Linear', {}),
    'MultiProc-fork': ('MultiProc', {'n_procs': 2, 'mp_context': 'fork'}),
    'MultiProc-forkserver': ('MultiProc', {'n_procs': 2, 'mp_context': 'forkserver'}),
    'MultiProc-spawn': ('MultiProc', {'n_procs': 2, 'mp_context': 'spawn'}),
    'batch': ('batch', {}),
}


def _function(function, name: str, counter: Path) -> pe.Node:
    node = pe.Node(
        Function(input_names=['img', 'counter'], output_names=['out'], function=function),
        name=name,
    )
    node.inputs.counter = str(counter)
    return node


def build(base: Path, a, b, counter: Path) -> pe.Workflow:
    """Every way an image enters a workflow.

    add_one (Function, image in, image out) -> scale (aware) -> total (Function);
    mapscale (MapNode over [a, b]); iterscale (iterables over [a, b]);
    mean (list input [a, b]); clean (a loaded file, passed by its path).
    """
    wf = pe.Workflow('wf', base_dir=str(base))
    wf.config['execution']['poll_sleep_duration'] = 0.05
    add_one = _function(nf.add_one, 'add_one', counter)
    add_one.inputs.img = a
    scale = pe.Node(Scale(counter=str(counter)), name='scale')
    total = _function(nf.image_sum, 'total', counter)
    wf.connect([(add_one, scale, [('out', 'in_file')]), (scale, total, [('out_file', 'img')])])
    mapscale = pe.MapNode(Scale(counter=str(counter)), iterfield=['in_file'], name='mapscale')
    mapscale.inputs.in_file = [a, b]
    iterscale = pe.Node(Scale(counter=str(counter)), name='iterscale')
    iterscale.iterables = ('in_file', [a, b])
    mean = pe.Node(Mean(in_files=[a, b], counter=str(counter)), name='mean')
    clean = pe.Node(Scale(in_file=nt.load(nf.ANAT), counter=str(counter)), name='clean')
    wf.add_nodes([mapscale, iterscale, mean, clean])
    return wf


def run(wf: pe.Workflow, plugin: str) -> None:
    name, args = PLUGINS[plugin]
    if name == 'batch':
        wf.run(plugin=nf.LocalBatchPlugin(plugin_args={'env': nf.subprocess_env()}))
    else:
        wf.run(plugin=name, plugin_args=dict(args))


def image_writes(base: Path, action) -> list[str]:
    before = nf.image_file_states(nf.store_root(), base)
    action()
    return nf.written_between(before, nf.image_file_states(nf.store_root(), base))


def runs(counter: Path) -> dict[str, int]:
    tags = {'add_one': 'add_one', 'total': 'image_sum', 'scale': 'scale', 'mean': 'mean'}
    return {node: nf.count_runs(counter, tag) for node, tag in tags.items()}


def total_of(base: Path) -> float:
    return nf.loadpkl(base / 'wf' / 'total' / 'result_total.pklz').outputs.out


@pytest.mark.slow
@pytest.mark.parametrize('plugin', list(PLUGINS))
def test_workflow_runs_caches_and_follows_edits(tmp_path, plugin):
    counter = tmp_path / 'runs'
    seed = 400 + 10 * list(PLUGINS).index(plugin)  # content unique to this test
    a, b = nf.random_image(seed=seed), nf.random_image(seed=seed + 1)
    wf = build(tmp_path, a, b, counter)

    first = image_writes(tmp_path, lambda: run(wf, plugin))
    assert runs(counter) == {'add_one': 1, 'total': 1, 'scale': 6, 'mean': 1}
    expected = float(2 * (a.get_fdata(dtype='f4') + 1).sum(dtype='f8'))
    assert total_of(tmp_path) == pytest.approx(expected, rel=1e-5)
    # each in-memory image was written to the store once, under its content
    store = [p for p in first if p.startswith(str(nf.store_root()))]
    assert len(store) == len(set(store)) == 3  # a, b and add_one's output
    for folder in (f'_in_file_{iterable_label(a)}', f'_in_file_{iterable_label(b)}'):
        assert (tmp_path / 'wf' / folder / 'iterscale').is_dir()

    # second run, same in-memory images: nothing runs, no image is written
    assert image_writes(tmp_path, lambda: run(wf, plugin)) == []
    assert runs(counter) == {'add_one': 1, 'total': 1, 'scale': 6, 'mean': 1}

    # an in-place edit of `a` reruns exactly what depends on it
    a.dataobj[0, 0, 0] += 10
    run(wf, plugin)
    assert runs(counter) == {'add_one': 2, 'total': 2, 'scale': 9, 'mean': 2}
    expected = float(2 * (a.get_fdata(dtype='f4') + 1).sum(dtype='f8'))
    assert total_of(tmp_path) == pytest.approx(expected, rel=1e-5)


def test_same_images_in_new_objects_hit_the_cache(tmp_path):
    counter = tmp_path / 'runs'
    a, b = nf.random_image(seed=301), nf.random_image(seed=302)
    run(build(tmp_path, a, b, counter), 'Linear')
    assert sum(runs(counter).values()) == 9
    # a new session: the same content loaded again, other objects, a new workflow
    a2 = nib.Nifti1Image(a.get_fdata(dtype='f4'), a.affine.copy())
    b2 = nib.Nifti1Image(np.asfortranarray(b.get_fdata(dtype='f4')), b.affine.copy())
    writes = image_writes(tmp_path, lambda: run(build(tmp_path, a2, b2, counter), 'Linear'))
    assert writes == [] and sum(runs(counter).values()) == 9


def test_function_output_image_feeds_an_aware_input(tmp_path):
    counter = tmp_path / 'runs'
    a = nf.random_image(seed=303)
    wf = build(tmp_path, a, nf.random_image(seed=304), counter)
    run(wf, 'Linear')
    added = nf.loadpkl(tmp_path / 'wf' / 'add_one' / 'result_add_one.pklz').outputs.out
    scaled = nf.loadpkl(tmp_path / 'wf' / 'scale' / 'result_scale.pklz')
    assert scaled.inputs['in_file'] == added.get_filename()
    np.testing.assert_array_equal(
        nib.load(scaled.outputs.out_file).get_fdata(), 2 * (a.get_fdata(dtype='f4') + 1)
    )


def test_mapnode_results_in_order(tmp_path):
    counter = tmp_path / 'runs'
    a, b = nf.random_image(seed=305), nf.random_image(seed=306)
    run(build(tmp_path, a, b, counter), 'Linear')
    result = nf.loadpkl(tmp_path / 'wf' / 'mapscale' / 'result_mapscale.pklz')
    outs = result.outputs.out_file
    assert len(outs) == 2
    for out, img in zip(outs, (a, b), strict=True):
        np.testing.assert_array_equal(nib.load(out).get_fdata(), 2 * img.get_fdata(dtype='f4'))
    mean = nf.loadpkl(tmp_path / 'wf' / 'mean' / 'result_mean.pklz').outputs.mean
    assert mean == pytest.approx(
        np.mean([a.get_fdata(dtype='f4').mean(), b.get_fdata(dtype='f4').mean()]), abs=1e-6
    )


def test_clean_input_is_never_written(tmp_path):
    counter = tmp_path / 'runs'
    wf = pe.Workflow('cleanonly', base_dir=str(tmp_path))
    wf.add_nodes([pe.Node(Scale(in_file=nt.load(nf.ANAT), counter=str(counter)), name='s')])
    before = set(nf.image_file_states(nf.store_root()))
    run(wf, 'Linear')
    assert set(nf.image_file_states(nf.store_root())) == before
    result = nf.loadpkl(tmp_path / 'cleanonly' / 's' / 'result_s.pklz')
    assert result.inputs['in_file'] == nf.ANAT


def test_batch_job_without_the_package_fails_saying_so(tmp_path):
    counter = tmp_path / 'runs'
    wf = pe.Workflow('hidden', base_dir=str(tmp_path))
    wf.config['execution']['poll_sleep_duration'] = 0.05
    wf.config['execution']['job_finished_timeout'] = 1
    wf.add_nodes(
        [pe.Node(Scale(in_file=nf.random_image(seed=307), counter=str(counter)), name='s')]
    )
    env = nf.hide_package_env(tmp_path)
    env['PYTHONPATH'] += os.pathsep + str(nf.TESTS_DIR)
    # The main process sees nipype's own report: a RuntimeError, or a TypeError from
    # report_crash (nipype 1.11 adds a list to a str when the result file is missing)
    with pytest.raises((RuntimeError, TypeError)):
        wf.run(plugin=nf.LocalBatchPlugin(plugin_args={'env': env}))
    crashes = list((tmp_path / 'hidden' / 'batch').glob('crashdump_*.pklz'))
    assert crashes, 'the worker left no crash file'
    traceback = ''.join(nf.loadpkl(crashes[0])['traceback'])
    assert "No module named 'nipype_nibtrack" in traceback
    assert nf.count_runs(counter) == 0
