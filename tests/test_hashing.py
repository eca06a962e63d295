"""Node hashes follow image content; iterable folders are named after it."""

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces import fsl
from nipype.interfaces.utility import Function
from nipype.pipeline import engine as pe

import nipype_nibtrack as nt
from nipype_nibtrack import image_label as iterable_label

sys.path.insert(0, os.path.dirname(__file__))
import nipype_fixtures as nf

METHODS = ['timestamp', 'content']
FLIRT = nt.accept_images(fsl.FLIRT)
Scale = nt.accept_images(nf.Scale)
Mean = nt.accept_images(nf.Mean)


def flirt_node(value):
    return pe.Node(FLIRT(in_file=value, reference=nf.ANAT, dof=6), name='flirt')


def scale_node(value):
    return pe.Node(Scale(in_file=value, factor=3.0), name='scale')


def function_node(value):
    node = pe.Node(
        Function(input_names=['img', 'counter'], output_names=['out'], function=nf.image_sum),
        name='fsum',
    )
    node.inputs.img = value
    node.inputs.counter = '/nonexistent-counter'
    return node


def mean_node(value):
    return pe.Node(Mean(in_files=[value, nf.ANAT]), name='mean')


def map_node(value):
    node = pe.MapNode(Scale(), iterfield=['in_file'], name='mapscale')
    node.inputs.in_file = [value, nf.ANAT]
    return node


MAKERS = [flirt_node, scale_node, function_node, mean_node, map_node]
IDS = [m.__name__ for m in MAKERS]


def _store_files() -> set:
    return set(nf.image_file_states(nf.store_root()))


# ---------------------------------------------------------------- clean images


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('make', MAKERS, ids=IDS)
def test_clean_image_hashes_exactly_like_its_path(make, method):
    before = _store_files()
    by_image = nf.node_hash(make(nt.load(nf.ANAT)), method)
    by_plain_load = nf.node_hash(make(nib.load(nf.ANAT)), method)
    by_path = nf.node_hash(make(nf.ANAT), method)
    assert by_image == by_path == by_plain_load
    assert _store_files() == before  # a clean image is never written


@pytest.mark.parametrize('method', METHODS)
def test_clean_image_hash_equals_plain_nipype_with_the_path(method):
    ours = nf.node_hash(flirt_node(nt.load(nf.ANAT)), method)
    proc = nf.run_python(
        """
        import sys
        from copy import deepcopy
        from nipype import config
        from nipype.interfaces import fsl
        from nipype.pipeline import engine as pe
        node = pe.Node(fsl.FLIRT(in_file=sys.argv[1], reference=sys.argv[1], dof=6), name='f')
        node.config = deepcopy(config._sections)
        node.config['execution']['hash_method'] = sys.argv[2]
        assert 'nipype_nibtrack' not in sys.modules
        print(node._get_hashval()[1])
        """,
        nf.ANAT,
        method,
    )
    assert proc.stdout.split()[-1] == ours


# ---------------------------------------------------------------- dirty images


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('make', MAKERS, ids=IDS)
def test_equal_content_in_another_object_hashes_the_same(make, method):
    img = nf.random_image(seed=101)
    twin = nib.Nifti1Image(np.asfortranarray(img.get_fdata(dtype='f4')), img.affine.copy())
    assert twin is not img and twin.dataobj is not img.dataobj
    assert nf.node_hash(make(img), method) == nf.node_hash(make(twin), method)


@pytest.mark.parametrize('method', METHODS)
def test_equal_content_in_another_process_hashes_the_same(method):
    seed = 102
    ours = {m.__name__: nf.node_hash(m(nf.random_image(seed=seed)), method) for m in MAKERS}
    proc = nf.run_python(
        """
        import json, sys
        import nipype_fixtures as nf
        import test_hashing as th
        seed, method = int(sys.argv[1]), sys.argv[2]
        print(json.dumps({m.__name__: nf.node_hash(m(nf.random_image(seed=seed)), method)
                          for m in th.MAKERS}))
        """,
        str(seed),
        method,
    )
    assert json.loads(proc.stdout.splitlines()[-1]) == ours


def _edit_voxel(img):
    img.dataobj[1, 2, 3] += 1


def _edit_header(img):
    img.header['descrip'] = b'another description'


def _edit_affine(img):
    img.affine[1, 3] += 0.25


def _edit_units(img):
    img.header.set_xyzt_units('micron', 'msec')


# Not set_data_dtype: float data under an integer dtype are stored exactly as floats,
# the very file the unedited image gives (a tool reads the same bytes)
EDITS = [_edit_voxel, _edit_header, _edit_affine, _edit_units]


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('edit', EDITS, ids=lambda e: e.__name__[6:])
@pytest.mark.parametrize('make', MAKERS, ids=IDS)
def test_any_change_changes_the_hash(make, edit, method):
    img = nf.random_image(seed=103)
    before = nf.node_hash(make(img), method)
    edit(img)
    assert nf.node_hash(make(img), method) != before


@pytest.mark.parametrize('make', MAKERS, ids=IDS)
def test_edit_of_a_clean_image_changes_the_hash(make, tmp_path):
    img = nt.load(nf.copy_anat(tmp_path))
    before = nf.node_hash(make(img))
    img.get_fdata()[10, 10, 10] += 1  # the cache now differs from the file
    assert nt.is_dirty(img)
    assert nf.node_hash(make(img)) != before


def test_hashfile_names_files_not_objects(tmp_path):
    img = nf.random_image(seed=104)
    wf = pe.Workflow('hashfile', base_dir=str(tmp_path))
    wf.add_nodes([scale_node(img), function_node(img)])
    wf.run()
    for name in ('scale', 'fsum'):
        (hashfile,) = (tmp_path / 'hashfile' / name).glob('_0x*.json')
        text = hashfile.read_text()
        assert 'object at 0x' not in text and 'Nifti1Image' not in text
        assert str(nf.store_root()) in text


# ---------------------------------------------------------------- edits between runs


def _edit_workflow(tmp_path: Path, img, counter: Path) -> pe.Workflow:
    wf = pe.Workflow('edits', base_dir=str(tmp_path))
    scale = pe.Node(Scale(in_file=img, counter=str(counter)), name='scale')
    fsum = pe.Node(
        Function(input_names=['img', 'counter'], output_names=['out'], function=nf.image_sum),
        name='fsum',
    )
    fsum.inputs.img = img
    fsum.inputs.counter = str(counter)
    wf.add_nodes([scale, fsum])
    return wf


def _outputs(tmp_path: Path) -> tuple[float, float]:
    scale = nf.loadpkl(tmp_path / 'edits' / 'scale' / 'result_scale.pklz')
    fsum = nf.loadpkl(tmp_path / 'edits' / 'fsum' / 'result_fsum.pklz')
    scaled = float(np.asanyarray(nib.load(scale.outputs.out_file).dataobj, 'f8').sum())
    return scaled, fsum.outputs.out


@pytest.mark.parametrize('kind', ['in_memory', 'loaded'])
def test_editing_in_place_reruns_the_nodes(tmp_path, kind):
    counter = tmp_path / 'runs'
    img = nf.random_image(seed=105) if kind == 'in_memory' else nt.load(nf.copy_anat(tmp_path))
    wf = _edit_workflow(tmp_path, img, counter)
    wf.run()
    assert nf.count_runs(counter) == 2
    first = _outputs(tmp_path)
    wf.run()
    assert nf.count_runs(counter) == 2  # cached
    if kind == 'in_memory':
        img.dataobj[0, 0, 0] += 100
    else:
        img.get_fdata()[0, 0, 0] += 100
    wf.run()
    assert nf.count_runs(counter) == 4  # both nodes reran: no stale result
    second = _outputs(tmp_path)
    assert second[0] == pytest.approx(first[0] + 200, abs=1e-3)  # Scale multiplies by 2
    assert second[1] == pytest.approx(first[1] + 100, abs=1e-3)


# ---------------------------------------------------------------- iterables


def test_iterable_label_is_content_based():
    a = nf.random_image(seed=106)
    b = nib.Nifti1Image(a.get_fdata(dtype='f4') + 1, a.affine, a.header)
    assert str(a) == str(b)  # what nipype would have named the folders after
    assert iterable_label(a) != iterable_label(b)
    twin = nib.Nifti1Image(a.get_fdata(dtype='f4'), a.affine.copy())
    assert iterable_label(twin) == iterable_label(a)
    assert iterable_label(nt.load(nf.ANAT)) == nf.ANAT
    label = iterable_label(a)
    assert label.startswith('image_') and len(label) == len('image_') + 16


def test_iterable_label_is_stable_across_processes():
    label = iterable_label(nf.random_image(seed=107))
    proc = nf.run_python(
        """
        import nipype_fixtures as nf
        from nipype_nibtrack import image_label as iterable_label
        print(iterable_label(nf.random_image(seed=107)))
        """
    )
    assert proc.stdout.split()[-1] == label


def test_iterables_over_images_get_distinct_stable_folders(tmp_path):
    a = nf.random_image(seed=108)
    b = nib.Nifti1Image(a.get_fdata(dtype='f4') * 2, a.affine, a.header)
    assert str(a) == str(b)
    counter = tmp_path / 'runs'

    def build():
        wf = pe.Workflow('iter', base_dir=str(tmp_path))
        node = pe.Node(Scale(counter=str(counter)), name='scale')
        node.iterables = ('in_file', [a, b, nt.load(nf.ANAT)])
        wf.add_nodes([node])
        return wf

    build().run()
    folders = sorted(p.name for p in (tmp_path / 'iter').iterdir() if p.name.startswith('_in'))
    assert len(folders) == 3 and nf.count_runs(counter) == 3
    assert f'_in_file_{iterable_label(a)}' in folders
    assert f'_in_file_{iterable_label(b)}' in folders
    assert not any('object' in f or 'Nifti1Image' in f for f in folders)
    build().run()  # fresh objects of the workflow, same images: same folders, cached
    again = sorted(p.name for p in (tmp_path / 'iter').iterdir() if p.name.startswith('_in'))
    assert again == folders and nf.count_runs(counter) == 3
    sums = sorted(
        float(np.asanyarray(nib.load(p).dataobj, 'f8').sum())
        for p in (tmp_path / 'iter').rglob('*_scaled.nii')
    )
    expected = sorted(
        float(2 * np.asanyarray(img.dataobj, 'f8').sum()) for img in (a, b, nib.load(nf.ANAT))
    )
    np.testing.assert_allclose(sums, expected, rtol=1e-5)


def test_provenance_records_images_as_their_files(tmp_path):
    # write_provenance: nipype's encoder failed on an image (its header is not JSON)
    wf = pe.Workflow('prov', base_dir=str(tmp_path))
    wf.config['execution']['write_provenance'] = 'true'
    img = nf.random_image(seed=901)
    node = pe.Node(
        Function(input_names=['img', 'counter'], output_names=['out'], function=nf.add_one),
        name='add_one',
    )
    node.inputs.img, node.inputs.counter = img, str(tmp_path / 'runs')
    wf.add_nodes([node])
    wf.run()
    stored = nt.as_filename(img)
    (provn,) = tmp_path.glob('workflow_provenance_*.provn')
    text = provn.read_text()
    assert stored in text
    returned = nf.loadpkl(tmp_path / 'prov' / 'add_one' / 'result_add_one.pklz').outputs.out
    assert returned.get_filename() in text
