"""Hostile tests of the engine front-ends, used as a nipype or pydra user would use them.

Each test compares the drop-in class with nipype's own on the same path-only calls, or
checks that an image behaves as its file would, through real workflows and real tools
(``mrconvert``) where they run here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces import fsl, mrtrix3
from nipype.pipeline import engine as pe
from nipype.utils.filemanip import loadpkl, savepkl

import nipype_nibtrack as nt
from nipype_nibtrack.interfaces import fsl as nt_fsl
from nipype_nibtrack.interfaces import mrtrix3 as nt_mrtrix3
from tests import nipype_fixtures as nf


@pytest.fixture(autouse=True)
def _fsl_output_type(monkeypatch):
    monkeypatch.setenv('FSLOUTPUTTYPE', 'NIFTI_GZ')


def _voxels(path: str) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


# ---------------------------------------------------------------- interface methods


def test_list_outputs_called_directly_names_outputs_as_for_the_path(tmp_path, monkeypatch):
    # nipype users call _list_outputs() to learn output names before running; nipype's
    # code there takes the inputs for paths (split_filename of an image: TypeError)
    monkeypatch.chdir(tmp_path)
    path = nf.copy_anat(tmp_path)
    img = nt.load(path)
    wrapped = nt_fsl.BET(in_file=img, mask=True)
    original = fsl.BET(in_file=path, mask=True)
    assert wrapped._list_outputs() == original._list_outputs()
    assert wrapped.aggregate_outputs().get() == original.aggregate_outputs().get()
    maths = nt_fsl.ImageMaths(in_file=img, op_string='-add 1')
    assert maths._gen_filename('out_file') == fsl.ImageMaths(
        in_file=path, op_string='-add 1'
    )._gen_filename('out_file')
    # the image is given back afterwards, unchanged
    assert wrapped.inputs.in_file is img and not nt.is_dirty(img)
    # a dirty image: names come from its store file, which holds its content
    dirty = nib.Nifti1Image(_voxels(path) + 1, img.affine)
    out = nt_fsl.BET(in_file=dirty)._list_outputs()['out_file']
    assert out == str(tmp_path / 'image_brain.nii.gz')


# ---------------------------------------------------------------- hashing in nodes


@pytest.mark.parametrize('hash_method', ['timestamp', 'content'])
def test_a_clean_image_hashes_like_its_path_and_like_nipypes_class(tmp_path, hash_method):
    path = nf.copy_anat(tmp_path)
    nodes = [
        pe.Node(klass(in_file=value, frac=0.3), name='bet')
        for klass, value in [
            (nt_fsl.BET, nt.load(path)),
            (nt_fsl.BET, path),
            (fsl.BET, path),
        ]
    ]
    hashes = {nf.node_hash(n, hash_method) for n in nodes}
    assert len(hashes) == 1
    # a list input holding a clean image and a path, against the original with paths
    merge = [
        pe.Node(klass(in_files=files, dimension='t'), name='merge')
        for klass, files in [(nt_fsl.Merge, [nt.load(path), path]), (fsl.Merge, [path, path])]
    ]
    assert nf.node_hash(merge[0], hash_method) == nf.node_hash(merge[1], hash_method)


def test_a_one_voxel_change_reruns_a_cached_node_and_an_unchanged_one_does_not(tmp_path):
    nf.require_tool('mrconvert')
    path = nf.copy_anat(tmp_path)

    def run(img):
        wf = pe.Workflow('wf', base_dir=str(tmp_path / 'work'))
        node = pe.Node(
            nt_mrtrix3.MRConvert(in_file=img, out_file='out.nii', args='-quiet'), name='conv'
        )
        wf.add_nodes([node])
        wf.config['execution']['hash_method'] = 'content'
        (done,) = wf.run().nodes()
        out = done.result.outputs.out_file
        return out, os.stat(out).st_mtime_ns, _voxels(out)

    _, first, voxels = run(nt.load(path))
    assert np.array_equal(voxels, _voxels(path))
    assert run(nt.load(path))[1] == first  # cached: not written again
    edited = nt.load(path)
    edited.get_fdata()[3, 4, 5] += 1
    _, again, voxels = run(edited)
    assert again != first
    assert voxels[3, 4, 5] == _voxels(path)[3, 4, 5] + 1


def test_the_same_node_run_again_after_an_image_edit_gets_the_edit(tmp_path):
    # hashing left the store file name of the first state in the user's own node, and
    # nipype keeps a node's first hash: the second run was served the first content
    nf.require_tool('mrconvert')
    img = nib.Nifti1Image(np.zeros((4, 5, 6), 'f4'), np.eye(4))
    node = pe.Node(
        nt_mrtrix3.MRConvert(in_file=img, out_file='o.nii', args='-quiet'),
        name='conv',
        base_dir=str(tmp_path / 'work'),
    )
    assert _voxels(node.run().outputs.out_file).sum() == 0
    img.get_fdata()[1, 1, 1] = 5
    assert _voxels(node.run().outputs.out_file).sum() == 5
    img.get_fdata()[1, 1, 2] = 7  # the node's interface, run and formatted directly
    assert _voxels(node.interface.cmdline.split()[2]).sum() == 12
    result = node.interface.run(cwd=str(tmp_path))
    assert _voxels(result.outputs.out_file).sum() == 12
    first = node.run()  # unchanged since: the node's cached result is used
    assert node.run().outputs.out_file == first.outputs.out_file
    assert _voxels(first.outputs.out_file).sum() == 12


def _image_total(img):
    return float(img.get_fdata().sum())


def test_a_mapnode_or_function_node_run_again_after_an_image_edit_gets_the_edit(tmp_path):
    # the same class: MapNode keeps its own memoised hash, a Function node nipype's
    from nipype.interfaces.utility import Function

    nf.require_tool('mrconvert')
    img = nib.Nifti1Image(np.zeros((4, 5, 6), 'f4'), np.eye(4))
    mapped = pe.MapNode(
        nt_mrtrix3.MRConvert(out_file='o.nii', args='-quiet'),
        iterfield=['in_file'],
        name='map',
        base_dir=str(tmp_path),
    )
    mapped.inputs.in_file = [img, img]
    func = pe.Node(
        Function(input_names=['img'], output_names=['total'], function=_image_total),
        name='func',
        base_dir=str(tmp_path),
    )
    func.inputs.img = img

    def totals():
        outs = mapped.run().outputs.out_file
        return [float(_voxels(o).sum()) for o in outs], func.run().outputs.total

    assert totals() == ([0.0, 0.0], 0.0)
    img.get_fdata()[1, 1, 1] = 5
    assert totals() == ([5.0, 5.0], 5.0)


def test_a_copyfile_node_run_again_after_an_edit_copies_the_edit(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), 'f4'), np.eye(4))
    node = pe.Node(
        nt.accept_images(nf.CopiedVoxelSum)(in_file=img), name='s', base_dir=str(tmp_path)
    )
    assert node.run().outputs.total == 0
    assert node.interface._seen == str(tmp_path / 's' / 'image.nii')  # nipype's copy
    assert node.run().outputs.total == 0  # unchanged: cached
    img.get_fdata()[1, 1, 1] = 5
    assert node.run().outputs.total == 5
    assert node.interface._seen == str(tmp_path / 's' / 'image.nii')


# ---------------------------------------------------------------- workflows with images


@pytest.mark.parametrize('context', ['fork', 'spawn'])
def test_mapnode_iterfield_and_iterables_of_images_under_multiproc(tmp_path, context):
    nf.require_tool('mrconvert')
    images = [nf.random_image(seed=40 + i) for i in range(3)]
    wf = pe.Workflow('wf', base_dir=str(tmp_path))
    mapped = pe.MapNode(
        nt_mrtrix3.MRConvert(out_file='o.nii', args='-quiet'), iterfield=['in_file'], name='map'
    )
    mapped.inputs.in_file = images
    iterated = pe.Node(nt_mrtrix3.MRConvert(out_file='o.nii', args='-quiet'), name='iter')
    iterated.iterables = ('in_file', images)
    wf.add_nodes([mapped, iterated])
    graph = wf.run(plugin='MultiProc', plugin_args={'n_procs': 2, 'mp_context': context})
    expected = sorted(np.asarray(img.dataobj).sum(dtype='f8') for img in images)
    seen = {'map': [], 'iter': []}
    for node in graph.nodes():
        outs = node.result.outputs.out_file
        for out in outs if isinstance(outs, list) else [outs]:
            seen[node.name].append(_voxels(out).sum(dtype='f8'))
    for sums in seen.values():
        np.testing.assert_allclose(sorted(sums), expected, rtol=1e-6)
    # iterable folders are named after content, one per image
    assert len(list(tmp_path.glob('wf/_in_file_image_*'))) == 3


def test_export_writes_file_names_for_images_and_the_script_runs(tmp_path):
    # nipype wrote str(img) (a header dump) as the value: the script was not Python
    nf.require_tool('mrconvert')
    path = nf.copy_anat(tmp_path)
    dirty = nib.Nifti1Image(_voxels(path) * 2, nib.load(path).affine)
    wf = pe.Workflow('wf', base_dir=str(tmp_path / 'work'))
    clean_node = pe.Node(
        nt_mrtrix3.MRConvert(in_file=nt.load(path), out_file='c.nii', args='-quiet'), name='c'
    )
    dirty_node = pe.Node(
        nt_mrtrix3.MRConvert(in_file=dirty, out_file='d.nii', args='-quiet'), name='d'
    )
    mapped = pe.MapNode(
        nt_mrtrix3.MRConvert(out_file='m.nii', args='-quiet'), iterfield=['in_file'], name='m'
    )
    mapped.inputs.in_file = [nt.load(path), dirty]
    wf.add_nodes([clean_node, dirty_node, mapped])
    script = tmp_path / 'exported.py'
    wf.export(str(script))
    text = script.read_text()
    assert f"wf_c.inputs.in_file = '{path}'" in text
    assert 'Nifti1Image' not in text and 'affine' not in text
    # the workflow still holds its images
    assert clean_node.inputs.in_file is not None and nt.is_dirty(dirty_node.inputs.in_file)
    out = tmp_path / 'ran'
    out.mkdir()
    # nipype's export writes connections only: unconnected nodes are added by hand
    code = text + f'\nwf.add_nodes([wf_c, wf_d, wf_m])\nwf.base_dir = {str(out)!r}\nwf.run()\n'
    subprocess.run(
        [sys.executable, '-c', code], check=True, env=nf.subprocess_env(), capture_output=True
    )
    (c_out,) = out.glob('**/c.nii')
    (d_out,) = out.glob('**/d.nii')
    assert np.array_equal(_voxels(str(c_out)), _voxels(path))
    np.testing.assert_allclose(_voxels(str(d_out)), dirty.get_fdata(), rtol=1e-6)
    assert len(list(out.glob('**/mapflow/_*/m.nii'))) == 2


def test_write_graph_labels_match_nipypes_classes(tmp_path):
    path = nf.copy_anat(tmp_path)
    dots = []
    for name, klass, value in [
        ('ours', nt_fsl.BET, nt.load(path)),
        ('theirs', fsl.BET, path),
    ]:
        wf = pe.Workflow('wf', base_dir=str(tmp_path / name))
        wf.add_nodes([pe.Node(klass(in_file=value), name='bet')])
        wf.write_graph(graph2use='exec', format='dot', simple_form=False)
        dots.append((tmp_path / name / 'wf' / 'graph_detailed.dot').read_text())
    assert dots[0] == dots[1]


def test_a_node_pickled_to_a_pklz_runs_in_a_fresh_interpreter(tmp_path):
    nf.require_tool('mrconvert')
    dirty = nf.random_image(seed=77)
    node = pe.Node(
        nt_mrtrix3.MRConvert(in_file=dirty, out_file='o.nii', args='-quiet'),
        name='conv',
        base_dir=str(tmp_path / 'work'),
    )
    savepkl(str(tmp_path / 'node.pklz'), node)
    assert (tmp_path / 'node.pklz').stat().st_size < 20_000  # a reference, not voxels
    proc = nf.run_python(
        """
        import sys
        from nipype.utils.filemanip import loadpkl
        node = loadpkl(sys.argv[1])
        out = node.run().outputs.out_file
        print('RESULT', type(node.interface).__module__, out)
        """,
        str(tmp_path / 'node.pklz'),
    )
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith('RESULT')]
    module, out = line.split()[1:]
    assert module == 'nipype_nibtrack.interfaces.mrtrix3.utils'
    np.testing.assert_allclose(_voxels(out), dirty.get_fdata(), rtol=1e-6)
    assert nt.is_dirty(node.inputs.in_file)  # the caller's node keeps its image
    assert type(loadpkl(str(tmp_path / 'node.pklz')).inputs.in_file).__name__ == 'Nifti1Image'


def test_a_crash_file_of_an_image_node_opens_with_nipypecli_crash(tmp_path):
    dirty = nf.random_image(seed=5)
    crashfile = nf.crash_file(pe.Node(nt_fsl.BET(in_file=dirty), name='bet'), tmp_path)
    cli = Path(sys.executable).with_name('nipypecli')
    proc = subprocess.run(
        [str(cli), 'crash', str(crashfile)],
        env=nf.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert 'Traceback' in proc.stdout and 'bet' in proc.stdout


def test_mrconvert_on_an_mgh_image_through_nipype_and_a_format_it_does_not_read(tmp_path):
    # fsl reads no MGH: the same image goes to FLIRT as NIfTI, to mrconvert as it is
    nf.require_tool('mrconvert')
    mgh = nt.load(nf.MGZ)
    flirt = nt_fsl.FLIRT(in_file=mgh, reference=mgh).cmdline.split()
    assert flirt[2].endswith('.nii') and flirt[2] != nf.MGZ
    np.testing.assert_allclose(_voxels(flirt[2]), mgh.get_fdata(), rtol=1e-6)
    result = nt_mrtrix3.MRConvert(in_file=mgh, out_file='o.nii', args='-quiet').run(
        cwd=str(tmp_path)
    )
    assert result.inputs['in_file'] == nf.MGZ
    assert result.outputs.out_file == str(tmp_path / 'o.nii')
    assert mrtrix3.MRConvert(in_file=nf.MGZ, out_file='o.nii').cmdline.split()[1] == nf.MGZ


# ---------------------------------------------------------------- pydra

pydra_mrtrix3 = pytest.importorskip('pydra.tasks.mrtrix3.v3_1')


def test_pydra_task_hash_of_a_clean_image_equals_its_absolute_and_relative_path(
    tmp_path, monkeypatch
):
    from pydra.utils.hash import hash_function

    monkeypatch.chdir(tmp_path)
    path = nf.copy_anat(tmp_path)
    tasks = [
        pydra_mrtrix3.MrConvert(in_file=value, out_file='o.nii')
        for value in (nt.load(path), path, 'anatomical.nii', nt.load('anatomical.nii'))
    ]
    assert len({hash_function(t) for t in tasks}) == 1
    assert len({t.cmdline for t in tasks}) == 1
    edited = nt.load(path)
    edited.get_fdata()[1, 2, 3] += 1
    assert hash_function(pydra_mrtrix3.MrConvert(in_file=edited, out_file='o.nii')) != (
        hash_function(tasks[0])
    )


def test_pydra_list_field_of_clean_and_dirty_images_through_mrmath_on_cf(tmp_path):
    nf.require_tool('mrmath')
    path = nf.copy_anat(tmp_path)
    clean = nt.load(path)
    dirty = nt.load(path)
    dirty.get_fdata()[5, 6, 7] += 10
    task = pydra_mrtrix3.MrMath(in_file=[clean, dirty], operation='mean', out_file='mean.nii')
    assert task.cmdline.split()[1] == path
    result = task(cache_root=tmp_path / 'cache', worker='cf')
    mean = np.asarray(nib.load(str(result.out_file)).dataobj, dtype='f8')
    expected = (clean.get_fdata() + dirty.get_fdata()) / 2
    np.testing.assert_allclose(mean, expected, rtol=1e-6)
    assert not nt.is_dirty(clean) and nt.is_dirty(dirty)  # the caller's images untouched


def test_pydra_cf_worker_with_spawned_processes(tmp_path):
    # a spawned worker imports nothing of the parent: the hooks must come with the job
    nf.require_tool('mrconvert')
    proc = nf.run_python(
        """
        import multiprocessing, sys
        import numpy as np, nibabel as nib
        import nipype_nibtrack.pydra
        from pydra.tasks.mrtrix3.v3_1 import MrConvert
        import pydra_tasks

        if __name__ == '__main__':
            multiprocessing.set_start_method('spawn', force=True)
            data = np.arange(4 * 5 * 6, dtype='f4').reshape(4, 5, 6)
            img = nib.Nifti1Image(data, np.eye(4))
            total = pydra_tasks.VoxelSum(img=img)(cache_root=sys.argv[1], worker='cf').out
            out = MrConvert(in_file=img, out_file='o.nii')(cache_root=sys.argv[1], worker='cf')
            back = np.asarray(nib.load(str(out.out_file)).dataobj)
            print('RESULT', total, float(data.sum()), bool(np.array_equal(back, data)))
        """,
        str(tmp_path / 'cache'),
    )
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith('RESULT')]
    total, expected, same = line.split()[1:]
    assert float(total) == float(expected) and same == 'True'
