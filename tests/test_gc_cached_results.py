"""`nibtrack store gc` deleting a store file that a cached result refers to (nipype).

gc removes entries unused for a while, including one a cached node's inputs or outputs
name. What must follow is a rerun or a cache hit on equal content, never a wrong result
and never a crash. The pydra side is in ``test_pydra.py`` (``test_gc_*``).
"""

from __future__ import annotations

import os
import sys

import pytest
from nipype.interfaces.utility import Function
from nipype.pipeline import engine as pe

import nipype_nibtrack as nt

sys.path.insert(0, os.path.dirname(__file__))
import nipype_fixtures as nf

Scale = nt.accept_images(nf.Scale)


def _workflow(base, img, counter) -> pe.Workflow:
    """add_one (Function: dirty image in, image out) -> scale (image-aware) -> total."""
    wf = pe.Workflow('wf', base_dir=str(base))
    add_one = pe.Node(
        Function(input_names=['img', 'counter'], output_names=['out'], function=nf.add_one),
        name='add_one',
    )
    add_one.inputs.img, add_one.inputs.counter = img, str(counter)
    scale = pe.Node(Scale(counter=str(counter)), name='scale')
    total = pe.Node(
        Function(input_names=['img', 'counter'], output_names=['out'], function=nf.image_sum),
        name='total',
    )
    total.inputs.counter = str(counter)
    wf.connect([(add_one, scale, [('out', 'in_file')]), (scale, total, [('out_file', 'img')])])
    return wf


def _total(base) -> float:
    return nf.loadpkl(base / 'wf' / 'total' / 'result_total.pklz').outputs.out


@pytest.mark.parametrize(
    ('hash_method', 'reruns'),
    [
        # the input's store file is written again with a new mtime: all three rerun
        ('timestamp', {'add_one': 1, 'scale': 1, 'image_sum': 1}),
        # same content, same hash; add_one's cached output names a deleted file, so it
        # reruns and writes it again; scale then hashes equal content: cached
        ('content', {'add_one': 1, 'scale': 0, 'image_sum': 0}),
    ],
)
def test_nipype_cached_workflow_after_gc_of_its_dirty_input_and_outputs(
    tmp_path, monkeypatch, hash_method, reruns
):
    monkeypatch.setenv('NIBTRACK_STORE', str(tmp_path / 'store'))
    store = nt.get_store()
    counter = tmp_path / 'runs'
    img = nf.random_image(seed=7100)
    expected = float(2 * (img.get_fdata(dtype='f4') + 1).sum(dtype='f8'))
    wf = _workflow(tmp_path, img, counter)
    wf.config['execution']['hash_method'] = hash_method
    wf.run()
    assert _total(tmp_path) == pytest.approx(expected, rel=1e-5)
    assert nf.count_runs(counter) == 3

    # every entry goes: the dirty input and add_one's returned image
    report = store.gc(max_bytes=0, keep_recent_seconds=0)
    assert report.removed == 2
    wf.run()
    assert _total(tmp_path) == pytest.approx(expected, rel=1e-5)
    assert {tag: nf.count_runs(counter, tag) - 1 for tag in reruns} == reruns
