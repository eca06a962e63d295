"""Whole workflows with in-memory images: Linear, MultiProc (fork, forkserver, spawn)
and the batch path; cached reruns execute nothing and write no image."""

import os
import pickle
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces.utility import Function, IdentityInterface
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


# ---------------------------------------------------------------- directories and workers
# issue 9: an image stays tied to the file it holds whatever directory nipype works in
# (items 1, 9), works however it loads (10), and every worker has the hooks and the
# store chosen in code (16, 17)


def _pipe(base: Path, first, first_inputs: dict, second=nf.describe) -> pe.Workflow:
    """``first`` (a Function node returning an image) -> ``second`` (``describe``)."""
    wf = pe.Workflow('pipe', base_dir=str(base))
    wf.config['execution']['poll_sleep_duration'] = 0.05
    make = pe.Node(
        Function(input_names=list(first_inputs), output_names=['out'], function=first),
        name='make',
    )
    for name, value in first_inputs.items():
        setattr(make.inputs, name, value)
    seen = pe.Node(
        Function(input_names=['img'], output_names=['out'], function=second), name='seen'
    )
    wf.connect(make, 'out', seen, 'img')
    return wf


def _seen(base: Path, name: str = 'pipe') -> dict:
    return nf.loadpkl(base / name / 'seen' / 'result_seen.pklz').outputs.out


def _decoy(folder: Path, name: str, fill: float) -> None:
    """An unrelated file of the same name, where the user's directory is."""
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), fill, 'f4'), np.eye(4)), str(folder / name))


@pytest.mark.parametrize('plugin', ['Linear', 'MultiProc-fork', 'MultiProc-spawn'])
def test_relative_image_returned_by_a_node_is_its_own_file(tmp_path, monkeypatch, plugin):
    monkeypatch.chdir(tmp_path)
    _decoy(tmp_path, 'out.nii', 7)  # the workflow's own, unrelated out.nii
    run(_pipe(tmp_path, nf.write_and_load_relative, {'fill': 3.0}), plugin)
    seen = _seen(tmp_path)
    assert seen['sum'] == 3 * 64
    assert seen['file'] == str(tmp_path / 'pipe' / 'make' / 'out.nii') and seen['exists']


@pytest.mark.parametrize('plugin', ['Linear', 'MultiProc-fork', 'batch'])
def test_relative_image_given_to_a_function_node(tmp_path, monkeypatch, plugin):
    monkeypatch.chdir(tmp_path)
    _decoy(tmp_path, 'in.nii', 5)
    img = nib.load('in.nii')
    wf = pe.Workflow('given', base_dir=str(tmp_path))
    wf.config['execution']['poll_sleep_duration'] = 0.05
    seen = pe.Node(
        Function(input_names=['img'], output_names=['out'], function=nf.describe), name='seen'
    )
    seen.inputs.img = img
    wf.add_nodes([seen])
    run(wf, plugin)
    out = _seen(tmp_path, 'given')
    assert out['sum'] == 5 * 64 and out['file'] == str(tmp_path / 'in.nii')
    # the node's own input is the user's image again (bound only for the run)
    assert seen.inputs.img is img


def test_relative_image_run_in_another_folder(tmp_path, monkeypatch):
    # a Function interface run with cwd=: the body runs there, the image is named here
    monkeypatch.chdir(tmp_path)
    _decoy(tmp_path, 'in.nii', 5)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    _decoy(elsewhere, 'in.nii', 9)  # what a relative read from there would see
    img = nib.load('in.nii')
    describe = Function(input_names=['img'], output_names=['out'], function=nf.describe)
    result = describe.run(cwd=str(elsewhere), img=img)
    assert result.outputs.out['sum'] == 5 * 64


@pytest.mark.parametrize('remove', ['true', 'false'])
@pytest.mark.parametrize('dirty', [False, True], ids=['clean', 'dirty'])
def test_image_in_the_node_folder_reaches_the_next_node(tmp_path, dirty, remove):
    wf = _pipe(tmp_path, nf.write_and_load_absolute, {'fill': 3.0, 'dirty': dirty})
    wf.config['execution']['remove_unnecessary_outputs'] = remove
    run(wf, 'Linear')
    seen = _seen(tmp_path)
    own = tmp_path / 'pipe' / 'make' / 'out.nii'
    assert seen['sum'] == 3 * 64 and seen['exists']
    if dirty:
        # its content went to the store before the node folder was cleaned
        assert seen['descrip'] == b'edited in the node'
        assert seen['file'].startswith(str(nf.store_root()))
        # the source file is not an output: removed with the other unneeded files
        assert own.exists() == (remove == 'false')
    else:
        # the returned image is an output: its file is kept, like a string output's
        assert seen['file'] == str(own) and own.exists()


def test_unneeded_image_output_is_dropped_as_nipype_drops_files(tmp_path):
    # remove_unnecessary_outputs: an output no node consumes loses its file, like a path
    wf = pe.Workflow('alone', base_dir=str(tmp_path))
    make = pe.Node(
        Function(input_names=['fill', 'dirty'], output_names=['out', 'n'], function=_two_outputs),
        name='make',
    )
    make.inputs.fill, make.inputs.dirty = 2.0, False
    count = pe.Node(Function(input_names=['n'], output_names=['m'], function=_same), name='c')
    wf.connect(make, 'n', count, 'n')
    run(wf, 'Linear')
    assert not (tmp_path / 'alone' / 'make' / 'out.nii').exists()


def _two_outputs(fill, dirty):
    import os

    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.full((4, 4, 4), fill, 'f4'), np.eye(4)), 'out.nii')
    return nib.load(os.path.abspath('out.nii')), 1


def _same(n):
    return n


@pytest.fixture
def chosen_store(tmp_path):
    """A store chosen in code (not through $NIBTRACK_STORE, which workers inherit)."""
    store = nt.set_store(tmp_path / 'chosen-store')
    yield store
    nt.set_store(None)


@pytest.mark.slow
@pytest.mark.parametrize('plugin', ['MultiProc-spawn', 'MultiProc-forkserver', 'batch'])
def test_fresh_workers_have_the_hooks_and_the_chosen_store(tmp_path, chosen_store, plugin):
    # the first node has no image input: nothing in its pickle named our package
    run(_pipe(tmp_path, nf.make_image, {}), plugin)
    result = tmp_path / 'pipe' / 'make' / 'result_make.pklz'
    assert result.stat().st_size < 8 * 1024, 'the image was pickled whole'
    seen = _seen(tmp_path)
    assert seen['exists'] and seen['store'] == str(chosen_store.root)
    assert seen['file'].startswith(str(chosen_store.root) + os.sep)
    expected = nf.make_image()
    assert seen['sum'] == pytest.approx(float(expected.get_fdata().sum()), rel=1e-6)


def test_store_chosen_in_a_worker_is_its_own(tmp_path, chosen_store):
    # a process that chose a store in code keeps it when it unpickles a node
    code = f"""
        import pickle, sys
        import nipype_nibtrack as nt
        nt.set_store({str(tmp_path / 'mine')!r})
        from nipype.interfaces.utility import IdentityInterface
        pickle.loads(sys.stdin.buffer.read())
        print(nt.get_store().root)
    """
    node = pe.Node(IdentityInterface(fields=['a'], a=1), name='n')
    proc = nf.run_python(code, input=pickle.dumps(node), text=False)
    assert proc.stdout.decode().strip() == str(tmp_path / 'mine')
    # one that did not adopts the store of the process that pickled the node
    proc = nf.run_python(code.replace('nt.set_store', 'str'), input=pickle.dumps(node), text=False)
    assert proc.stdout.decode().strip() == str(chosen_store.root)


def _format_images(tmp_path: Path) -> dict[str, object]:
    from nibabel.testing import data_path

    for name in ('phantom_EPI_asc_CLEAR_2_1.PAR', 'phantom_EPI_asc_CLEAR_2_1.REC'):
        shutil.copy(os.path.join(data_path, name), tmp_path)
    shutil.copy(os.path.join(data_path, 'minc2_1_scale.mnc'), tmp_path)
    shutil.copy(os.path.join(data_path, 'example4d.nii.gz'), tmp_path)
    return {
        'parrec': nt.load(tmp_path / 'phantom_EPI_asc_CLEAR_2_1.PAR'),
        'minc2': nt.load(tmp_path / 'minc2_1_scale.mnc'),
        'keep_file_open': nt.load(tmp_path / 'example4d.nii.gz', keep_file_open=True),
        'plain_parrec': nib.load(tmp_path / 'phantom_EPI_asc_CLEAR_2_1.PAR'),
    }


@pytest.mark.parametrize('plugin', ['Linear', 'MultiProc-fork'])
def test_images_holding_open_files_go_through_function_and_map_nodes(tmp_path, plugin):
    images = _format_images(tmp_path)
    wf = pe.Workflow('formats', base_dir=str(tmp_path))
    wf.config['execution']['poll_sleep_duration'] = 0.05
    nodes = {}
    for name, img in images.items():
        nodes[name] = pe.Node(
            Function(input_names=['img'], output_names=['out'], function=nf.voxel_sum), name=name
        )
        nodes[name].inputs.img = img
    mapped = pe.MapNode(
        Function(input_names=['img'], output_names=['out'], function=nf.voxel_sum),
        iterfield=['img'],
        name='mapped',
    )
    mapped.inputs.img = list(images.values())
    wf.add_nodes([*nodes.values(), mapped])
    run(wf, plugin)
    expected = {n: float(np.asanyarray(i.dataobj, dtype='f8').sum()) for n, i in images.items()}
    for name in images:
        got = nf.loadpkl(tmp_path / 'formats' / name / f'result_{name}.pklz').outputs.out
        assert got == pytest.approx(expected[name], rel=1e-9), name
    got = nf.loadpkl(tmp_path / 'formats' / 'mapped' / 'result_mapped.pklz').outputs.out
    assert got == pytest.approx(list(expected.values()), rel=1e-9)


def _value_as_float32(img):
    import numpy as np

    return float(img.get_fdata(dtype=np.float32)[1, 1, 1])


@pytest.mark.parametrize('plugin', ['Linear', 'MultiProc-fork'])
def test_a_function_node_sees_an_edited_cache_whatever_dtype_it_asks(tmp_path, plugin):
    # get_fdata(dtype=float32) of an image whose float64 cache was edited reads the file:
    # the function must get what the node is hashed by, the edit, under every plugin
    path = tmp_path / 'in.nii'
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 5, 'f4'), np.eye(4)), str(path))
    img = nt.load(path)
    img.get_fdata()[1, 1, 1] = -5.0
    wf = pe.Workflow('edited', base_dir=str(tmp_path))
    wf.config['execution']['poll_sleep_duration'] = 0.05
    seen = pe.Node(
        Function(input_names=['img'], output_names=['out'], function=_value_as_float32),
        name='seen',
    )
    seen.inputs.img = img
    wf.add_nodes([seen])
    run(wf, plugin)
    assert _seen(tmp_path, 'edited') == -5.0
    assert float(img.get_fdata()[1, 1, 1]) == -5.0 and seen.inputs.img is img
