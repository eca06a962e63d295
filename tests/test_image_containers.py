"""Images inside every container nipype passes around: sets, frozensets, ``Bunch``.

nipype's hash and our pickling and binding walks knew lists, tuples and dicts: an image
in any other container hashed as its address (an edit kept the hash: a stale cached
result) and pickled whole. One walker (``nipype_nibtrack.nipype.traits.map_images``)
now serves them all, and the hash walks what nipype does not.
"""

import os
import pickle
import sys

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces.base import Bunch
from nipype.pipeline import engine as pe

import nipype_nibtrack as nt
from nipype_nibtrack.nipype.pickling import ImageReference, references
from nipype_nibtrack.nipype.traits import contains_image, iter_images, map_images

sys.path.insert(0, os.path.dirname(__file__))
import nipype_fixtures as nf

WRAPS = {
    'set': lambda img: {img},
    'frozenset': lambda img: frozenset([img]),
    'Bunch': lambda img: Bunch(img=img, onsets=[1, 2]),
    'list of sets': lambda img: [{img}],
}


def container_total(x):
    """Sum of the voxels of every image in ``x`` (run by a Function node)."""
    from nipype.interfaces.base import Bunch

    def images(value):
        if isinstance(value, Bunch):
            value = list(value.__dict__.values())
        if isinstance(value, (list, tuple, set, frozenset)):
            return [img for item in value for img in images(item)]
        return [value] if hasattr(value, 'dataobj') else []

    return float(sum(img.get_fdata().sum() for img in images(x)))


def _total_node(value, base_dir):
    return nf.function_node(container_total, value, base_dir, 'total')


@pytest.mark.parametrize('kind', list(WRAPS))
def test_the_walker_reaches_images_in(kind):
    img = nf.random_image((2, 2, 2), seed=70)
    value = WRAPS[kind](img)
    assert [found is img for found in iter_images(value)] == [True]
    mapped = map_images(value, lambda found: 'path')
    assert not contains_image(mapped) and type(mapped) is type(value)


@pytest.mark.parametrize('kind', list(WRAPS))
def test_an_edit_of_an_image_in_a_function_input_reruns_the_node(kind, tmp_path):
    # the hash named the image's address: an edit kept it, and the cache served the
    # result computed before the edit
    img = nib.Nifti1Image(np.zeros((3, 3, 3), 'f4'), np.eye(4))
    value = WRAPS[kind](img)
    assert _total_node(value, tmp_path).run().outputs.total == 0
    img.get_fdata()[1, 1, 1] = 5
    assert _total_node(value, tmp_path).run().outputs.total == 5
    # a new container of the same image is the same node (cached), other content is not
    other = nib.Nifti1Image(np.ones((3, 3, 3), 'f4'), np.eye(4))
    hashes = [nf.node_hash(_total_node(WRAPS[kind](i), tmp_path)) for i in (img, img, other)]
    assert hashes[0] == hashes[1] != hashes[2]


@pytest.mark.parametrize('kind', list(WRAPS))
def test_images_in_any_container_pickle_as_references(kind):
    img = nf.random_image((16, 16, 16), seed=71)
    value = references(WRAPS[kind](img))
    assert not contains_image(value)
    assert img.dataobj.nbytes > len(pickle.dumps(value))
    (ref,) = [r for r in _leaves(value) if isinstance(r, ImageReference)]
    assert np.array_equal(nib.load(ref.path).get_fdata(), img.get_fdata())


def _leaves(value):
    if isinstance(value, Bunch):
        value = list(value.__dict__.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


@pytest.mark.parametrize('kind', list(WRAPS))
def test_a_relative_image_in_any_container_reads_its_own_file_in_the_node(
    kind, tmp_path, monkeypatch
):
    # Function nodes run inside their node folder, where a relative name names another
    # file (or none); the graph copy binds the image (the core's copies did already)
    monkeypatch.chdir(tmp_path)
    nib.save(nib.Nifti1Image(np.full((3, 3, 3), 2, 'f4'), np.eye(4)), 'in.nii')
    img = nib.load('in.nii')
    wf = pe.Workflow('wf', base_dir=str(tmp_path / 'work'))
    node = _total_node(WRAPS[kind](img), tmp_path)
    wf.add_nodes([node])
    (done,) = wf.run().nodes()
    assert done.result.outputs.total == 2 * 27
    assert nt.is_dirty(img) is False
