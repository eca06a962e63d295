"""Images cross pickles as file references: small pickles whatever the image size."""

import gzip
import os
import pickle
import sys
import tracemalloc
from copy import deepcopy
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces.utility import Function
from nipype.pipeline import engine as pe
from nipype.pipeline.plugins.tools import create_pyscript

import nipype_nibtrack as nt
from nipype_nibtrack.nipype.pickling import ImagePickler, ImageReference, load_reference

sys.path.insert(0, os.path.dirname(__file__))
import nipype_fixtures as nf

LIMIT = 8 * 1024
MB = 2**20
Scale = nt.accept_images(nf.Scale)
Mean = nt.accept_images(nf.Mean)


@pytest.fixture(scope='module')
def big():
    """Two in-memory 16 MiB images (module scope: generating them takes a while)."""
    return nf.big_image(seed=201), nf.big_image(seed=202)


def aware_node(img, name='scale'):
    return pe.Node(Scale(in_file=img), name=name)


def function_node(img, counter='/nonexistent-counter', name='add_one'):
    node = pe.Node(
        Function(input_names=['img', 'counter'], output_names=['out'], function=nf.add_one),
        name=name,
    )
    node.inputs.img = img
    node.inputs.counter = counter
    return node


def map_node(imgs, name='mapscale'):
    node = pe.MapNode(Scale(), iterfield=['in_file'], name=name)
    node.inputs.in_file = list(imgs)
    return node


def list_node(imgs, name='mean'):
    return pe.Node(Mean(in_files=list(imgs)), name=name)


def _submission(node) -> int:
    """Bytes MultiProc sends to a worker for ``node`` (plugins/multiproc.py)."""
    return len(pickle.dumps(deepcopy(node)))


# ---------------------------------------------------------------- references


def test_reference_loads_back_as_a_clean_image():
    img = nf.random_image(seed=203)
    back = pickle.loads(pickle.dumps(ImageReference.of(img)))
    assert type(back) is nib.Nifti1Image and not nt.is_dirty(back)
    assert back.get_filename().startswith(str(nf.store_root()))
    np.testing.assert_array_equal(back.get_fdata(), img.get_fdata())
    np.testing.assert_array_equal(back.affine, img.affine)


def test_clean_image_references_its_own_file():
    before = set(nf.image_file_states(nf.store_root()))
    ref = ImageReference.of(nt.load(nf.ANAT))
    assert ref.path == nf.ANAT
    assert set(nf.image_file_states(nf.store_root())) == before


def test_missing_reference_says_what_to_share(tmp_path):
    with pytest.raises(FileNotFoundError, match='NIBTRACK_STORE') as info:
        load_reference(str(tmp_path / 'gone.nii'))
    assert 'nipype_nibtrack' in str(info.value) and 'gone.nii' in str(info.value)


def test_image_pickler_handles_nested_containers(big):
    import io

    buffer = io.BytesIO()
    ImagePickler(buffer).dump({'a': [big[0], (1, big[1])], 'b': nf.ANAT})
    assert len(buffer.getvalue()) < LIMIT
    back = pickle.loads(buffer.getvalue())
    assert back['b'] == nf.ANAT and back['a'][1][0] == 1
    assert back['a'][0].shape == nf.BIG_SHAPE


def test_plain_pickle_of_an_image_is_untouched():
    # only nipype's pickles are changed: the user's own pickle.dumps is not
    img = nf.random_image((20, 20, 20), seed=204)
    assert len(pickle.dumps(img)) > img.dataobj.nbytes


# ---------------------------------------------------------------- MultiProc submissions


@pytest.mark.parametrize('kind', ['aware', 'function', 'map', 'list'])
def test_multiproc_submission_is_small(big, kind):
    node = {
        'aware': lambda: aware_node(big[0]),
        'function': lambda: function_node(big[0]),
        'map': lambda: map_node(big),
        'list': lambda: list_node(big),
    }[kind]()
    size = _submission(node)
    assert size < LIMIT, size
    # pickling left the node's own inputs alone
    value = (
        node.inputs.img
        if kind == 'function'
        else getattr(node.inputs, 'in_files' if kind == 'list' else 'in_file')
    )
    assert nt.nipype.contains_image(value)
    # and what arrives in the worker holds images of the same content
    worker = pickle.loads(pickle.dumps(deepcopy(node)))
    got = (
        worker.inputs.img
        if kind == 'function'
        else getattr(worker.inputs, 'in_files' if kind == 'list' else 'in_file')
    )
    first = got[0] if isinstance(got, list) else got
    np.testing.assert_array_equal(np.asanyarray(first.dataobj), np.asanyarray(big[0].dataobj))


def test_hashed_node_submission_is_small(big):
    node = aware_node(big[0])
    node.config = deepcopy(nf.nipype_config._sections)
    node._get_hashval()  # what MultiProc's local hash check does first
    assert isinstance(node.inputs.in_file, str)
    assert _submission(node) < LIMIT


# ---------------------------------------------------------------- files nipype writes


def test_node_input_and_result_pickles_are_small(big, tmp_path):
    counter = tmp_path / 'runs'
    wf = pe.Workflow('pickles', base_dir=str(tmp_path))
    add = function_node(big[0], counter=str(counter))
    scale = aware_node(big[1])
    follow = pe.Node(Scale(), name='follow')
    wf.connect(add, 'out', follow, 'in_file')  # an image output into an aware input
    wf.add_nodes([map_node(big), list_node(big), scale])
    wf.run()
    pickles = sorted((tmp_path / 'pickles').rglob('*.pklz'))
    names = {p.name for p in pickles}
    assert {'_node.pklz', '_inputs.pklz', 'result_add_one.pklz', 'result_follow.pklz'} <= names
    assert {'result_mapscale.pklz', 'result_mean.pklz', 'result_scale.pklz'} <= names
    sizes = {str(p.relative_to(tmp_path)): p.stat().st_size for p in pickles}
    assert max(sizes.values()) < LIMIT, sizes
    # uncompressed too: nothing hides in gzip
    assert max(len(gzip.decompress(p.read_bytes())) for p in pickles) < 4 * LIMIT
    # the Function node's image output is a store file, loaded back clean
    result = nf.loadpkl(tmp_path / 'pickles' / 'add_one' / 'result_add_one.pklz')
    out = result.outputs.out
    assert isinstance(out, nib.Nifti1Image) and not nt.is_dirty(out)
    assert out.get_filename().startswith(str(nf.store_root()))
    np.testing.assert_array_equal(out.get_fdata(dtype='f4'), big[0].get_fdata(dtype='f4') + 1)
    followed = nf.loadpkl(tmp_path / 'pickles' / 'follow' / 'result_follow.pklz')
    assert followed.inputs['in_file'] == out.get_filename()


# ---------------------------------------------------------------- batch workers


def _batch_node(node, tmp_path: Path):
    node.base_dir = str(tmp_path / 'work')
    node.config = deepcopy(nf.nipype_config._sections)
    return deepcopy(node)  # what the SGE/SLURM/PBS plugins submit


@pytest.mark.parametrize('kind', ['aware', 'function', 'map'])
def test_batch_pickle_is_small_and_runs_in_a_fresh_interpreter(big, tmp_path, kind):
    counter = tmp_path / 'runs'
    node = {
        'aware': lambda: aware_node(big[0]),
        'function': lambda: function_node(big[0], str(counter)),
        'map': lambda: map_node(big),
    }[kind]()
    node = _batch_node(node, tmp_path)
    pyscript = create_pyscript(node)
    (pklz,) = (tmp_path / 'work' / 'batch').glob('node_*.pklz')
    assert pklz.stat().st_size < LIMIT
    nf.run_python(
        """
        import runpy, sys
        runpy.run_path(sys.argv[1], run_name='__main__')
        """,
        pyscript,
    )
    outdir = tmp_path / 'work' / node.name
    result = nf.loadpkl(outdir / f'result_{node.name}.pklz')
    assert result.outputs is not None, 'the batch job failed'
    if kind == 'aware':
        scaled = nib.load(result.outputs.out_file).get_fdata(dtype='f4')
        np.testing.assert_array_equal(scaled, 2 * big[0].get_fdata(dtype='f4'))
    elif kind == 'map':
        for out, img in zip(result.outputs.out_file, big, strict=True):
            np.testing.assert_array_equal(
                nib.load(out).get_fdata(dtype='f4'), 2 * img.get_fdata(dtype='f4')
            )
        assert max(p.stat().st_size for p in outdir.rglob('*.pklz')) < LIMIT
    else:
        np.testing.assert_array_equal(
            result.outputs.out.get_fdata(dtype='f4'), big[0].get_fdata(dtype='f4') + 1
        )
        assert nf.count_runs(counter) == 1


def test_batch_worker_imports_only_what_the_pickle_names(big, tmp_path):
    node = _batch_node(function_node(big[0]), tmp_path)
    create_pyscript(node)
    (pklz,) = (tmp_path / 'work' / 'batch').glob('node_*.pklz')
    proc = nf.run_python(
        """
        import sys
        from nipype.utils.filemanip import loadpkl
        assert 'nipype_nibtrack' not in sys.modules
        node = loadpkl(sys.argv[1])['node']
        import nipype_nibtrack as nt
        img = node.inputs.img
        shape = tuple(int(n) for n in sys.argv[2:])
        print(type(img).__name__, nt.is_dirty(img), img.shape == shape)
        """,
        str(pklz),
        *map(str, nf.BIG_SHAPE),
    )
    assert proc.stdout.split()[-3:] == ['Nifti1Image', 'False', 'True']


@pytest.mark.parametrize('kind', ['aware', 'function'])
def test_worker_without_the_package_says_so(big, tmp_path, kind):
    node = aware_node(big[0]) if kind == 'aware' else function_node(big[0])
    pyscript = create_pyscript(_batch_node(node, tmp_path))
    (pklz,) = (tmp_path / 'work' / 'batch').glob('node_*.pklz')
    env = nf.hide_package_env(tmp_path)
    proc = nf.run_python(
        """
        import sys
        from nipype.utils.filemanip import loadpkl
        loadpkl(sys.argv[1])
        """,
        str(pklz),
        env=env,
        check=False,
    )
    assert proc.returncode != 0
    assert "No module named 'nipype_nibtrack" in proc.stderr
    # the generated script stores the same error in its crash file
    nf.run_python(
        'import runpy, sys; runpy.run_path(sys.argv[1], run_name="__main__")',
        pyscript,
        env=env,
        check=False,
    )
    (crash,) = (tmp_path / 'work' / 'batch').glob('crashdump_*.pklz')
    record = nf.loadpkl(crash)
    assert 'nipype_nibtrack' in ''.join(record['traceback'])


# ---------------------------------------------------------------- deep copies


def _peak_bytes(action) -> tuple[int, object]:
    tracemalloc.start()
    try:
        out = action()
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def test_deepcopy_of_an_aware_node_shares_the_image(big):
    node = aware_node(big[0])
    peak, copied = _peak_bytes(lambda: deepcopy(deepcopy(node)))
    assert copied.inputs.in_file is big[0]
    assert copied.inputs.in_file.dataobj is big[0].dataobj
    assert peak < 1 * MB, peak
    # a list input too
    peak, copied = _peak_bytes(lambda: deepcopy(list_node(big)))
    assert copied.inputs.in_files[1] is big[1] and peak < 1 * MB


def test_deepcopy_memory_of_function_and_map_nodes(big, capsys):
    size = big[0].dataobj.nbytes
    peaks = {}
    for kind, make in [
        ('function', lambda: function_node(big[0])),
        ('map', lambda: map_node(big)),
    ]:
        node = make()
        peak, _ = _peak_bytes(lambda node=node: deepcopy(node))
        peaks[kind] = peak
    with capsys.disabled():
        print(
            f'\n[peak memory of one deepcopy, {size / MB:.0f} MiB images] '
            + ', '.join(f'{k}: {v / MB:.1f} MiB' for k, v in peaks.items())
        )
    # nipype's DynamicTraitedSpec deep-copies values: one copy per image, no more
    assert peaks['function'] < 1.5 * size
    assert peaks['map'] < 2.5 * size


def test_unwritable_image_is_pickled_whole_not_refused(caplog):
    # the hash refuses it with a clear error; a pickle (nipype's crash file) must not
    bytes_img = nib.Nifti1Image.from_bytes(nf.random_image(seed=205).to_bytes())
    node = function_node(bytes_img)
    back = pickle.loads(pickle.dumps(node))
    np.testing.assert_array_equal(back.inputs.img.get_fdata(), bytes_img.get_fdata())
    assert 'pickling a Nifti1Image whole' in caplog.text


# ---------------------------------------------------------------- fresh interpreters


def test_every_spec_pickle_installs_the_hooks_where_it_is_loaded(tmp_path):
    # a node without any image: nothing in its pickle would otherwise name our package
    node = pe.Node(
        Function(input_names=[], output_names=['out'], function=nf.make_image), name='make'
    )
    path = tmp_path / 'node.pklz'
    nf.savepkl(str(path), node)
    code = """
        import sys
        from nipype.utils.filemanip import loadpkl
        assert 'nipype_nibtrack' not in sys.modules
        node = loadpkl(sys.argv[1])
        from nipype.interfaces.base.specs import BaseTraitedSpec
        print(getattr(BaseTraitedSpec.__getstate__, '_nibtrack', False))
    """
    assert nf.run_python(code, str(path)).stdout.split() == ['True']


def test_crash_file_holds_references_and_loads_elsewhere(big, tmp_path):
    wf = pe.Workflow('crashing', base_dir=str(tmp_path))
    wf.config['execution']['crashdump_dir'] = str(tmp_path / 'crashes')
    node = pe.Node(
        Function(input_names=['img'], output_names=['out'], function=_fail), name='fails'
    )
    node.inputs.img = big[0]
    wf.add_nodes([node])
    with pytest.raises(RuntimeError):
        wf.run()
    (crash,) = (tmp_path / 'crashes').glob('crash-*.pklz')
    assert crash.stat().st_size < LIMIT
    code = """
        import sys
        from nipype.utils.filemanip import loadpkl
        img = loadpkl(sys.argv[1])['node'].inputs.img
        print(img.shape, img.get_filename().startswith(sys.argv[2]))
    """
    out = nf.run_python(code, str(crash), str(nf.store_root())).stdout
    assert out.split() == ['(128,', '128,', '256)', 'True']


def _fail(img):
    raise RuntimeError('this node fails on purpose')
