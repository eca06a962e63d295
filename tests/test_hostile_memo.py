"""Hostile tests of the remembered answers (nipype_nibtrack.state) and the layers above.

Each test first makes sure the memo is in use (settled files, the same answer handed out
twice), then changes something the memo must notice, and checks what a tool reading the
file handed out (or a real nipype node) sees against what the image holds.
"""

import contextlib
import gc
import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.spatialimages import HeaderDataError
from nipype.pipeline import engine as pe

import nipype_nibtrack as nt
from nipype_nibtrack import state
from nipype_nibtrack.fileid import RACY_NS
from nipype_nibtrack.store import Store

sys.path.insert(0, os.path.dirname(__file__))
import nipype_fixtures as nf

Summary = nt.accept_images(nf.Summary)
FORMATS = ('.nii', '.nii.gz')


def settle() -> None:
    time.sleep(RACY_NS / 1e9 + 0.05)


def write(path: Path | str, value: float) -> str:
    data = np.full((4, 5, 6), value, 'f4')
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1])), path)
    return str(path)


def remembered(img) -> nt.Resolution:
    first = nt.resolve_memoised(img, formats=FORMATS)
    assert nt.image_state(img) is not None, 'memo not in use: the test would prove nothing'
    if nt.resolve_memoised(img, formats=FORMATS) is not first:
        settle()  # a store entry just written is remembered once it has settled
        first = nt.resolve_memoised(img, formats=FORMATS)
    assert nt.resolve_memoised(img, formats=FORMATS) is first, 'memo not in use'
    return first


def run_summary(img, base: Path, plugin: str) -> dict:
    wf = pe.Workflow('wf', base_dir=str(base))
    wf.add_nodes([pe.Node(Summary(in_file=img), name='summary')])
    wf.run(plugin=plugin, plugin_args={'n_procs': 2} if plugin == 'MultiProc' else {})
    result = nf.loadpkl(Path(base, 'wf', 'summary', 'result_summary.pklz'))
    return json.loads(result.outputs.summary)


# -------------------------------------------- the memo vouches only for what it reads


@pytest.mark.parametrize('plugin', ['Linear', 'MultiProc'])
def test_a_clean_image_loaded_through_dotdot_is_never_handed_out_by_a_stale_name(
    tmp_path, store, plugin
):
    """Loaded as ``link/../x.nii``, the kernel path ``<target's parent>/x.nii`` is handed
    out while the state re-reads ``link/../x.nii``. Move the folder (the file keeps inode
    and ctime), re-point the link, put another file where the folder was: the state
    holds, the remembered name now holds other voxels. (The core's own verdict memo
    refuses such loads; the state memo on top of it did not.)"""
    root = Path(os.path.realpath(tmp_path))
    (root / 'a' / 'sub').mkdir(parents=True)
    write(root / 'a' / 'x.nii', 1.0)
    link = root / 'link'
    link.symlink_to(root / 'a' / 'sub')
    settle()
    img = nib.load(str(link / '..' / 'x.nii'))
    assert nt.image_state(img) is not None
    first = nt.resolve_memoised(img, formats=FORMATS)
    assert first.action == 'original'
    assert run_summary(img, root / 'work1', plugin) == json.loads(nf.summary_of(img))

    (root / 'a').rename(root / 'b')
    link.unlink()
    link.symlink_to(root / 'b' / 'sub')
    (root / 'a').mkdir()
    write(root / 'a' / 'x.nii', 7.0)  # other voxels where the handed-out name points

    handed = nt.resolve_memoised(img, formats=FORMATS).path
    assert np.array_equal(nib.load(handed).get_fdata(), np.asarray(img.dataobj))
    assert run_summary(img, root / 'work2', plugin) == json.loads(nf.summary_of(img))


# ------------------------------------------------ answers belong to the very object


class ContentEqualImage(nib.Nifti1Image):
    """An image class comparing by file name: two loads of one file are 'equal'."""

    def __eq__(self, other):
        return isinstance(other, ContentEqualImage) and self.get_filename() == other.get_filename()

    def __hash__(self):
        return hash(self.get_filename())


class ArrayEqualImage(nib.Nifti1Image):
    """``==`` answers element-wise, like numpy (a dict cannot take its truth)."""

    def __eq__(self, other):
        return np.asarray(self.affine) == np.asarray(other.affine)

    def __hash__(self):
        return hash(self.get_filename())


def test_equal_comparing_images_keep_their_own_answers(tmp_path, store):
    path = write(tmp_path / 'x.nii', 3.0)
    settle()
    one, two = ContentEqualImage.from_filename(path), ContentEqualImage.from_filename(path)
    assert one == two and one is not two
    one.header['descrip'] = b'one'
    first = remembered(one)
    two.header['descrip'] = b'two'
    second = remembered(two)
    assert nib.load(second.path).header['descrip'] == b'two'
    # two's answers did not go into one's table (nor replace one's answer)
    assert nt.resolve_memoised(one, formats=FORMATS) is first
    del one
    assert nt.resolve_memoised(two, formats=FORMATS) is second  # and did not die with one


def test_an_image_whose_eq_has_no_truth_value_is_resolved(tmp_path, store):
    path = write(tmp_path / 'x.nii', 3.0)
    settle()
    one, two = ArrayEqualImage.from_filename(path), ArrayEqualImage.from_filename(path)
    one.header['descrip'] = b'one'
    two.header['descrip'] = b'two'
    assert nt.resolve_memoised(one, formats=FORMATS).path == nt.resolve(one).path
    assert nt.resolve_memoised(two, formats=FORMATS).path == nt.resolve(two).path
    assert remembered(two).path != remembered(one).path


# ------------------------------------------------------------------ fork with the memo


def _resolve_in_child(img, out) -> None:
    out.put(nt.resolve_memoised(img, formats=FORMATS).path)


def test_a_forked_child_resolves_while_another_thread_held_the_memo_lock(tmp_path, store):
    """fork() copies a lock held by another thread as held: the child's memo deadlocked."""
    path = write(tmp_path / 'x.nii', 3.0)
    settle()
    img = nib.load(path)
    remembered(img)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with state._lock:
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    try:
        ctx = multiprocessing.get_context('fork')
        out = ctx.Queue()
        child = ctx.Process(target=_resolve_in_child, args=(img, out))
        child.start()
        child.join(20)
        alive = child.is_alive()
        if alive:
            child.kill()
        assert not alive, 'the forked child hung on the memo lock'
        assert out.get(timeout=5) == path
    finally:
        release.set()
        thread.join()


# ------------------------------------------------ answers outliving what decided them


class LaterRuled(nib.Nifti1Image):
    """A class whose cleanliness rule is registered after answers were remembered."""


def test_a_cleanliness_rule_registered_later_wins_over_remembered_answers(tmp_path, store):
    path = write(tmp_path / 'x.nii', 3.0)
    settle()
    img = LaterRuled.from_filename(path)
    assert remembered(img).action == 'original'
    assert nt.is_dirty_memoised(img) is False
    nt.check_image_memoised(img, FORMATS)

    nt.cleanliness_rule.register(LaterRuled, lambda img, record: 'this class is never clean')
    try:
        assert nt.is_dirty(img) and nt.is_dirty_memoised(img)
        handed = nt.resolve_memoised(img, formats=FORMATS)
        assert handed.action == 'written' and handed.path != path
        assert handed.reason == nt.resolve(img).reason == 'this class is never clean'
    finally:
        _unregister(LaterRuled)


def _unregister(klass) -> None:
    """Take ``klass``'s rule out of the package's registry again, so that no later test
    (or the registry's doctest in docs/api.rst) sees it: singledispatch has no public
    way, its registry is a read-only view of a dict."""
    (table,) = (d for d in gc.get_referents(nt.cleanliness_rule.registry) if isinstance(d, dict))
    del table[klass]
    nt.cleanliness_rule._clear_cache()


# ------------------------------------------- every part of the state read losslessly


def _swap_header_order(img) -> None:
    s = img.header._structarr  # the same bytes read in the other byte order: garbage
    img.header._structarr = s.view(s.dtype.newbyteorder())


def _swap_affine_order(img) -> None:
    a = img._affine  # the same bytes read in the other byte order
    img._affine = a.view(a.dtype.newbyteorder())


@pytest.mark.parametrize('edit', [_swap_header_order, _swap_affine_order])
def test_the_same_bytes_read_in_another_byte_order_are_another_state(tmp_path, store, edit):
    path = write(tmp_path / 'x.nii', 3.0)
    settle()
    img = nib.load(path)
    assert remembered(img).action == 'original'
    before = nt.image_state(img)
    edit(img)
    assert nt.is_dirty(img)
    assert not before.holds(img)
    try:
        handed = nt.resolve_memoised(img, formats=FORMATS)
    except (ValueError, TypeError, KeyError):
        return  # refused (a header read in the wrong order can be unreadable): not clean
    assert handed.action != 'original' and handed.path != path


# ------------------------------------------------- the two memo layers always agree

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope='module')
def settled_pair(tmp_path_factory) -> tuple[str, str]:
    """Two settled files of equal shape (other voxels), read-only for the tests."""
    folder = Path(os.path.realpath(tmp_path_factory.mktemp('settled')))
    paths = write(folder / 'a.nii', 1.0), write(folder / 'b.nii', 2.0)
    settle()
    return paths


def _ext_add(img, _):
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b'a comment'))


def _ext_drop(img, _):
    if img.header.extensions:
        img.header.extensions.pop()


def _other_proxy(img, paths):
    img._dataobj = nib.load(paths[1]).dataobj  # voxels of the other file, same shape


def _back_proxy(img, paths):
    img._dataobj = nib.load(paths[0]).dataobj  # a new proxy on the image's own file


def _second_store(img, paths):
    nt.set_store(Store(Path(paths[0]).parent.parent / 'second-store'))


EDIT_OPS = {
    'descrip': lambda img, _: img.header.__setitem__('descrip', b'edited'),
    'descrip back': lambda img, _: img.header.__setitem__('descrip', b''),
    'structarr view write': lambda img, _: img.header.structarr['pixdim'].__setitem__((0, 1), 3.0),
    'set_zooms': lambda img, _: img.header.set_zooms((2.0, 2.0, 2.5)),
    'header byte order': lambda img, _: _swap_header_order(img),
    'header swapped': lambda img, _: setattr(img, '_header', img.header.copy()),
    'affine in place': lambda img, _: img.affine.__setitem__((0, 3), img.affine[0, 3] + 1),
    'affine byte order': lambda img, _: _swap_affine_order(img),
    'extension added': _ext_add,
    'extension removed': _ext_drop,
    'dtype alias': lambda img, _: img.set_data_dtype('compat'),
    'other proxy': _other_proxy,
    'new proxy, own file': _back_proxy,
    'file_map names the other file': lambda img, paths: setattr(
        img.file_map['image'], 'filename', paths[1]
    ),
    'file_map back': lambda img, paths: setattr(img.file_map['image'], 'filename', paths[0]),
    'cache filled and edited': lambda img, _: img.get_fdata().__setitem__((0, 0, 0), 9.0),
    'uncache': lambda img, _: img.uncache(),
    'mark_dirty': lambda img, _: nt.mark_dirty(img),
    'second store': _second_store,
    'default store': lambda img, paths: nt.set_store(Store(Path(paths[0]).parent / 'store')),
}


def _full(img):
    try:
        return nt.resolve(img, formats=FORMATS).path
    except (ValueError, TypeError, KeyError) as err:
        return type(err)


def _memo(img):
    try:
        return nt.resolve_memoised(img, formats=FORMATS).path
    except (ValueError, TypeError, KeyError) as err:
        return type(err)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.lists(st.sampled_from(sorted(EDIT_OPS)), max_size=3), max_size=5))
def test_the_state_memo_agrees_with_a_full_resolve_after_any_edits(settled_pair, groups):
    nt.set_store(Store(Path(settled_pair[0]).parent / 'store'))
    try:
        img = nib.load(settled_pair[0])
        assert _memo(img) == _memo(img) == _full(img) == settled_pair[0]
        for group in groups:
            for name in group:
                # an edit nibabel refuses (e.g. on a header read in the wrong order)
                with contextlib.suppress(
                    ValueError, TypeError, KeyError, IndexError, HeaderDataError
                ):
                    EDIT_OPS[name](img, settled_pair)
            # twice: the second answer is the remembered one when the state allows
            assert _memo(img) == _memo(img) == _full(img), group
    finally:
        nt.set_store(None)


# ------------------------------------------------------- threads editing meanwhile


@contextlib.contextmanager
def _flipping_descrip(img, edited: bytes, restored: bytes, pause: float):
    """Another thread sets the header's descrip to ``edited`` then back to ``restored``,
    over and over (``pause`` seconds after each), until the block ends."""
    stop = threading.Event()

    def flip() -> None:
        header = img.header
        while not stop.is_set():
            header['descrip'] = edited
            time.sleep(pause)
            header['descrip'] = restored
            time.sleep(pause)

    thread = threading.Thread(target=flip)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def test_an_answer_computed_while_another_thread_edits_and_restores_is_not_kept(tmp_path):
    """Thread T flips descrip A -> B -> A while the main thread resolves: an answer
    computed on B with the state A before and after was kept for A, and served after
    the edits had stopped (a store file with B's header for an image holding A)."""
    store = Store(tmp_path / 'store')
    path = str(tmp_path / 'x.nii')
    data = np.random.default_rng(0).random((40, 40, 40)).astype('f4')
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    img = nib.load(path)
    for label in (b'B', b'A'):  # both store entries exist and settle
        img.header['descrip'] = label
        nt.resolve(img, store=store)
    settle()
    single = nt.resolve_memoised(img, store=store)
    assert nt.resolve_memoised(img, store=store) is single  # memo in use, one thread

    for _ in range(8):
        with _flipping_descrip(img, b'B', b'A', pause=1e-4):
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                with contextlib.suppress(ValueError, TypeError):
                    nt.resolve_memoised(img, store=store)
        for label in (b'A', b'B'):  # quiet now: what is handed out holds the image
            img.header['descrip'] = label
            handed = nt.resolve_memoised(img, store=store)
            assert nib.load(handed.path).header['descrip'] == label
            assert handed.path == nt.resolve(img, store=store).path


def test_a_clean_verdict_checked_while_another_thread_edits_and_restores_is_not_kept(tmp_path):
    """The core's own verdict memo (rules.cleanliness) had the same A -> B -> A hole:
    a 'clean' verdict computed while the header was back at the file's value was filed
    under the edited header, and the edited image then resolved to its own file."""
    path = str(tmp_path / 'x.nii')
    data = np.random.default_rng(0).random((20, 20, 20)).astype('f4')
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    settle()
    img = nib.load(path)
    assert not nt.is_dirty(img)
    for _ in range(8):
        with _flipping_descrip(img, b'edited', b'', pause=1e-5):  # b'': the file's value
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                nt.is_dirty(img)
        img.header['descrip'] = b'edited'
        assert nt.is_dirty(img)
        assert nt.resolve(img, store=Store(tmp_path / 'store')).path != path
        img.header['descrip'] = b''
        assert not nt.is_dirty(img)
