"""How close the core comes to the physical floor (issue 12), every row measured in one run.

Run ``python benchmarks/bench_limits.py`` (``--quick``: 64 MiB instead of 256 MiB, no
2 GiB scale rows; ``--no-reruns``: skip the nipype workflow rows; ``--only reruns``: only
them; ``--idle-thread``: with one more Python thread alive and idle, as in a MultiProc
parent or a Jupyter kernel). Each row prints as
``what: ours, floor, ratio, goal``; the floor is measured in the same run on the same
bytes. Memory rows run in a fresh subprocess and read its peak RSS (``VmHWM``, reset to
the resident size just before the measured call: a child's ``ru_maxrss`` starts at its
parent's peak, since it survives ``exec``).
Exits 0 whatever the numbers: a benchmark reports, it does not fail on a noisy machine.
The clean-resolution rows are in ``benchmarks/bench_clean.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import xxhash
from timing import idle_thread, timings

import nipype_nibtrack as nt
from nipype_nibtrack import digest as digest_mod

ROWS: list[dict] = []


def best(fn, repeats: int = 3, setup=None) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs (``setup()`` untimed before each)."""
    return min(timings(fn, repeats, setup))


def fmt(value: float, unit: str) -> str:
    if unit == 's':
        return f'{value * 1e3:.1f} ms' if value < 1 else f'{value:.2f} s'
    return f'{value / 2**20:.0f} MiB'


def row(what: str, ours: float, floor: float | None, goal: str, unit: str = 's') -> None:
    ratio = None if not floor else ours / floor
    ROWS.append({'what': what, 'ours': ours, 'floor': floor, 'ratio': ratio, 'goal': goal})
    shown = '-' if floor is None else fmt(floor, unit)
    ratio_text = '-' if ratio is None else f'{ratio:.2f}x'
    print(f'{what}: {fmt(ours, unit)}, {shown}, {ratio_text}, {goal}', flush=True)


def forget() -> None:
    digest_mod._proxy_digests = digest_mod._Memo()


def xxh3_file(path: Path) -> str:
    hasher = xxhash.xxh3_128()
    buffer = memoryview(bytearray(1 << 22))
    with open(path, 'rb', buffering=0) as f:
        while n := f.readinto(buffer):
            hasher.update(buffer[:n])
    return hasher.hexdigest()


def digests(work: Path, mib: int) -> None:
    n = round((mib * 2**20 / 4 / 16) ** (1 / 3))
    data = np.random.default_rng(0).random((n, n, n, 16), dtype=np.float32)
    floor = best(lambda: xxhash.xxh3_128(data).hexdigest(), repeats=7)
    c_img = nib.Nifti1Image(data, np.eye(4))
    f_img = nib.Nifti1Image(np.asfortranarray(data), np.eye(4))
    row(
        f'image_digest, in-memory Fortran-ordered {mib} MiB',
        best(lambda: nt.image_digest(f_img), repeats=7),
        floor,
        '<= 2x xxh3-128 of the bytes',
    )
    row(
        f'image_digest, in-memory C-ordered {mib} MiB',
        best(lambda: nt.image_digest(c_img), repeats=5),
        floor,
        '<= 2x xxh3-128 of the bytes',
    )
    path = work / 'file.nii'
    nib.save(f_img, path)
    img = nib.load(path)
    img.header['descrip'] = b'edited'  # dirty: its digest reads the voxels
    row(
        f'image_digest, file-backed {mib} MiB (page cache)',
        best(lambda: nt.image_digest(img), repeats=7, setup=forget),
        best(lambda: xxh3_file(path), repeats=7),
        '<= 2x read + xxh3 of the file',
    )


def dirty_write(work: Path, mib: int) -> None:
    n = round((mib * 2**20 / 4) ** (1 / 3))
    values = np.random.default_rng(1).random((n, n, n), dtype=np.float32)
    root = work / 'store'
    target = work / 'save.nii'

    def fresh() -> None:
        # a new entry in an existing store, as in use (not a new store's folders)
        shutil.rmtree(root / 'objects', ignore_errors=True)
        target.unlink(missing_ok=True)

    for order in ('C', 'F'):
        data = np.asarray(values, order=order)
        img = nib.Nifti1Image(data, np.eye(4))
        ours = best(
            lambda img=img: nt.as_filename(img, store=nt.Store(root)), repeats=5, setup=fresh
        )
        # a new image each time: nib.save re-points the image it saves at the new file
        theirs = best(
            lambda d=data: nib.save(nib.Nifti1Image(d, np.eye(4)), target), repeats=5, setup=fresh
        )
        what = f'dirty as_filename, in-memory {n}^3 float32 ({order} order), first call'
        row(what, ours, theirs, '<= 0.8x nib.save')


_PEAK = """
import json, os, sys, time
import numpy as np, nibabel as nib, nipype_nibtrack as nt
mode, path, work = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == 'dirty-memory':
    data = np.ones(int(path) // 4, 'f4').reshape(-1, 256, 256, order='F')
    img = nib.Nifti1Image(data, np.eye(4))
else:
    img = nib.load(path)
    img.header['descrip'] = b'edited'
def status(key):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
# ru_maxrss survives exec (a child of a big process starts with its parent's peak):
# reset this process's high-water mark to what is resident now, then read VmHWM
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
base = status('VmRSS:')
start = time.perf_counter()
if mode == 'digest':
    nt.image_digest(img)
else:
    nt.as_filename(img, store=nt.Store(work))
took = time.perf_counter() - start
peak = status('VmHWM:')
print(json.dumps({'seconds': took, 'extra': max(0, peak - base), 'base': base}))
"""


def peak(mode: str, path: str, work: Path) -> dict:
    out = subprocess.run(
        [sys.executable, '-c', _PEAK, mode, path, str(work)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        print(out.stderr, file=sys.stderr)
        return {'seconds': float('nan'), 'extra': float('nan')}
    return json.loads(out.stdout)


def big_file(work: Path, nbytes: int) -> Path:
    path = work / f'big{nbytes >> 20}.nii'
    shape = (256, 256, nbytes // (256 * 256 * 4))
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    with open(path, 'wb') as f:
        hdr.write_to(f)
        f.write(b'\0' * (int(hdr.get_data_offset()) - f.tell()))
        block = np.random.default_rng(2).random(1 << 22, dtype=np.float32).tobytes()
        left = nbytes
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))
    return path


def memory(work: Path) -> None:
    gib = 1 << 30
    r = peak('dirty-memory', str(gib), work / 'store-mem')
    row('peak RSS of as_filename, dirty in-memory 1 GiB', r['extra'], None, '<= 64 MiB', 'b')
    path = big_file(work, gib)
    r = peak('digest', str(path), work)
    row('peak RSS of image_digest, file-backed 1 GiB', r['extra'], None, '< 128 MiB', 'b')
    path.unlink()
    shutil.rmtree(work / 'store-mem', ignore_errors=True)


def scale(work: Path) -> None:
    path = big_file(work, 2 << 30)
    nbytes = os.path.getsize(path)
    read = best(lambda: xxh3_file(path), repeats=1)
    r = peak('digest', str(path), work)
    row('image_digest, file-backed 2 GiB: time', r['seconds'], read, 'linear; read + xxh3')
    row('image_digest, file-backed 2 GiB: peak RSS', r['extra'], None, 'flat', 'b')
    r = peak('dirty-file', str(path), work / 'store-big')
    copy = work / 'copy.nii'
    start = time.perf_counter()
    shutil.copyfile(path, copy)
    cp = time.perf_counter() - start
    row('dirty as_filename, file-backed 2 GiB: time', r['seconds'], cp, 'linear; a file copy')
    row('dirty as_filename, file-backed 2 GiB: peak RSS', r['extra'], None, 'flat', 'b')
    print(f'  ({nbytes / 2**30:.1f} GiB file)')
    for p in (path, copy):
        p.unlink(missing_ok=True)
    shutil.rmtree(work / 'store-big', ignore_errors=True)


def reruns(work: Path, nodes: int = 20, n: int = 64, rounds: int = 25) -> None:
    """Cached reruns of ``nodes`` image-aware nodes, against the same workflow given paths.

    The three workflows (paths, clean images, dirty images) are run once, then rerun in
    turn ``rounds`` times; each row is the best rerun of its workflow, so a burst of load
    on a shared machine hits all three alike. Reruns start after the racy window (1 s) has passed
    since the first run wrote its store entries, as a real rerun does; the store
    re-hashes younger entries at every lookup, by design.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_nipype
    from nipype import config

    config.set('execution', 'hash_method', 'timestamp')
    base = work / 'reruns'
    base.mkdir()
    paths = []
    for i, img in enumerate(bench_nipype.images(nodes, (n, n, n))):
        paths.append(str(base / f'input{i}.nii'))
        nib.save(img, paths[-1])
    time.sleep(1.2)  # settled files, as a user's inputs are
    aware = nt.accept_images(bench_nipype.Smooth)
    dirty_imgs = [nib.load(p) for p in paths]
    for img in dirty_imgs:
        img.header['descrip'] = b'edited'  # dirty: header edited, data on disk
    workflows = {
        'paths': bench_nipype.workflow(base, 'paths', bench_nipype.Smooth, paths),
        'clean': bench_nipype.workflow(base, 'clean', aware, [nib.load(p) for p in paths]),
        'dirty': bench_nipype.workflow(base, 'dirty', aware, dirty_imgs),
    }
    for wf in workflows.values():
        wf.run()  # first run: every node runs, dirty images are written to the store
    time.sleep(1.2)
    times = {name: [] for name in workflows}
    for _ in range(rounds):
        for name, wf in workflows.items():
            times[name].append(best(wf.run, repeats=1))
    floor = min(times['paths'])
    row(f'cached rerun, {nodes} nodes, clean images', min(times['clean']), floor, '<= 1.15x paths')
    row(f'cached rerun, {nodes} nodes, dirty images', min(times['dirty']), floor, '<= 1.3x paths')


def measure(quick: bool = False, with_reruns: bool = True) -> list[dict]:
    """Every row, measured in this run; also printed as it is measured."""
    ROWS.clear()
    mib = 64 if quick else 256
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        steps = [lambda: digests(work, mib), lambda: dirty_write(work, 64)]  # 256^3
        steps.append(lambda: memory(work))
        if not quick:
            steps.append(lambda: scale(work))
        if with_reruns:
            steps.append(lambda: reruns(work))
        for step in steps:
            try:
                step()
            except Exception as err:  # report and go on: a benchmark never fails
                print(f'  (row failed: {type(err).__name__}: {err})')
    return list(ROWS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--no-reruns', action='store_true')
    parser.add_argument('--json', type=Path, help='write the rows here')
    parser.add_argument(
        '--only',
        choices=['memory', 'scale', 'reruns'],
        help='measure only these rows (and print them)',
    )
    parser.add_argument(
        '--idle-thread', action='store_true', help='with one more Python thread alive, idle'
    )
    args = parser.parse_args(argv)
    print('row: ours, floor, ratio, goal')
    with idle_thread(args.idle_thread):
        if args.only:
            with tempfile.TemporaryDirectory() as tmp:
                {'memory': memory, 'scale': scale, 'reruns': reruns}[args.only](Path(tmp))
        else:
            measure(args.quick, not args.no_reruns)
    if args.json:
        args.json.write_text(json.dumps(ROWS, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
