"""Paths that name no regular file: the core never opens one, and never hangs.

A source file replaced by a directory, a FIFO (an ``open`` for reading blocks until a
writer comes: forever), a socket, a device (``/dev/null``, ``/dev/zero`` linked at the
path), a dangling link, a parent folder replaced by a file, a file it may not read:
every question about the image ends in a dirty verdict or a clear error naming the
path, never a clean verdict, never a hang. Each case runs under an alarm: a blocking
``open`` fails the test instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import nipype_nibtrack as nt
from nipype_nibtrack.fileid import NotRegularFile, open_regular, regular_opener
from nipype_nibtrack.opening import load_opened
from nipype_nibtrack.provenance import binding_of
from nipype_nibtrack.snapshot import snapshot
from nipype_nibtrack.store import Store

from .conftest import SPATIAL_FORMATS, assert_same_bits, build_format, visible_data


class Hung(BaseException):  # not an Exception: no handler of the core swallows it
    pass


@contextlib.contextmanager
def no_hang(seconds: int = 10) -> Iterator[None]:
    """Fail (instead of hanging) when the block takes longer than ``seconds``.

    SIGALRM interrupts a blocked ``open`` and raises :class:`Hung`; should a C library
    retry its ``open`` for ever, faulthandler ends the process a minute later with every
    thread's traceback: the run fails, it never hangs.
    """

    def alarm(signum: int, frame: object) -> None:
        raise Hung(f'blocked for {seconds} s: something opened a FIFO')

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    faulthandler.dump_traceback_later(seconds + 60, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _image_file(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / 'brain.nii'
    nib.save(nib.Nifti1Image(np.arange(24, dtype='f4').reshape(2, 3, 4), np.eye(4)), path)
    os.utime(path, ns=(0, 0))  # settled: every memo may be kept, and is then rechecked
    return path


def _directory(path: Path) -> None:
    path.mkdir()


def _fifo(path: Path) -> None:
    os.mkfifo(path)


_sockets: list[socket.socket] = []


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.fspath(path))
    _sockets.append(sock)


def _link_to(target: str) -> Callable[[Path], None]:
    def link(path: Path) -> None:
        path.symlink_to(target)

    link.__name__ = f'_link_to_{os.path.basename(target)}'
    return link


def _dangling(path: Path) -> None:
    path.symlink_to(path.with_name('nothing.nii'))


def _parent_is_a_file(path: Path) -> None:
    shutil.rmtree(path.parent)
    path.parent.write_bytes(b'a file where the folder was')


REPLACEMENTS = [
    _directory,
    _fifo,
    _socket,
    _link_to('/dev/null'),
    _link_to('/dev/zero'),
    _dangling,
    _parent_is_a_file,
]

QUESTIONS = {
    'dirty_reason': nt.dirty_reason,
    'is_dirty_memoised': nt.is_dirty_memoised,
    'resolve': nt.resolve,
    'resolve_memoised': nt.resolve_memoised,
    'image_label': nt.image_label,
}


@pytest.mark.parametrize('question', list(QUESTIONS))
@pytest.mark.parametrize('loader', [nt.load, nib.load], ids=['nt.load', 'nib.load'])
@pytest.mark.parametrize('warm', [False, True], ids=['first-look', 'remembered'])
@pytest.mark.parametrize('replace', REPLACEMENTS, ids=lambda f: f.__name__.strip('_'))
def test_a_source_path_that_is_no_regular_file_is_dirty_or_a_clear_error(
    replace, warm, loader, question, tmp_path, store
):
    path = _image_file(tmp_path / 'src')
    img = loader(path)
    if warm:  # remembered answers and clean verdicts, rechecked by reopening the file
        assert nt.resolve_memoised(img).path == str(path)
        assert nt.resolve(img).action == 'original'
        assert not nt.is_dirty_memoised(img)
    path.unlink()
    replace(path)
    with no_hang():
        try:
            answer = QUESTIONS[question](img)
        except (nt.ImageReadError, ValueError) as err:
            assert str(path) in str(err)
            return
    if question == 'dirty_reason':
        assert answer is not None
        assert str(path) in answer
    elif question == 'is_dirty_memoised':
        assert answer is True
    else:
        handed = answer.path if isinstance(answer, nt.Resolution) else answer
        assert not handed.startswith(str(path)), f'{question} handed out {handed}'
    assert not any(store.objects.rglob('*.nii')) if store.objects.exists() else True


@pytest.mark.parametrize(
    'replace', [_directory, _fifo, _socket, _link_to('/dev/zero')], ids=lambda f: f.__name__
)
def test_load_refuses_what_is_no_regular_file(replace, tmp_path):
    path = tmp_path / 'brain.nii'
    replace(path)
    with no_hang(), pytest.raises(NotRegularFile, match='not a regular file') as err:
        nt.load(path)
    assert str(path) in str(err.value)


def test_open_regular_never_blocks_and_says_what_it_found(tmp_path):
    """What is opened is checked (fstat after a non-blocking open): a FIFO swapped in
    after any earlier stat still cannot block the reader."""
    fifo = tmp_path / 'fifo.nii'
    os.mkfifo(fifo)
    with no_hang(), pytest.raises(NotRegularFile, match=r'is a FIFO \(named pipe\)'):
        open_regular(fifo)
    with (
        no_hang(),
        pytest.raises(NotRegularFile, match='is a directory'),
        open(tmp_path, 'rb', opener=regular_opener),
    ):
        pass
    regular = tmp_path / 'file.nii'
    regular.write_bytes(b'abc')
    with open(regular, 'rb', opener=regular_opener) as fobj:
        assert fobj.read() == b'abc'


def test_mark_clean_refuses_a_path_that_is_no_regular_file(tmp_path):
    path = _image_file(tmp_path / 'src')
    img = nt.load(path)
    path.unlink()
    os.mkfifo(path)
    with no_hang(), pytest.raises(ValueError, match='FIFO'):
        nt.mark_clean(img)


@pytest.mark.parametrize('planted', ['manifest', 'image'])
def test_a_fifo_planted_in_a_store_entry_never_blocks_a_lookup(planted, tmp_path):
    store = Store(tmp_path / 'store')
    img = nib.Nifti1Image(np.arange(24, dtype='f4').reshape(2, 3, 4), np.eye(4))
    written = Path(nt.as_filename(img, store=store))
    victim = written.with_name(f'.{written.name}.json') if planted == 'manifest' else written
    victim.unlink()
    os.mkfifo(victim)
    with no_hang():
        again = nt.resolve(img, store=store)  # the damaged entry is written again
    assert again.action == 'written'
    assert np.array_equal(nib.load(again.path).get_fdata(), img.get_fdata())


def test_a_file_it_may_not_read_is_never_clean(request):
    """As another user (permissions do not apply to root): a file made unreadable after
    a clean verdict was remembered is dirty, and resolving the image is a clear error."""
    if os.getuid() != 0:
        pytest.skip('needs root to become another user')
    nobody = 65534
    work = Path(tempfile.mkdtemp())  # tmp_path's parents are root's alone
    request.addfinalizer(lambda: shutil.rmtree(work))
    path = _image_file(work / 'src')
    for folder in (work, path.parent):
        os.chmod(folder, 0o755)
    os.chown(path, nobody, nobody)  # the child may chmod it
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child, as nobody: report what went wrong through the pipe
        try:
            os.close(read)
            os.setgid(nobody)
            os.setuid(nobody)
            img = nt.load(path)
            assert nt.resolve_memoised(img).action == 'original'
            assert not nt.is_dirty_memoised(img)
            os.chmod(path, 0)
            reason = nt.dirty_reason(img)
            assert reason is not None and 'Permission' in reason, reason
            assert nt.is_dirty_memoised(img)
            for resolve in (nt.resolve, nt.resolve_memoised):
                try:
                    resolve(img)
                except nt.ImageReadError as err:
                    assert str(path) in str(err), err
                else:
                    raise AssertionError(f'{resolve.__name__} handed out an unreadable file')
        except BaseException as err:  # reported to the parent
            os.write(write, repr(err).encode() or b'?')
        finally:
            os._exit(0)
    os.close(write)
    with no_hang(60):
        os.waitpid(pid, 0)
        report = os.read(read, 4096)
    os.close(read)
    assert report == b'', report.decode()


def test_copying_an_image_that_holds_its_file_open_never_opens_a_fifo(tmp_path):
    """PAR/REC images hold their .REC open; a copy re-opens it by name (copies.py)."""
    import copy

    from nibabel.testing import data_path

    names = ('phantom_EPI_asc_CLEAR_2_1.PAR', 'phantom_EPI_asc_CLEAR_2_1.REC')
    par, rec = (Path(shutil.copy(os.path.join(data_path, n), tmp_path / n)) for n in names)
    img = nt.load(par)
    rec.unlink()
    os.mkfifo(rec)
    with no_hang(), pytest.raises(OSError, match=r'FIFO|no longer the file'):
        copy.deepcopy(img)


@pytest.mark.parametrize('half', ['.hdr', '.img'])
def test_load_refuses_a_pair_whose_other_half_is_a_fifo(half, tmp_path):
    """nibabel opens the header beside the image named (and the image beside it)."""
    img_path = tmp_path / 'pair.img'
    nib.save(nib.Nifti1Pair(np.zeros((2, 2, 2), 'f4'), np.eye(4)), img_path)
    fifo = img_path.with_suffix(half)
    given = img_path.with_suffix('.img' if half == '.hdr' else '.hdr')
    fifo.unlink()
    os.mkfifo(fifo)
    with no_hang(), pytest.raises(NotRegularFile, match='FIFO') as err:
        nt.load(given)
    assert str(fifo) in str(err.value)


# ------------------------------------------------ a FIFO swapped in after every check
#
# The core never makes nibabel (or h5py) open a user's file by name: every file it has
# read, it opened itself (non-blocking, then fstat; see nipype_nibtrack.opening). The
# reference loads of every format, the voxels of a dirty image it hashes and writes,
# the file data a get_fdata() cache is compared with. Two ways of losing the race
# between a stat and an open, for every format and three states of the image:
#
# - an audit hook swaps the file for a FIFO as the n-th open of it starts, every n;
# - every stat guard of the core is blinded and a FIFO is at the path before the call
#   (this also reaches opens no audit hook sees: HDF5's, in C).


def _dirty_states(img: object, state: str) -> None:
    if state == 'cache':  # compared with the file's data by the check
        img.get_fdata()
    elif state == 'dirty':  # its voxels hashed and written from the file
        nt.mark_dirty(img)


STATES = ['clean', 'cache', 'dirty']


def _case(name: str, folder: Path, state: str) -> tuple[object, object, np.ndarray]:
    case = build_format(name, folder)
    img = nt.load(case.path)
    _dirty_states(img, state)
    want = visible_data(img)  # read now, before any file is swapped
    for path in case.files:
        os.utime(path)  # a new identity: no remembered verdict or reference
    return case, img, want


def _assert_handed_well(
    handed: object, img: object, want: np.ndarray, swapped: Path, original: bool = False
) -> None:
    """A clear error naming a file of the image, or the image's own content written
    (or, when ``original`` may be, the image's own file)."""
    if isinstance(handed, nt.ImageReadError):
        assert any(str(p) in str(handed) for p in binding_of(img).paths.values()), handed
        return
    assert isinstance(handed, nt.Resolution), handed
    if original and handed.action == 'original':
        return
    assert handed.action != 'original', f'{swapped} swapped for a FIFO, yet handed out'
    assert_same_bits(nib.load(handed.path).get_fdata(), want, f'{handed.path} (written)')


class _SwapAtOpen:
    """An audit hook that replaces ``path`` by a FIFO just as the ``n``-th open of it
    starts (after any stat before it): the race a stat-then-open check loses."""

    active: _SwapAtOpen | None = None

    def __init__(self, path: Path, n: int):
        self.path, self.n, self.seen, self.swapped = str(path), n, 0, False

    def __enter__(self) -> _SwapAtOpen:
        _SwapAtOpen.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        _SwapAtOpen.active = None

    @staticmethod
    def hook(event: str, args: tuple) -> None:
        swap = _SwapAtOpen.active
        if swap is None or event != 'open' or not isinstance(args[0], (str, os.PathLike)):
            return
        if os.path.normpath(os.fspath(args[0])) != swap.path:
            return
        swap.seen += 1
        if swap.seen == swap.n and not swap.swapped:
            swap.swapped = True
            os.unlink(swap.path)
            os.mkfifo(swap.path)


sys.addaudithook(_SwapAtOpen.hook)


@pytest.mark.parametrize('state', STATES)
@pytest.mark.parametrize('name', SPATIAL_FORMATS)
def test_a_fifo_swapped_in_at_any_open_never_blocks_a_resolution(name, state, tmp_path, store):
    """Every file of every format, swapped for a FIFO at the n-th open of a resolution,
    for every n: never hung, never handed out; a clear error or the image's own voxels
    written (a header swapped after its image was read into memory). Without the core's
    own opens, nibabel blocks opening the FIFO (a dirty image's voxels, a cache's
    comparison, a PAR/REC, AFNI or MINC1 reference load)."""
    for index in range(len(build_format(name, tmp_path / 'probe').files)):
        for n in range(1, 40):
            case, img, want = _case(name, tmp_path / f'{index}-{n}', state)
            swapped = case.files[index]
            with no_hang(), _SwapAtOpen(swapped, n) as swap:
                try:
                    handed = nt.resolve(img)
                except nt.ImageReadError as err:
                    handed = err
            if not swap.swapped:  # resolving opened the file fewer than n times
                assert isinstance(handed, nt.Resolution), handed
                if handed.action == 'original':  # (a MINC1 image is dirty after utime)
                    assert state != 'dirty' and handed.path in map(str, case.files), handed
                else:
                    assert_same_bits(nib.load(handed.path).get_fdata(), want)
                break
            _assert_handed_well(handed, img, want, swapped)
            with no_hang():
                reason = nt.dirty_reason(img)
            assert reason is not None and (state == 'dirty' or str(swapped) in reason), reason
        else:
            raise AssertionError(f'{name}: more than 40 opens of {swapped} in one resolution')


QUESTIONS_BLIND = {
    'dirty_reason': nt.dirty_reason,
    'resolve': nt.resolve,
    'resolve_memoised': nt.resolve_memoised,
    'image_digest': nt.image_digest,
    'deepcopy': copy.deepcopy,
}


@pytest.fixture
def blind_stat_guards(monkeypatch):
    """Every stat the core makes to refuse a FIFO before opening a file, made to pass:
    as when a FIFO is swapped in between that stat and the open."""
    import nipype_nibtrack

    for module in list(sys.modules.values()):
        name = getattr(module, '__name__', '') or ''
        guarded = name.startswith('nipype_nibtrack.') and hasattr(module, 'not_regular')
        if guarded and name != 'nipype_nibtrack.fileid':  # open_regular's fstat stays
            monkeypatch.setattr(module, 'not_regular', lambda path: None)
    assert nipype_nibtrack.rules.not_regular('/dev/null') is None


@pytest.mark.parametrize('question', list(QUESTIONS_BLIND))
@pytest.mark.parametrize('state', STATES)
@pytest.mark.parametrize('name', SPATIAL_FORMATS)
def test_a_fifo_behind_every_stat_guard_never_blocks(
    name, state, question, tmp_path, store, blind_stat_guards
):
    """A FIFO at a file's path that every stat guard missed: what the core then opens,
    it opens itself, so each question ends in a dirty verdict, a clear error or the
    image's own voxels written, never a hang (nibabel, opening by name, blocks). A file
    the check does not read (a pair's or AFNI's data, behind its header) may still get
    a clean verdict: as if the FIFO had come just after it, which no check can tell."""
    for index in range(len(build_format(name, tmp_path / 'probe').files)):
        case, img, want = _case(name, tmp_path / str(index), state)
        swapped = case.files[index]
        swapped.unlink()
        os.mkfifo(swapped)
        with no_hang():
            try:
                answer = QUESTIONS_BLIND[question](img)
            except OSError as err:  # ImageReadError, NotRegularFile, a copy's ESTALE
                assert any(str(p) in str(err) for p in case.files), err
                continue
        if question == 'dirty_reason':
            assert answer is None or isinstance(answer, str), answer
        elif question == 'resolve' or question == 'resolve_memoised':
            _assert_handed_well(answer, img, want, swapped, original=True)
        elif question == 'image_digest':  # of what the image holds: cache, open handle
            assert isinstance(answer, str) and len(answer) == 32, answer
        else:  # a copy, asked as the image was (a clean verdict: see above)
            with no_hang():
                assert nt.dirty_reason(answer) == nt.dirty_reason(img)


@pytest.mark.parametrize('name', SPATIAL_FORMATS)
def test_the_core_loads_what_nibabel_loads_and_never_a_fifo(name, tmp_path):
    """load_opened (the reference load of every rule) gives what nibabel's own load
    gives: header, affine, where the data object reads from, the data; and a FIFO at
    any of the files is a clear NotRegularFile, never a hang (MINC2 through h5py)."""
    case = build_format(name, tmp_path)
    own = nib.load(case.path)
    paths = binding_of(nt.load(case.path)).paths
    with load_opened(type(own), paths) as fresh:
        got, want = snapshot(fresh), snapshot(own)
        assert got.header == want.header
        assert (got.extensions, got.affine) == (want.extensions, want.affine)
        assert (got.proxy is None) == (want.proxy is None)
        assert got.proxy is None or got.proxy.same_source(want.proxy), (got.proxy, want.proxy)
        assert_same_bits(np.asanyarray(fresh.dataobj), np.asanyarray(own.dataobj))
    for path in case.files:
        kept = path.with_name(path.name + '.kept')
        path.rename(kept)
        os.mkfifo(path)
        with (
            no_hang(),
            pytest.raises(NotRegularFile, match='FIFO') as err,
            load_opened(type(own), paths),
        ):
            pass
        assert str(path) in str(err.value)
        path.unlink()
        kept.rename(path)


@pytest.mark.parametrize('name', ['minc1', 'minc2', 'minc2_small', 'parrec'])
def test_copies_of_images_holding_their_file_reload_it_through_the_core(name, tmp_path):
    """MINC and PAR/REC data objects hold their file: a copy re-opens it (copies.py),
    through descriptors the core opened; the copy reads the same voxels and is clean."""
    case = build_format(name, tmp_path)
    img = nt.load(case.path)
    twin = copy.deepcopy(img)
    assert twin.dataobj is not img.dataobj
    assert_same_bits(np.asanyarray(twin.dataobj), np.asanyarray(img.dataobj))
    assert nt.dirty_reason(twin) is None
    assert_same_bits(np.asanyarray(copy.deepcopy(twin).dataobj), np.asanyarray(img.dataobj))
