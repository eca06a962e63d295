"""Benchmark of the core: as_filename, image_digest and the store against nibabel/joblib.

Run ``python benchmarks/bench_core.py`` (optionally ``--quick`` for sizes up to 128^3).
Every ratio is measured in this run, on this machine, as a ratio of medians of several
repeats; nothing is compared with numbers from elsewhere. Prints a table, exits 0.

The ``measure_*`` functions return the numbers; ``benchmarks/plots.py`` plots them for
the documentation.
"""

from __future__ import annotations

import argparse
import hashlib
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
from timing import timings

import nipype_nibtrack as nt
from nipype_nibtrack.provenance import file_paths
from nipype_nibtrack.store import Store

SETTLE_SECONDS = 1.2  # > nipype_nibtrack.fileid.RACY_NS
ROWS: list[tuple[str, str, str, str]] = []


def median_time(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None):
    """Median wall time of ``fn()`` over ``repeats`` runs (``setup()`` untimed before each)."""
    return statistics.median(timings(fn, repeats, setup))


def fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f'{seconds * 1e6:.1f} us'
    if seconds < 1:
        return f'{seconds * 1e3:.1f} ms'
    return f'{seconds:.2f} s'


def row(what: str, ours: str, theirs: str, ratio: str) -> None:
    ROWS.append((what, ours, theirs, ratio))
    print(f'  {what:<58} {ours:>12} {theirs:>12} {ratio:>14}', flush=True)


def settle() -> None:
    """Wait until files just written are a second old, as a user's input files are.

    Identities of files modified in the last second are not memoised (a same-size
    rewrite within one clock tick would leave them unchanged): until then every check
    re-reads the header, and every reuse of a store entry re-hashes it.
    """
    time.sleep(SETTLE_SECONDS)


def volume(n: int, smooth: bool) -> np.ndarray:
    """An n^3 float32 volume: noise, or a smooth field (compresses like real images)."""
    if not smooth:
        return np.random.default_rng(n).standard_normal((n, n, n), dtype=np.float32)
    axis = np.linspace(-1, 1, n, dtype=np.float32)
    x, y, z = np.meshgrid(axis, axis, axis, indexing='ij', sparse=True)
    return (1000 * np.exp(-(x * x + 2 * y * y + 3 * z * z))).astype(np.float32)


def measure_clean_as_filename(
    work: Path, sizes: list[int], exts: tuple[str, ...] = ('.nii', '.nii.gz'), warm_repeats=300
) -> dict[str, dict[int, dict[str, float]]]:
    """Clean ``as_filename`` against ``nib.save`` of the same image to a temporary file.

    Returns ``{ext: {n: {'warm': s, 'first': s, 'save': s}}}``: the median time of a
    repeated call, the time of the first call after loading, and the median time of
    ``nib.save`` to a new file (an image of ``n^3`` float32 voxels; ``.nii.gz`` files hold
    a smooth field, which compresses like real images).
    """
    results: dict[str, dict[int, dict[str, float]]] = {}
    for ext in exts:
        images, colds, saves = {}, {}, {}
        store = Store(work / f'store-clean{ext}')
        for n in sizes:
            nib.save(
                nib.Nifti1Image(volume(n, ext == '.nii.gz'), np.eye(4)), work / f'clean{n}{ext}'
            )
        settle()
        for n in sizes:
            src = work / f'clean{n}{ext}'
            img = images[n] = nt.load(src)
            start = time.perf_counter()
            assert nt.as_filename(img, store=store) == str(src)  # first call reads the header
            colds[n] = time.perf_counter() - start
            # nib.save re-points the image it saves at the new file: save a twin
            twin, out = nib.load(src), work / f'saved{ext}'
            saves[n] = median_time(lambda t=twin, out=out: nib.save(t, out), 3 if n >= 256 else 5)
        # Sizes interleaved, so that drift of the machine hits all of them alike
        warm: dict[int, list[float]] = {n: [] for n in sizes}
        for _ in range(warm_repeats):
            for n in sizes:
                start = time.perf_counter()
                nt.as_filename(images[n], store=store)
                warm[n].append(time.perf_counter() - start)
        assert store.info().entries == 0, 'a clean image was written'
        results[ext] = {
            n: {'warm': statistics.median(warm[n]), 'first': colds[n], 'save': saves[n]}
            for n in sizes
        }
    return results


def clean_as_filename(work: Path, sizes: list[int]) -> None:
    print('\nas_filename of a clean loaded image vs nib.save of it to a temp file')
    for ext, by_size in measure_clean_as_filename(work, sizes).items():
        for n, t in by_size.items():
            row(
                f'{ext} {n}^3 as_filename (warm; first call {fmt(t["first"])})',
                fmt(t['warm']),
                fmt(t['save']),
                f'{t["save"] / t["warm"]:,.0f}x faster',
            )
        medians = [t['warm'] for t in by_size.values()]
        row(
            f'{ext} as_filename flatness {min(sizes)}^3..{max(sizes)}^3 (max/min)',
            '',
            '',
            f'{max(medians) / min(medians):.2f}',
        )


def measure_digest(n: int, *, md5: bool = False) -> dict[str, float]:
    """Median seconds to digest an in-memory ``n^3`` float32 image: ``image_digest``, and
    ``joblib.hash`` of its array (and ``hashlib.md5`` of its bytes with ``md5``)."""
    data = volume(n, smooth=False)
    img = nib.Nifti1Image(data, np.eye(4))
    # small arrays: more repeats, so that timer resolution and noise do not dominate
    repeats = max(9, min(101, (64 << 20) // data.nbytes))
    slow = max(7, repeats // 2)
    out = {
        'bytes': data.nbytes,
        'image_digest': median_time(lambda: nt.image_digest(img), repeats),
        'joblib.hash': median_time(lambda: joblib.hash(data), slow),
    }
    if md5:
        out['hashlib.md5'] = median_time(lambda: hashlib.md5(data).digest(), slow)
    return out


def digest_vs_joblib(n: int) -> None:
    print('\nimage_digest of an in-memory image vs joblib.hash of its array')
    t = measure_digest(n)
    ours, theirs = t['image_digest'], t['joblib.hash']
    row(f'{n}^3 float32', fmt(ours), fmt(theirs), f'{theirs / ours:,.1f}x faster')


def measure_dirty_as_filename(work: Path, n: int) -> dict[str, float]:
    """Dirty ``as_filename`` (written to a fresh store, then reused) against ``nib.save``.

    Median seconds for an in-memory ``n^3`` float32 image (``memory_*``) and for a loaded
    one with an edited header (``header_*``): ``*_first`` writes it to a fresh store,
    ``*_again`` finds it there, ``*_save`` is ``nib.save`` of a twin to ``.nii``.
    """
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

    result = {}
    result['memory_first'] = median_time(
        lambda: nt.as_filename(img, store=stores[0]), 5, setup=fresh_store
    )
    result['memory_save'] = median_time(lambda: nib.save(twin, out), 5)
    settle()  # a later run: the entry is a second old
    result['memory_again'] = median_time(lambda: nt.as_filename(img, store=stores[0]), 20)
    assert nt.resolve(img, store=stores[0]).action == 'reused'
    assert img.get_filename() is None

    src = work / f'proxy{n}.nii'
    nib.save(img, src)
    settle()
    loaded, twin = nt.load(src), nt.load(src)
    loaded.header['descrip'] = twin.header['descrip'] = b'edited header'
    result['header_first'] = median_time(
        lambda: nt.as_filename(loaded, store=stores[0]), 5, setup=fresh_store
    )
    result['header_save'] = median_time(lambda: nib.save(twin, out), 5)
    settle()
    result['header_again'] = median_time(lambda: nt.as_filename(loaded, store=stores[0]), 20)
    fresh_store()
    return result


def dirty_as_filename(work: Path, n: int) -> None:
    print('\nas_filename of a dirty image vs nib.save of it to .nii (fresh store each time)')
    t = measure_dirty_as_filename(work, n)
    first, save, again = t['memory_first'], t['memory_save'], t['memory_again']
    row(
        f'in-memory {n}^3: first call (written)',
        fmt(first),
        fmt(save),
        f'{first / save:.2f}x nib.save',
    )
    row(
        f'in-memory {n}^3: second call (reused) vs first',
        fmt(again),
        fmt(first),
        f'{first / again:,.0f}x faster',
    )
    first, save, again = t['header_first'], t['header_save'], t['header_again']
    row(
        f'loaded {n}^3, header edited: first call',
        fmt(first),
        fmt(save),
        f'{first / save:.2f}x nib.save',
    )
    row(
        f'loaded {n}^3, header edited: second call vs first',
        fmt(again),
        fmt(first),
        f'{first / again:,.0f}x faster',
    )


def _format_samples(folder: Path) -> dict[str, str]:
    """One image of every format family with a cleanliness rule, written in ``folder``.

    Files nibabel ships (``nibabel.testing.data_path``) are copied; the pair formats,
    which it ships no image file for, are saved with the data of ``anatomical.nii``.
    """
    from nibabel.testing import data_path

    folder.mkdir(parents=True)
    anat = nib.load(os.path.join(data_path, 'anatomical.nii'))
    data = np.asanyarray(anat.dataobj)
    sources: dict[str, list[str] | tuple[type, str]] = {
        'NIfTI-1 .nii': ['anatomical.nii'],
        'NIfTI-1 .nii.gz': ['example4d.nii.gz'],
        'NIfTI-1 pair .hdr/.img': (nib.Nifti1Pair, 'pair.img'),
        'NIfTI-2 .nii.gz': ['example_nifti2.nii.gz'],
        'Analyze .hdr/.img': (nib.AnalyzeImage, 'analyze.img'),
        'SPM2 .hdr/.img/.mat': (nib.Spm2AnalyzeImage, 'spm2.img'),
        'MGH .mgz': ['test.mgz'],
        'MINC1 .mnc': ['minc1_1_scale.mnc'],
        'MINC2 .mnc': ['minc2_1_scale.mnc'],
        'PAR/REC': ['phantom_EPI_asc_CLEAR_2_1.PAR', 'phantom_EPI_asc_CLEAR_2_1.REC'],
        'AFNI .HEAD/.BRIK.gz': ['example4d+orig.HEAD', 'example4d+orig.BRIK.gz'],
        'CIFTI-2 .dconn.nii': ['row_major.dconn.nii'],
    }
    samples = {}
    for label, source in sources.items():
        if isinstance(source, tuple):
            klass, name = source
            nib.save(klass(data, anat.affine), folder / name)
        else:
            for file in source:
                shutil.copy(os.path.join(data_path, file), folder)
            name = source[0]
        samples[label] = str(folder / name)
    return samples


def measure_formats(work: Path, repeats: int = 7, calls: int = 200) -> dict[str, dict]:
    """Cost of deciding clean or dirty, per format: ``{label: {first, later, files}}``.

    ``first``: median over ``repeats`` fresh copies of the files of the first
    ``dirty_reason`` after ``nipype_nibtrack.load`` (it parses the file's header; the
    result is memoised per file identity). ``later``: median of ``calls`` later checks
    of one image. ``files``: the names of the image's files, ``loaded`` the one given to
    ``load``, ``bytes`` their total size.
    """
    copies = [_format_samples(work / f'formats{i}') for i in range(repeats)]
    settle()
    firsts: dict[str, list[float]] = {label: [] for label in copies[0]}
    images = {}
    for samples in copies:
        for label, path in samples.items():
            img = images[label] = nt.load(path)
            start = time.perf_counter()
            reason = nt.dirty_reason(img)
            firsts[label].append(time.perf_counter() - start)
            assert reason is None, f'{label}: {reason}'
    out = {}
    for label, img in images.items():
        later = median_time(lambda img=img: nt.dirty_reason(img), calls)
        files = [Path(f) for f in file_paths(img).values() if os.path.exists(f)]
        out[label] = {
            'first': statistics.median(firsts[label]),
            'later': later,
            'files': sorted(f.name for f in files),
            'loaded': Path(copies[-1][label]).name,
            'bytes': sum(f.stat().st_size for f in files),
        }
    return out


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
