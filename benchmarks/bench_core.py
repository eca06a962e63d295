"""Benchmark of the core: as_filename, image_digest and the store against nibabel/joblib.

Run ``python benchmarks/bench_core.py`` (optionally ``--quick`` for sizes up to 128^3).
Every ratio is measured in this run, on this machine, as a ratio of medians of several
repeats; nothing is compared with numbers from elsewhere. Prints a table, exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import joblib
import nibabel as nib
import numpy as np

import nipype_nibtrack as nt
from nipype_nibtrack.store import Store

ROWS: list[tuple[str, str, str, str]] = []


def median_time(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None):
    """Median wall time of ``fn()`` over ``repeats`` runs (``setup()`` untimed before each)."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f'{seconds * 1e6:.1f} us'
    if seconds < 1:
        return f'{seconds * 1e3:.1f} ms'
    return f'{seconds:.2f} s'


def row(what: str, ours: str, theirs: str, ratio: str) -> None:
    ROWS.append((what, ours, theirs, ratio))
    print(f'  {what:<58} {ours:>12} {theirs:>12} {ratio:>14}', flush=True)


def volume(n: int, smooth: bool) -> np.ndarray:
    """An n^3 float32 volume: noise, or a smooth field (compresses like real images)."""
    if not smooth:
        return np.random.default_rng(n).standard_normal((n, n, n), dtype=np.float32)
    axis = np.linspace(-1, 1, n, dtype=np.float32)
    x, y, z = np.meshgrid(axis, axis, axis, indexing='ij', sparse=True)
    return (1000 * np.exp(-(x * x + 2 * y * y + 3 * z * z))).astype(np.float32)


def clean_as_filename(work: Path, sizes: list[int]) -> None:
    print('\nas_filename of a clean loaded image vs nib.save of it to a temp file')
    for ext in ('.nii', '.nii.gz'):
        images, colds, saves = {}, {}, {}
        store = Store(work / f'store-clean{ext}')
        for n in sizes:
            src = work / f'clean{n}{ext}'
            nib.save(nib.Nifti1Image(volume(n, ext == '.nii.gz'), np.eye(4)), src)
            img = images[n] = nt.load(src)
            start = time.perf_counter()
            assert nt.as_filename(img, store=store) == str(src)  # first call reads the header
            colds[n] = time.perf_counter() - start
            # nib.save re-points the image it saves at the new file: save a twin
            twin, out = nib.load(src), work / f'saved{ext}'
            saves[n] = median_time(lambda t=twin, out=out: nib.save(t, out), 3 if n >= 256 else 5)
        # Sizes interleaved, so that drift of the machine hits all of them alike
        warm: dict[int, list[float]] = {n: [] for n in sizes}
        for _ in range(300):
            for n in sizes:
                start = time.perf_counter()
                nt.as_filename(images[n], store=store)
                warm[n].append(time.perf_counter() - start)
        assert store.info().entries == 0, 'a clean image was written'
        medians = {n: statistics.median(times) for n, times in warm.items()}
        for n in sizes:
            row(
                f'{ext} {n}^3 as_filename (warm; first call {fmt(colds[n])})',
                fmt(medians[n]),
                fmt(saves[n]),
                f'{saves[n] / medians[n]:,.0f}x faster',
            )
        flat = max(medians.values()) / min(medians.values())
        row(
            f'{ext} as_filename flatness {min(sizes)}^3..{max(sizes)}^3 (max/min)',
            '',
            '',
            f'{flat:.2f}',
        )


def digest_vs_joblib(n: int) -> None:
    print('\nimage_digest of an in-memory image vs joblib.hash of its array')
    data = volume(n, smooth=False)
    img = nib.Nifti1Image(data, np.eye(4))
    ours = median_time(lambda: nt.image_digest(img), 7)
    theirs = median_time(lambda: joblib.hash(data), 5)
    row(f'{n}^3 float32', fmt(ours), fmt(theirs), f'{theirs / ours:,.1f}x faster')


def dirty_as_filename(work: Path, n: int) -> None:
    print('\nas_filename of a dirty image vs nib.save of it to .nii (fresh store each time)')
    data = volume(n, smooth=False)
    img = nib.Nifti1Image(data, np.eye(4))
    # nib.save re-points an image's file_map at what it wrote (which would then be
    # clean): the baseline saves a twin object with the same content
    twin = nib.Nifti1Image(data, np.eye(4))
    out = work / 'naive.nii'
    counter = iter(range(10**6))
    stores: list[Store] = []

    def fresh_store() -> None:
        for old in stores:
            shutil.rmtree(old.root, ignore_errors=True)
        stores[:] = [Store(work / f'store-dirty{next(counter)}')]

    first = median_time(lambda: nt.as_filename(img, store=stores[0]), 5, setup=fresh_store)
    save = median_time(lambda: nib.save(twin, out), 5)
    row(
        f'in-memory {n}^3: first call (written)',
        fmt(first),
        fmt(save),
        f'{first / save:.2f}x nib.save',
    )
    again = median_time(lambda: nt.as_filename(img, store=stores[0]), 20)
    assert nt.resolve(img, store=stores[0]).action == 'reused'
    assert img.get_filename() is None
    row(
        f'in-memory {n}^3: second call (reused) vs first',
        fmt(again),
        fmt(first),
        f'{first / again:,.0f}x faster',
    )

    src = work / f'proxy{n}.nii'
    nib.save(img, src)
    loaded, twin = nt.load(src), nt.load(src)
    loaded.header['descrip'] = twin.header['descrip'] = b'edited header'
    first = median_time(lambda: nt.as_filename(loaded, store=stores[0]), 5, setup=fresh_store)
    save = median_time(lambda: nib.save(twin, out), 5)
    row(
        f'loaded {n}^3, header edited: first call',
        fmt(first),
        fmt(save),
        f'{first / save:.2f}x nib.save',
    )
    again = median_time(lambda: nt.as_filename(loaded, store=stores[0]), 20)
    row(
        f'loaded {n}^3, header edited: second call vs first',
        fmt(again),
        fmt(first),
        f'{first / again:,.0f}x faster',
    )
    fresh_store()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--quick', action='store_true', help='sizes up to 128^3 only')
    args = parser.parse_args(argv)
    sizes = [32, 64, 128] if args.quick else [32, 64, 128, 256]
    big = sizes[-1]
    print(
        f'nipype_nibtrack {nt.__version__}, nibabel {nib.__version__}, numpy {np.__version__}, '
        f'joblib {joblib.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs'
    )
    print(f'  {"measurement":<58} {"nibtrack":>12} {"baseline":>12} {"ratio":>14}')
    with tempfile.TemporaryDirectory(prefix='nibtrack-bench-') as tmp:
        work = Path(tmp)
        clean_as_filename(work, sizes)
        digest_vs_joblib(big)
        dirty_as_filename(work, big)
    return 0


if __name__ == '__main__':
    sys.exit(main())
