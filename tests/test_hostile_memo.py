"""Hostile tests of the remembered answers (nipype_nibtrack.state) and the layers above.

Each test first makes sure the memo is in use (settled files, the same answer handed out
twice), then changes something the memo must notice, and checks what a tool reading the
file handed out (or a real nipype node) sees against what the image holds.
"""

import contextlib
import gc
import json
import mmap
import multiprocessing
import os
import sys
import threading
import time
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.spatialimages import HeaderDataError
from nipype.pipeline import engine as pe

import nipype_nibtrack as nt
from nipype_nibtrack import state
from nipype_nibtrack.fileid import RACY_NS
from nipype_nibtrack.provenance import record_of
from nipype_nibtrack.recheck import still_clean
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


class UserJudged(nib.Nifti1Image):
    """A class whose user rule looks the very object up in a table of its own."""


def test_a_user_rule_looking_the_object_up_is_given_the_object_itself(tmp_path, store):
    """Answers are computed on a private copy of the image; a user's rule keyed by the
    object (here: a set of images the user declared edited) must still see the image,
    not a copy it does not know: else the memo would remember 'clean' for it."""
    path = write(tmp_path / 'x.nii', 3.0)
    settle()
    edited = weakref.WeakSet()
    nt.cleanliness_rule.register(
        UserJudged, lambda img, record: 'declared edited' if img in edited else None
    )
    try:
        img = UserJudged.from_filename(path)
        edited.add(img)
        for _ in range(2):  # the second answers are the remembered ones, if any
            assert nt.is_dirty(img) and nt.is_dirty_memoised(img)
            handed = nt.resolve_memoised(img, formats=FORMATS)
            assert handed.action in ('written', 'reused') and handed.reason == 'declared edited'
            nt.check_image_memoised(img, FORMATS)
        edited.discard(img)
        assert not nt.is_dirty_memoised(img)
        assert nt.resolve_memoised(img, formats=FORMATS).path == path
    finally:
        _unregister(UserJudged)


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
def _racing(step, switch_interval: float | None = 1e-6):
    """Another thread calls ``step()`` over and over until the block ends, threads
    switching every ``switch_interval`` seconds (as often as the interpreter can by
    default; None: the interpreter's own interval)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            step()

    thread = threading.Thread(target=run)
    interval = sys.getswitchinterval()
    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)


def _flipping_descrip(img, edited: bytes, restored: bytes, pause: float):
    """Another thread sets the header's descrip to ``edited`` then back to ``restored``,
    over and over (``pause`` seconds after each), until the block ends."""
    header = img.header

    def flip() -> None:
        header['descrip'] = edited
        time.sleep(pause)
        header['descrip'] = restored
        time.sleep(pause)

    return _racing(flip, switch_interval=None)


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


# ------------------------------------------- memos kept whatever threads are alive


_opened: list[str] | None = None  # the paths os.open/open opened while counting


def _count_opens(event: str, args: tuple) -> None:
    if event == 'open' and _opened is not None and isinstance(args[0], str):
        _opened.append(args[0])


sys.addaudithook(_count_opens)  # audit hooks cannot be removed: it counts only when asked


@contextlib.contextmanager
def _opens_of(path: str):
    """The number of times ``path`` is opened in the block (CPython's 'open' audit
    event, raised by ``open`` and ``os.open`` alike: no mock)."""
    global _opened
    _opened, count = [], []
    try:
        yield count
    finally:
        count.append(sum(1 for name in _opened if name == path))
        _opened = None


@contextlib.contextmanager
def _idle_thread():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert threading.active_count() > 1
        yield
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize('ext', FORMATS)
def test_answers_are_remembered_with_an_idle_thread_alive(tmp_path, store, ext):
    """A MultiProc parent or a Jupyter kernel has other threads: the memos still work.

    A remembered answer costs one open of the file (its identity and header bytes, read
    again); a full check opens it several times (the reference's header, the files' side
    read before and after)."""
    path = write(tmp_path / f'x{ext}', 3.0)
    settle()
    with _idle_thread():
        img = nib.load(path)
        with _opens_of(path) as full:
            assert nt.as_filename(img, formats=FORMATS) == path
        assert record_of(img).verdict is not None  # the clean verdict is kept
        with _opens_of(path) as again:
            assert nt.as_filename(img, formats=FORMATS) == path
        assert full[0] > 1 and again == [1]

        first = nt.resolve_memoised(img, formats=FORMATS)
        assert nt.is_dirty_memoised(img) is False
        with _opens_of(path) as recalled:
            assert nt.resolve_memoised(img, formats=FORMATS) is first
            assert nt.is_dirty_memoised(img) is nt.is_dirty_memoised(img) is False
        assert recalled == [3]  # one each: a recall re-reads the files' side only

        img.header['descrip'] = b'edited'  # dirty: the store file is remembered too
        written = nt.resolve_memoised(img, formats=FORMATS)
        settle()
        written = nt.resolve_memoised(img, formats=FORMATS)
        assert written.action in ('written', 'reused') and written.path != path
        assert nt.resolve_memoised(img, formats=FORMATS) is written


# ---------------------------------- any edits by another thread, interleaved with checks


def _descrip(img, on: bool) -> None:
    img.header['descrip'] = b'edited' if on else b''


def _shift(img, on: bool) -> None:
    img.affine[0, 3] = 1.0 if on else 0.0  # in place: the same array object


def _extension(img, on: bool) -> None:
    exts = img.header.extensions
    if on and not exts:
        exts.append(nib.nifti1.Nifti1Extension(6, b'a comment'))
    elif not on and exts:
        exts.clear()


TOGGLES = (_descrip, _shift, _extension)  # all off: the file's own state


def _put(img, edits: tuple[bool, ...]) -> None:
    for toggle, on in zip(TOGGLES, edits, strict=True):
        toggle(img, on)


@pytest.fixture(scope='module')
def settled_file(tmp_path_factory) -> str:
    folder = Path(os.path.realpath(tmp_path_factory.mktemp('threads')))
    data = np.random.default_rng(0).random((12, 12, 12)).astype('f4')
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1])), folder / 'x.nii')
    settle()
    return str(folder / 'x.nii')


STATES = [tuple(bool(n >> i & 1) for i in range(len(TOGGLES))) for n in range(8)]


def _remembered_answers_hold(img, path: str, store: Store) -> None:
    """Every answer remembered for ``img``, in each of the 8 states, is right; looked at
    without computing (a computed answer would replace a remembered one)."""
    resolved = ('resolve', None, state._store_marker(store))
    for edits in STATES:
        _put(img, edits)
        edited = any(edits)
        verdict = record_of(img).verdict
        if verdict is not None and still_clean(img, verdict) is not None:
            assert not edited, f'a clean verdict is remembered for the edited state {edits}'
        dirty = state._recall(img, ('dirty',))
        assert dirty is state._MISSING or dirty is edited, edits
        handed = state._recall(img, resolved)
        if handed is not state._MISSING:
            assert (handed.path == path) is (not edited), edits
            assert _content(nib.load(handed.path)) == _content(img), edits


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(st.sampled_from(STATES), min_size=1, max_size=6),
    st.lists(
        st.sampled_from(['as_filename', 'is_dirty', 'memoised', 'dirty memoised']),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from([0.0, 1e-5, 1e-4]),
)
def test_edits_by_another_thread_never_leave_a_wrong_answer_remembered(
    settled_file, tmp_path_factory, walk, calls, pause
):
    """Another thread walks the image through ``walk`` (every state one of the 8
    combinations of an edited descrip, a shifted affine, an added extension), over and
    over, while this one asks ``calls``. Then, quiet, no answer remembered for any state
    may differ from the truth: clean exactly for the file's own state, and a file handed
    out holds what the image holds. Three rounds; and last, every state is asked through
    the public functions (twice: the second answer is the remembered one)."""
    store = Store(tmp_path_factory.getbasetemp() / 'threads-store')
    img = nib.load(settled_file)
    for _ in range(3):
        _ask_while_walked(img, walk, calls, pause, store)
        _remembered_answers_hold(img, settled_file, store)
    for edits in [*STATES, *reversed(STATES)]:
        _put(img, edits)
        edited = any(edits)
        assert nt.is_dirty(img) is nt.is_dirty_memoised(img) is edited, edits
        for handed in (
            nt.resolve(img, store=store),
            nt.resolve_memoised(img, store=store),
            nt.resolve_memoised(img, store=store),
        ):
            assert (handed.path == settled_file) is (not edited), edits
            assert _content(nib.load(handed.path)) == _content(img), edits


def _ask_while_walked(img, walk, calls, pause: float, store: Store) -> None:
    def walker() -> None:
        for edits in walk:
            _put(img, edits)
            time.sleep(pause)

    with _racing(walker):
        end = time.monotonic() + 0.1
        while time.monotonic() < end:
            for call in calls:
                with contextlib.suppress(nt.ImageReadError, ValueError, TypeError, KeyError):
                    if call == 'as_filename':
                        nt.as_filename(img, store=store)
                    elif call == 'is_dirty':
                        nt.is_dirty(img)
                    elif call == 'memoised':
                        nt.resolve_memoised(img, store=store)
                    else:
                        nt.is_dirty_memoised(img)


def _content(img) -> tuple:
    """What a tool reads: descrip, affine, extensions and voxels."""
    return (
        img.header['descrip'].item(),
        np.asarray(img.affine).tobytes(),
        [(ext.code, ext.content) for ext in img.header.extensions],
        np.asarray(img.dataobj).tobytes(),
    )


def test_a_proxy_changed_and_restored_by_another_thread_keeps_its_digest(settled_file):
    """The digest memo is keyed by the proxy's read parameters and its file's identity:
    a reading made with the parameters another thread set for a moment (here the
    scaling) was filed under the parameters read before and after."""
    img = nib.load(settled_file)
    proxy = img.dataobj
    digests = sys.modules['nipype_nibtrack.digest']

    def flip() -> None:
        proxy._slope = 2.0
        time.sleep(0)  # let the reader run with it
        proxy._slope = 1.0
        time.sleep(0)

    for _ in range(3):
        digests._proxy_digests._data.clear()  # read again, while the scaling flips
        with _racing(flip):
            end = time.monotonic() + 0.2
            while time.monotonic() < end:
                digests.data_digest(proxy, None, 'F')
        for slope in (1.0, 2.0):
            proxy._slope = slope
            want = digests.array_digest(np.asanyarray(proxy), 'F')
            assert digests.data_digest(proxy, None, 'F') == want, slope
        proxy._slope = 1.0


def test_a_header_rewritten_in_place_and_back_while_checked_is_not_remembered(tmp_path):
    """Another thread (or process) rewrites the file's descrip through a shared memory
    map and back, over and over: after the first write no timestamp moves. A reference
    read while the file said B, keyed by header bytes read while it said A, made an
    image edited to B clean against a file saying A (so did a verdict whose files' side
    was read at A around a reference read at B)."""
    path = str(tmp_path / 'x.nii')
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), 'f4'), np.eye(4)), path)
    settle()
    img = nib.load(path)
    img.header['descrip'] = b'B'
    at = 148  # descrip's place in a NIfTI-1 header
    with open(path, 'r+b') as fobj, mmap.mmap(fobj.fileno(), 0) as shared:
        assert shared[at : at + 1] == b'\0'

        def flip() -> None:
            shared[at : at + 1] = b'B'
            time.sleep(0)  # let the checker run with it
            shared[at : at + 1] = b'\0'
            time.sleep(0)

        for _ in range(4):
            with _racing(flip):
                end = time.monotonic() + 0.75
                while time.monotonic() < end:
                    nt.is_dirty(img)
            assert shared[at : at + 1] == b'\0'  # the file says A: the image (B) is dirty
            assert nt.is_dirty(img)
            assert nt.resolve(img, store=Store(tmp_path / 'store')).path != path
