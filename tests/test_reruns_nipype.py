"""Answers remembered per image and state (nipype_nibtrack.state) never go stale.

Every test makes sure the memo is in use (the files have settled, the same Resolution
object comes back) before it edits anything, so that it fails if a remembered answer
outlives the state it was computed for: in-place edits of the header, affine, data
cache or array between two workflow runs in one process and between two hashes of one
node, a file rewritten or replaced on disk with the same size and mtime, an id() reused
by a new image, copies and pickles of a remembered image.
"""

import copy
import gc
import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nipype.pipeline import engine as pe

import nipype_nibtrack as nt
from nipype_nibtrack.fileid import RACY_NS
from nipype_nibtrack.store import Store

sys.path.insert(0, os.path.dirname(__file__))
import nipype_fixtures as nf

Summary = nt.accept_images(nf.Summary)
FORMATS = ('.nii', '.nii.gz')


def settle() -> None:
    """Wait until every file written so far is past the racy window (memos key on it)."""
    time.sleep(RACY_NS / 1e9 + 0.05)


def write(path: Path, seed: int = 0) -> str:
    data = np.random.default_rng(seed).standard_normal((5, 6, 7)).astype('f4')
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1])), path)
    return str(path)


def remembered(img) -> nt.Resolution:
    """Resolve ``img`` until the memo hands out the very same answer (a store entry is
    remembered once it has settled)."""
    first = nt.resolve_memoised(img, formats=FORMATS)
    assert nt.image_state(img) is not None, 'the memo is not in use: the test would prove nothing'
    if nt.resolve_memoised(img, formats=FORMATS) is not first:
        settle()
        first = nt.resolve_memoised(img, formats=FORMATS)
    assert nt.resolve_memoised(img, formats=FORMATS) is first
    return first


def rewrite_in_place(path: str) -> None:
    """New voxels in the same file: same inode, size and mtime (ctime moves)."""
    st_before = os.stat(path)
    img = nib.load(path)
    data = np.asanyarray(img.dataobj) + 1
    raw = nib.Nifti1Image(data.astype('f4'), img.affine, img.header).to_bytes()
    assert len(raw) == st_before.st_size
    with open(path, 'r+b') as fobj:
        fobj.write(raw)
    os.utime(path, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    assert os.stat(path).st_size == st_before.st_size


@pytest.fixture
def settled(tmp_path: Path, store: Store) -> Path:
    """A folder of settled input files (and the test's own store, in use)."""
    folder = tmp_path / 'inputs'
    folder.mkdir()
    for i in range(3):
        write(folder / f'in{i}.nii', seed=i)
    settle()
    return folder


def run_summary(wf: pe.Workflow) -> dict:
    wf.run()
    result = nf.loadpkl(Path(wf.base_dir, wf.name, 'summary', 'result_summary.pklz'))
    return json.loads(result.outputs.summary)


def _edit_header(img):
    img.header['descrip'] = b'second edit'


def _edit_affine(img):
    img.affine[0, 3] += 5


def _edit_cache(img):
    img.get_fdata()[1, 2, 3] += 100


EDITS = {'header': _edit_header, 'affine': _edit_affine, 'data cache': _edit_cache}


@pytest.mark.parametrize('start', ['clean', 'dirty'])
@pytest.mark.parametrize('edit', list(EDITS))
def test_workflow_reruns_after_an_in_place_edit(settled, tmp_path, start, edit):
    img = nib.load(settled / 'in0.nii')
    if start == 'dirty':
        img.header['descrip'] = b'first edit'
    counter = tmp_path / 'runs'
    wf = pe.Workflow('wf', base_dir=str(tmp_path / 'work'))
    wf.add_nodes([pe.Node(Summary(in_file=img, counter=str(counter)), name='summary')])
    assert run_summary(wf) == json.loads(nf.summary_of(img))
    settle()  # the store entry of a dirty image too
    assert run_summary(wf) == json.loads(nf.summary_of(img))
    assert nf.count_runs(counter) == 1
    remembered(img)

    EDITS[edit](img)
    assert run_summary(wf) == json.loads(nf.summary_of(img))
    assert nf.count_runs(counter) == 2


def test_workflow_reruns_after_an_in_memory_array_is_edited(settled, tmp_path):
    data = np.asanyarray(nib.load(settled / 'in0.nii').dataobj).copy()
    img = nib.Nifti1Image(data, np.eye(4))
    counter = tmp_path / 'runs'
    wf = pe.Workflow('wf', base_dir=str(tmp_path / 'work'))
    wf.add_nodes([pe.Node(Summary(in_file=img, counter=str(counter)), name='summary')])
    run_summary(wf)
    settle()
    run_summary(wf)
    data[0, 0, 0] += 7  # in place: no trace on the image object
    assert run_summary(wf) == json.loads(nf.summary_of(img))
    assert nf.count_runs(counter) == 2


def test_workflow_reruns_after_the_file_is_rewritten_with_same_size_and_mtime(settled, tmp_path):
    path = str(settled / 'in1.nii')
    img = nib.load(path)
    img.header['descrip'] = b'edited'  # dirty: its voxels are read from the file
    counter = tmp_path / 'runs'
    wf = pe.Workflow('wf', base_dir=str(tmp_path / 'work'))
    wf.add_nodes([pe.Node(Summary(in_file=img, counter=str(counter)), name='summary')])
    first = run_summary(wf)
    settle()
    remembered(img)

    rewrite_in_place(path)
    again = run_summary(wf)
    assert again == json.loads(nf.summary_of(img)) != first
    assert nf.count_runs(counter) == 2


@pytest.mark.parametrize('start', ['clean', 'dirty'])
def test_a_replaced_file_is_never_served_from_the_memo(settled, tmp_path, start):
    path = str(settled / 'in2.nii')
    img = nib.load(path)
    if start == 'dirty':
        img.header['descrip'] = b'edited'
    first = remembered(img)

    other = tmp_path / 'other.nii'
    shutil.copy(settled / 'in1.nii', other)  # same size, other voxels
    st_before = os.stat(path)
    os.utime(other, ns=(st_before.st_atime_ns, st_before.st_mtime_ns))
    os.replace(other, path)
    # the image's voxels were in the replaced file: nothing can hand them out any more
    with pytest.raises(nt.ImageReadError):
        nt.resolve_memoised(img, formats=FORMATS)
    assert first.path  # (the answer given before the replacement)


@pytest.mark.parametrize('kind', ['deepcopy', 'pickle'])
def test_copies_and_pickles_start_without_answers(settled, kind):
    img = nib.load(settled / 'in0.nii')
    img.header['descrip'] = b'original'
    first = remembered(img)
    dup = copy.deepcopy(img) if kind == 'deepcopy' else pickle.loads(pickle.dumps(img))
    assert nt.resolve_memoised(dup, formats=FORMATS).path == first.path  # equal content

    dup.header['descrip'] = b'the copy, edited'
    edited = nt.resolve_memoised(dup, formats=FORMATS)
    assert edited.path != first.path
    assert nib.load(edited.path).header['descrip'] == b'the copy, edited'
    assert nt.resolve_memoised(img, formats=FORMATS) is first  # the original is untouched


def test_an_id_reused_by_a_new_image_gets_its_own_answer(settled):
    path = str(settled / 'in0.nii')
    donor = nib.load(path)
    img = nib.load(path)
    img.header['descrip'] = b'first image'
    first = remembered(img)
    old_id = id(img)
    del img
    gc.collect()
    blanks = []  # allocate bare images until one lands where the freed one was
    for _ in range(1_000_000):
        new = nib.Nifti1Image.__new__(nib.Nifti1Image)
        if id(new) == old_id:
            break
        blanks.append(new)
    else:
        pytest.skip('CPython never reused the freed id')
    del blanks
    header = donor.header.copy()
    header['descrip'] = b'second image'
    new.__init__(donor.dataobj, donor.affine, header, file_map=donor.file_map)
    assert nt.image_state(new) is not None
    got = nt.resolve_memoised(new, formats=FORMATS)
    assert got.path != first.path
    assert got.path == nt.resolve(new, formats=FORMATS).path
    assert nib.load(got.path).header['descrip'] == b'second image'


def test_a_damaged_or_removed_store_entry_is_looked_up_again(settled):
    img = nib.load(settled / 'in0.nii')
    img.header['descrip'] = b'stored'
    nt.resolve_memoised(img, formats=FORMATS)
    settle()  # the entry settles: it is remembered from now on
    first = remembered(img)
    want = nf.summary_of(img)

    Path(first.path).write_bytes(Path(first.path).read_bytes()[:-4] + b'\0\0\0\1')
    again = nt.resolve_memoised(img, formats=FORMATS)
    assert nf.summary_of(nib.load(again.path)).replace('stored', '') == want.replace('stored', '')

    os.unlink(again.path)
    third = nt.resolve_memoised(img, formats=FORMATS)
    assert os.path.exists(third.path)
    assert nf.summary_of(nib.load(third.path)) == want


def test_another_store_or_a_mark_gives_another_answer(settled, tmp_path):
    img = nib.load(settled / 'in0.nii')
    assert remembered(img).action == 'original'
    nt.mark_dirty(img)
    dirty = nt.resolve_memoised(img, formats=FORMATS)
    assert dirty.action == 'written'
    nt.set_store(Store(tmp_path / 'second-store'))
    moved = nt.resolve_memoised(img, formats=FORMATS)
    assert moved.path.startswith(str(tmp_path / 'second-store'))


def test_young_files_have_no_state(tmp_path):
    img = nib.load(write(tmp_path / 'young.nii'))
    assert nt.image_state(img) is None  # a same-size rewrite could hide in one clock tick


# ---------------------------------------------------------------- any edit sequence

EDIT_STEPS = st.one_of(
    st.tuples(st.just('descrip'), st.sampled_from([b'', b'one', b'two'])),
    st.tuples(st.just('shift'), st.sampled_from([0.0, 1.0, 2.5])),
    st.tuples(st.just('voxel'), st.sampled_from([0.0, 3.0, -1.0])),
    st.tuples(st.just('uncache'), st.none()),
)


def _apply(img, step) -> None:
    kind, value = step
    if kind == 'descrip':
        img.header['descrip'] = value
    elif kind == 'shift':
        img.affine[0, 3] = value
    elif kind == 'voxel':
        img.get_fdata()[0, 1, 2] = value
    else:
        img.uncache()  # drops an edited cache too: back to the file's voxels


@pytest.fixture(scope='module')
def shared_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp('edits')
    path = write(folder / 'source.nii', seed=5)
    previous = nt.chosen_store()
    nt.set_store(Store(folder / 'store'))
    settle()
    yield path
    nt.set_store(previous)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(EDIT_STEPS, min_size=1, max_size=6))
def test_any_edit_sequence_hashes_like_a_fresh_load(shared_inputs, steps):
    """After each in-place edit, the long-lived node's hash (memoised by nipype, and its
    images' resolutions by us) equals that of a new node given a freshly loaded image
    with the same edits."""
    img = nib.load(shared_inputs)
    node = pe.Node(Summary(in_file=img), name='summary')
    node.config = copy.deepcopy(nf.nipype_config._sections)
    node._get_hashval()
    for done in range(1, len(steps) + 1):
        _apply(img, steps[done - 1])
        fresh = nib.load(shared_inputs)
        for step in steps[:done]:
            _apply(fresh, step)
        assert node._get_hashval()[1] == nf.node_hash(pe.Node(Summary(in_file=fresh), name='s'))
        assert nt.resolve_memoised(img).path == nt.resolve(fresh).path


def test_an_image_edited_into_one_that_cannot_be_a_file_names_the_input(tmp_path, store):
    """Graph copies take the images their spec accepted unchecked: the hash checks."""
    img = nib.Nifti1Image(np.ones((3, 3, 3), 'f4'), np.eye(4))
    wf = pe.Workflow('wf', base_dir=str(tmp_path))
    wf.add_nodes([pe.Node(Summary(in_file=img), name='summary')])
    wf.config['execution']['crashdump_dir'] = str(tmp_path)  # not the current folder
    img._dataobj = nib.Nifti1Image.from_bytes(img.to_bytes()).dataobj  # now reads a BytesIO
    with pytest.raises(ValueError, match=r"'in_file' input of Summary .* in-memory file object"):
        wf.run()
