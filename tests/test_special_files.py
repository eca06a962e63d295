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
from nipype_nibtrack.store import Store


class Hung(BaseException):  # not an Exception: no handler of the core swallows it
    pass


@contextlib.contextmanager
def no_hang(seconds: int = 10) -> Iterator[None]:
    """Fail (instead of hanging) when the block takes longer than ``seconds``."""

    def alarm(signum: int, frame: object) -> None:
        raise Hung(f'blocked for {seconds} s: something opened a FIFO')

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
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
        if swap is None or event != 'open' or os.fspath(args[0]) != swap.path:
            return
        swap.seen += 1
        if swap.seen == swap.n and not swap.swapped:
            swap.swapped = True
            os.unlink(swap.path)
            os.mkfifo(swap.path)


sys.addaudithook(_SwapAtOpen.hook)


@pytest.mark.parametrize('ext', ['.nii', '.nii.gz', '.img', '.mgh', '.mgz'])
def test_a_fifo_swapped_in_at_any_open_of_a_check_never_blocks_it(ext, tmp_path, store):
    """Every file the cleanliness check opens, it opens itself (non-blocking, then
    fstat): nibabel reads the reference load from those descriptors. Swapped for a FIFO
    at the n-th open of a resolution, for every n: never hung, never handed out."""
    klass = {'.img': nib.Nifti1Pair, '.mgh': nib.MGHImage, '.mgz': nib.MGHImage}.get(
        ext, nib.Nifti1Image
    )
    for n in range(1, 16):
        folder = tmp_path / str(n)
        folder.mkdir()
        path = folder / f'brain{ext}'
        nib.save(klass(np.arange(24, dtype='f4').reshape(2, 3, 4), np.eye(4)), path)
        img = nt.load(path)
        os.utime(path)  # a new identity: no remembered verdict or reference
        with no_hang(), _SwapAtOpen(path, n) as swap:
            try:
                handed = nt.resolve(img)
            except nt.ImageReadError as err:
                handed = err
        if not swap.swapped:  # resolving opened the file fewer than n times
            assert isinstance(handed, nt.Resolution) and handed.action == 'original'
            break
        assert isinstance(handed, nt.ImageReadError), (n, handed)
        assert str(path) in str(handed)
        with no_hang():
            assert str(path) in nt.dirty_reason(img)
