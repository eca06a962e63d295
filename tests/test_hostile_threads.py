"""Hostile tests of the "threads" change: answers computed and keyed on a private copy.

Each test drives another thread to edit the image at a precise point of an answer (a
profile hook at the entry of a package function hands the edit to a thread and waits
for it), or edits what the memo key does not read, then checks the remembered answer
against a fresh full check and the file handed out against what the image holds.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import nipype_nibtrack as nt
from nipype_nibtrack import digest, provenance, rules
from nipype_nibtrack import store as store_module
from nipype_nibtrack.fileid import RACY_NS
from tests.conftest import assert_same_content

SHAPE = (4, 5, 6)
resolving = importlib.import_module(
    'nipype_nibtrack.resolve'
)  # the package's resolve is a function


@pytest.fixture(scope='module')
def settled(tmp_path_factory) -> Path:
    """A settled NIfTI file with one extension, never written again."""
    path = Path(os.path.realpath(tmp_path_factory.mktemp('hostile3'))) / 'x.nii'
    data = np.arange(np.prod(SHAPE), dtype='i2').reshape(SHAPE)
    img = nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1]))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b'comment A'))
    nib.save(img, path)
    time.sleep(RACY_NS / 1e9 + 0.05)
    return path


@pytest.fixture(scope='module', params=['.nii', '.nii.gz', '.img'])
def settled_any(request, tmp_path_factory) -> Path:
    """The same image as a settled .nii, .nii.gz and NIfTI-1 pair."""
    folder = Path(os.path.realpath(tmp_path_factory.mktemp('hostile3any')))
    path = folder / f'x{request.param}'
    data = np.arange(np.prod(SHAPE), dtype='i2').reshape(SHAPE)
    klass = nib.Nifti1Pair if request.param == '.img' else nib.Nifti1Image
    img = klass(data, np.diag([2.0, 2, 2, 1]))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b'comment A'))
    nib.save(img, path)
    time.sleep(RACY_NS / 1e9 + 0.05)
    return path


def fresh_reason(img) -> str | None:
    """The full check, with no remembered verdict to fall back on."""
    record = provenance.record_of(img)
    kept = record.verdict
    record.verdict = None
    try:
        return nt.dirty_reason(img)
    finally:
        record.verdict = kept


def by_other_thread(edit: Callable[[], None]) -> None:
    thread = threading.Thread(target=edit)
    thread.start()
    thread.join()


@contextmanager
def edits_at(edits: dict[str, list[Callable[[], None]]]):
    """While inside, at each entry of a function named ``'module:function'`` in
    ``edits``, another thread makes the next edit listed for it (the caller waits)."""
    pending = {name: list(todo) for name, todo in edits.items()}

    def hook(frame, event, arg):
        if event != 'call':
            return
        todo = pending.get(f'{frame.f_globals.get("__name__")}:{frame.f_code.co_name}')
        if todo:
            by_other_thread(todo.pop(0))

    sys.setprofile(hook)
    try:
        yield pending
    finally:
        sys.setprofile(None)
    for todo in pending.values():  # a point a fixed package no longer reaches: the edit
        for edit in todo:  # still happens, so the image ends in the state the test says
            by_other_thread(edit)


# ------------------------------------------------ defect: an object-dtype affine keyed by
# the addresses of its elements (image_key used affine.tobytes(), which for dtype=object
# is pointers: a freed float's address is reused by the next one, another value)


def test_an_object_affine_is_not_remembered_by_the_addresses_of_its_floats(settled, store):
    img = nt.load(settled)
    img._affine = img.affine.astype(object)  # equal values: clean for a full check
    assert nt.is_dirty(img) is False and nt.is_dirty(img) is False
    img._affine[0, 0] = None  # frees the float: its address is reused below
    img._affine[0, 0] = float('5.5')
    assert fresh_reason(img) == "affine differs from the file's"
    assert nt.is_dirty(img) is True
    assert nt.is_dirty_memoised(img) is True
    out = nib.load(nt.as_filename(img))
    assert out.affine[0, 0] == 5.5


# ----------------------------------- defect: the private copy shares what an instance
# attribute of the image's parts holds (a method shadowed on the instance is bound to the
# original object; a mutable attribute is the original's): it reads the live image


def test_an_extension_method_shadowed_on_the_instance_does_not_read_the_live_image(settled):
    img = nt.load(settled)
    ext = img.header.extensions[0]
    ext.write_to = ext.write_to  # an instance attribute: bound to the image's own extension
    ext._raw = b'comment B'  # dirty: the file holds A
    # key read at B (freeze); the rule compares A; the key read again at B (_learn)
    with edits_at(
        {
            'nipype_nibtrack.rules:_compare_against_file': [
                lambda: setattr(ext, '_raw', b'comment A')
            ],
            'nipype_nibtrack.rules:_learn': [lambda: setattr(ext, '_raw', b'comment B')],
        }
    ):
        nt.is_dirty(img)
    assert fresh_reason(img) == "NIfTI extensions differ from the file's"
    assert nt.is_dirty(img) is True


def test_a_proxy_method_shadowed_on_the_instance_does_not_file_a_digest_under_other_params(
    settled,
):
    img = nt.load(settled)
    proxy = img.dataobj
    proxy._get_scaled = proxy._get_scaled  # bound to the image's own proxy
    # the key is read at slope 1 (private copy), the voxels at slope 3, the key again at 1
    with edits_at(
        {
            'nipype_nibtrack.digest:_proxy_slab': [lambda: setattr(proxy, '_slope', 3.0)],
            'nipype_nibtrack.digest:_proxy_key': [
                lambda: None,
                lambda: setattr(proxy, '_slope', 1.0),
            ],
        }
    ):
        digest.data_digest(proxy, None, 'F')
    assert proxy._slope == 1.0
    want = digest.array_digest(np.asanyarray(proxy), 'F')
    assert digest.data_digest(proxy, None, 'F') == want


def test_the_state_memo_is_not_kept_for_a_copy_sharing_a_mutable_attribute(settled, store):
    img = nt.load(settled)
    ext = img.header.extensions[0]
    ext.write_to = ext.write_to
    ext._raw = b'comment B'

    def flip(value: bytes) -> Callable[[], None]:
        return lambda: setattr(ext, '_raw', value)

    # image_state of the copy reads B; the answer is computed at A; the state re-read at B
    with edits_at(
        {
            'nipype_nibtrack.rules:_compare_against_file': [flip(b'comment A')],
            'nipype_nibtrack.state:holds': [flip(b'comment B')],
        }
    ):
        nt.is_dirty_memoised(img)
    assert fresh_reason(img) is not None
    assert nt.is_dirty_memoised(img) is True


# ---------------------------------------- defect: a subclass overriding a property the
# rule reads (img.affine) while the key reads the private attribute (img._affine)


class Shifted(nib.Nifti1Image):
    """An image whose affine is shifted by an attribute of its own."""

    shift = 0.0

    @property
    def affine(self):
        affine = self._affine.copy()
        affine[0, 3] += self.shift
        return affine


def test_a_subclass_reading_its_own_attributes_in_a_property_is_not_remembered(settled, store):
    img = Shifted.from_filename(str(settled))
    assert nt.is_dirty(img) is False and nt.is_dirty(img) is False
    img.shift = 5.0
    assert fresh_reason(img) == "affine differs from the file's"
    assert nt.is_dirty(img) is True
    assert nt.is_dirty_memoised(img) is True
    assert nt.as_filename(img) != str(settled)


# ------------------------------------------------------------------ what held (checks)


def test_no_private_copy_is_left_behind_after_many_answers_under_edits(settled, store):
    img = nt.load(settled)
    stop = threading.Event()

    def editor():
        while not stop.is_set():
            img.header['descrip'] = b'edited'
            img.affine[0, 3] += 1
            img.affine[0, 3] -= 1
            img.header['descrip'] = b''

    fds = len(os.listdir('/proc/self/fd'))
    thread = threading.Thread(target=editor)
    thread.start()
    try:
        for _ in range(100):
            nt.is_dirty(img)
            nt.is_dirty_memoised(img)
            nt.check_image_memoised(img)
    finally:
        stop.set()
        thread.join()
    gc.collect()
    private = [o for o in gc.get_objects() if provenance._PRIVATE in getattr(o, '__dict__', {})]
    assert private == []
    assert len(os.listdir('/proc/self/fd')) <= fds + 1
    assert nt.is_dirty(img) is (fresh_reason(img) is not None)


# ------------------------------------ defect: a fork while another thread is inside an
# answer: the child inherits the package's locks held, and hangs on its first answer


LOCKS = {
    'records': lambda: provenance._lock,
    'references': lambda: rules._references._lock,
    'data digests': lambda: digest._proxy_digests._lock,
    'targets': lambda: resolving._targets._lock,
    'store choice': lambda: store_module._store_lock,
}


@pytest.mark.parametrize('lock', LOCKS)
def test_a_forked_child_answers_while_another_thread_held_a_lock_at_fork(tmp_path, store, lock):
    path = tmp_path / 'f.nii'
    nib.save(nib.Nifti1Image(np.arange(8, dtype='f4').reshape(2, 2, 2), np.eye(4)), path)
    held, release = threading.Event(), threading.Event()

    taken = LOCKS[lock]()

    def hold():
        with taken:
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    try:
        pid = os.fork()
        if pid == 0:  # the child: killed by the alarm if it hangs
            signal.alarm(8)
            try:
                img = nib.load(path)
                ok = nt.is_dirty(img) is False
                img.header['descrip'] = b'edited'
                out = nib.load(nt.as_filename(img))
                ok = ok and out.header['descrip'] == b'edited'
            finally:
                os._exit(0 if ok else 1)
    finally:
        release.set()
        thread.join()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f'the child hung (killed by signal {os.WTERMSIG(status)})'
    assert os.WEXITSTATUS(status) == 0


# ------------------------ defect: the pinned bytes of a .mat came through the sentinel
# b'missing' of a missing file: a .mat holding those very bytes was served to nibabel as
# no .mat (clean) while nibabel, reading the file, refuses it


def test_a_mat_file_holding_the_word_missing_is_not_taken_for_no_mat(tmp_path):
    path = tmp_path / 's.img'
    nib.save(nib.Spm2AnalyzeImage(np.zeros((2, 2, 2), 'f4'), np.diag([2.0, 2, 2, 1])), path)
    mat = tmp_path / 's.mat'
    mat.unlink(missing_ok=True)
    img = nt.load(path)
    assert nt.dirty_reason(img) is None
    mat.write_bytes(b'missing')
    with pytest.raises(Exception, match='truncated'):
        nib.load(path)  # what a tool reading the files gets
    assert nt.is_dirty(img) is True
    assert 'cannot be read' in fresh_reason(img)


# ------------------- defect: the file map was copied by iterating it in Python: another
# thread adding a file holder meanwhile raised RuntimeError out of is_dirty


def test_a_file_map_changed_by_another_thread_while_copied_is_no_error(settled):
    img = nt.load(settled)
    holder = nib.fileholders.FileHolder(str(settled))
    # the first copy_plain copies the extension, the second the file holder
    with edits_at(
        {
            'nipype_nibtrack.frozen:_copy_plain': [
                lambda: None,
                lambda: img.file_map.__setitem__('x', holder),
            ]
        }
    ):
        nt.is_dirty(img)  # the answer: either, but no error
    del img.file_map['x']
    assert nt.is_dirty(img) is (fresh_reason(img) is not None) is False


# ------------------- what held: every attribute the copy takes, edited to B before the
# answer, restored to A (clean) by another thread when the rule starts and edited to B
# again when the answer is filed; the memos' answers for B must be a fresh full check's


class Labelled(nib.Nifti1Image):
    """nibabel's behaviour (a dunder only): its answers are remembered."""

    def __repr__(self):
        return 'labelled'


def _own_class(img) -> type:
    return nib.Nifti1Pair if img.dataobj.file_like.endswith('.img') else nib.Nifti1Image


def _ext_bytearray(img):
    img.header.extensions[0]._raw = bytearray(b'comment A')  # the same bytes, editable


TOGGLES = {
    # name: (prepare (clean), to B, to A)
    'header field': (
        None,
        lambda i: i.header.__setitem__('descrip', b'B'),
        lambda i: i.header.__setitem__('descrip', b''),
    ),
    'extension bytearray in place': (
        _ext_bytearray,
        lambda i: i.header.extensions[0]._raw.__setitem__(8, ord('B')),
        lambda i: i.header.extensions[0]._raw.__setitem__(8, ord('A')),
    ),
    'extension list': (
        None,
        lambda i: i.header.extensions.append(nib.nifti1.Nifti1Extension(6, b'more')),
        lambda i: i.header.extensions.pop(),
    ),
    'affine in place': (
        None,
        lambda i: i.affine.__setitem__((0, 3), 7.0),
        lambda i: i.affine.__setitem__((0, 3), 0.0),
    ),
    'proxy slope': (
        None,
        lambda i: setattr(i.dataobj, '_slope', 2.0),
        lambda i: setattr(i.dataobj, '_slope', 1.0),
    ),
    'proxy offset': (
        None,
        lambda i: setattr(i.dataobj, '_offset', 0),
        lambda i: setattr(i.dataobj, '_offset', int(i.header.get_data_offset())),
    ),
    'proxy dtype': (
        None,
        lambda i: setattr(i.dataobj, '_dtype', np.dtype('u2')),
        lambda i: setattr(i.dataobj, '_dtype', np.dtype('<i2')),
    ),
    'file holder name in place': (
        None,
        lambda i: setattr(i.file_map['image'], 'filename', '/elsewhere/x.nii'),
        lambda i: setattr(i.file_map['image'], 'filename', i.dataobj.file_like),
    ),
    'fdata cache': (
        None,
        lambda i: setattr(i, '_fdata_cache', np.ones(SHAPE)),
        lambda i: setattr(i, '_fdata_cache', None),
    ),
    'class': (
        None,
        lambda i: setattr(i, '__class__', nib.Nifti2Image),
        lambda i: setattr(i, '__class__', _own_class(i)),
    ),
    'class of its own': (
        None,
        lambda i: setattr(i, '__class__', Labelled),
        lambda i: setattr(i, '__class__', _own_class(i)),
    ),
}


@pytest.mark.parametrize('memo', ['verdict', 'state', 'resolve'])
@pytest.mark.parametrize('toggle', TOGGLES)
def test_an_edit_undone_and_redone_by_another_thread_while_answered_is_never_kept(
    settled_any, store, memo, toggle
):
    prepare, to_b, to_a = TOGGLES[toggle]
    img = nt.load(settled_any)
    if prepare is not None:
        prepare(img)
    assert fresh_reason(img) is None, 'A must be clean'
    to_b(img)
    kept = {
        'verdict': 'nipype_nibtrack.rules:_learn',
        'state': 'nipype_nibtrack.state:holds',
        'resolve': 'nipype_nibtrack.state:holds',
    }[memo]
    answer = {
        'verdict': nt.is_dirty,
        'state': nt.is_dirty_memoised,
        'resolve': lambda i: nt.resolve_memoised(i, store=store),
    }[memo]
    with edits_at(
        {
            'nipype_nibtrack.rules:_compare_against_file': [lambda: to_a(img)],
            kept: [lambda: to_b(img)],
        }
    ):
        answer(img)
    # all threads stopped, the image at B: remembered answers are a fresh full check's
    want = fresh_reason(img)
    assert nt.is_dirty(img) is (want is not None)
    assert nt.is_dirty_memoised(img) is (want is not None)
    if memo == 'resolve' and toggle not in ('class', 'proxy offset', 'proxy dtype'):
        out = nib.load(nt.resolve_memoised(img, store=store).path)
        assert_same_content(out, img)


@pytest.mark.parametrize('keep_file_open', [False, True])
@pytest.mark.parametrize('ext', ['.nii', '.nii.gz'])
def test_answers_under_edits_leave_no_file_open(tmp_path, store, ext, keep_file_open):
    path = tmp_path / f'k{ext}'
    nib.save(nib.Nifti1Image(np.arange(8, dtype='f4').reshape(2, 2, 2), np.eye(4)), path)
    img = nib.load(path, keep_file_open=keep_file_open)
    np.asanyarray(img.dataobj)  # a held file is opened now, once
    gc.collect()
    fds = len(os.listdir('/proc/self/fd'))
    stop = threading.Event()

    def editor():
        while not stop.is_set():
            img.header['descrip'] = b'B'
            img.header['descrip'] = b''

    thread = threading.Thread(target=editor)
    thread.start()
    try:
        for _ in range(30):
            nt.is_dirty(img)
            nt.resolve_memoised(img, store=store)
    finally:
        stop.set()
        thread.join()
    gc.collect()
    assert len(os.listdir('/proc/self/fd')) <= fds
    assert nt.is_dirty(img) is False


HOOK_POINTS = (
    'nipype_nibtrack.frozen:_copy_image',
    'nipype_nibtrack.frozen:_copy_header',
    'nipype_nibtrack.recheck:memo_for',
    'nipype_nibtrack.recheck:read_files',
    'nipype_nibtrack.rules:_compare_against_file',
    'nipype_nibtrack.rules:reference',
    'nipype_nibtrack.rules:_learn',
    'nipype_nibtrack.snapshot:snapshot',
    'nipype_nibtrack.state:image_state',
    'nipype_nibtrack.state:holds',
    'nipype_nibtrack.resolve:_resolve_image',
)


@pytest.mark.parametrize('seed', range(3))
def test_random_edits_by_another_thread_at_random_points_leave_no_wrong_answer(
    settled_any, store, seed
):
    """Seeded walks: each answer runs with another thread putting random attributes in
    state A or B at random entry points; after each, with the thread done, every
    remembered answer is a fresh full check's and the handed file holds the image."""
    rng = np.random.default_rng(seed)
    settled = settled_any
    img = nt.load(settled)
    _ext_bytearray(img)
    names = [name for name in TOGGLES if name != 'class']
    at_b: set[str] = set()

    def put(name: str, b: bool) -> Callable[[], None]:
        def edit():
            if b and name not in at_b:
                TOGGLES[name][1](img)
                at_b.add(name)
            elif not b and name in at_b:
                TOGGLES[name][2](img)
                at_b.discard(name)

        return edit

    for _ in range(12):
        points = rng.choice(HOOK_POINTS, size=3, replace=False)
        plan = {
            str(point): [put(str(rng.choice(names)), bool(rng.integers(2))) for _ in range(2)]
            for point in points
        }
        answer = rng.choice(['is_dirty', 'is_dirty_memoised', 'resolve_memoised', 'check'])
        with edits_at(plan):
            if answer == 'is_dirty':
                nt.is_dirty(img)
            elif answer == 'is_dirty_memoised':
                nt.is_dirty_memoised(img)
            elif answer == 'check':
                nt.check_image_memoised(img)
            else:
                nt.resolve_memoised(img, store=store)
        want = fresh_reason(img)
        assert nt.is_dirty(img) is (want is not None), (sorted(at_b), want)
        assert nt.is_dirty_memoised(img) is (want is not None), (sorted(at_b), want)
        resolved = nt.resolve_memoised(img, store=store)
        if not at_b & {'proxy offset', 'proxy dtype', 'class of its own'}:
            assert_same_content(nib.load(resolved.path), img)
        if want is None:
            assert resolved.path == str(settled)
