"""Every lock of the package is taken afresh in a forked child (see nipype_nibtrack.locks)."""

from __future__ import annotations

import importlib
import os
import sys
import threading

import pytest

import nipype_nibtrack as nt
from nipype_nibtrack import locks
from nipype_nibtrack.digest import _Memo

_KINDS = tuple(locks._KINDS)


def _package_locks() -> dict[tuple[str, str], object]:
    """Every module-level lock of every module of the package, front-ends included."""
    for name in ('nipype_nibtrack.nipype', 'nipype_nibtrack.pydra'):
        importlib.import_module(name)
    found = {}
    for name, module in list(sys.modules.items()):
        if name == 'nipype_nibtrack' or name.startswith('nipype_nibtrack.'):
            for attr, value in list(vars(module).items()):
                if isinstance(value, _KINDS):
                    found[(name, attr)] = value
    return found


def test_every_module_lock_is_renewed_after_fork():
    """A module lock not listed with renew_after_fork would hang a forked child whenever
    another thread held it at fork(): every one is listed."""
    listed = {(namespace.get('__name__'), name) for namespace, name in locks._renewed}
    found = set(_package_locks())
    assert found, 'no lock found: the walk is broken'
    assert found <= listed, f'not renewed after fork: {sorted(found - listed)}'


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='no fork')
def test_a_child_forked_while_another_thread_holds_every_lock_answers(tmp_path):
    """Another thread holds every lock of the package (module locks and every memo's) at
    fork(): the child still takes each one, and answers."""
    import nibabel as nib
    import numpy as np

    path = tmp_path / 'img.nii'
    nib.save(nib.Nifti1Image(np.ones((2, 2, 2), 'f4'), np.eye(4)), path)
    img = nt.load(path)
    held = [*_package_locks().values(), *(memo._lock for memo in list(_Memo._every))]
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        for lock in held:
            lock.acquire()
        taken.set()
        release.wait()
        for lock in reversed(held):
            lock.release()

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: every lock free again, and an answer
            now = [*_package_locks().values(), *(memo._lock for memo in list(_Memo._every))]
            for lock in now:
                if not lock.acquire(timeout=5):
                    os._exit(3)
                lock.release()
            os._exit(0 if nt.as_filename(img) == str(path) else 4)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        holder.join()
    assert os.waitstatus_to_exitcode(status) == 0
    assert nt.as_filename(img) == str(path)
