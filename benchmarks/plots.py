"""Measure, then write the figures of the documentation's performance page.

Run ``python benchmarks/plots.py`` (a few minutes on 2 cores). It runs the measurements
of ``bench_core.py`` and ``bench_nipype.py`` and writes, in ``docs/_static/bench/``:

- ``results.json``: every number measured, with the machine and the date;
- ``summary.txt``: the same, as the table the performance page shows;
- ``formats.txt``: the cost of deciding clean or dirty per format (cleanliness page);
- ``resolution.png``: clean ``as_filename`` time against image size, beside the time of
  saving a temporary copy with ``nib.save`` (log scale);
- ``digest.png``: ``image_digest`` throughput beside ``joblib.hash`` and ``hashlib.md5``;
- ``workflow.png``: a workflow's first run and rerun, ours against saving to temporary
  files;
- ``pickles.png``: bytes pickled per node, ours against plain nipype (log scale).

Each figure states the machine (CPU model, cores, RAM) and the date it was measured.
``--replot`` redraws the figures and the summary from ``results.json`` without measuring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use('Agg')

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

plt.rcParams.update({'font.size': 10.5})

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / 'docs' / '_static' / 'bench'
SIZES = [32, 64, 128, 256]
DIGEST_SIZES = [32, 64, 128, 256]
DPI = 100
COMMAND = 'python benchmarks/plots.py'

OURS = '#1f5fa8'  # nipype_nibtrack
OURS_LIGHT = '#7fa7d6'
BASE = '#c0392b'  # the usual way / plain nipype
BASE_LIGHT = '#e59a8f'
GREY = '#7f7f7f'
X = '\N{MULTIPLICATION SIGN}'


# ------------------------------------------------------------------ the machine


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return ' '.join(line.split(':', 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemTotal:'):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float('nan')


def machine() -> dict:
    """What the numbers were measured on, and when."""
    import joblib
    import nibabel
    import nipype
    import numpy

    import nipype_nibtrack

    return {
        'date': datetime.date.today().isoformat(),
        'cpu': _cpu_model(),
        'cores': os.cpu_count(),
        'ram_gib': round(_ram_gib(), 1),
        'system': f'{platform.system()} {platform.release()}',
        'python': platform.python_version(),
        'versions': {
            'nipype_nibtrack': nipype_nibtrack.__version__,
            'nibabel': nibabel.__version__,
            'nipype': nipype.__version__,
            'numpy': numpy.__version__,
            'joblib': joblib.__version__,
        },
    }


def machine_line(m: dict) -> str:
    return (
        f'Measured {m["date"]} on {m["cpu"]}, {m["cores"]} cores, {m["ram_gib"]:.0f} GiB RAM '
        f'(shared machine; medians of repeats). Regenerate: {COMMAND}'
    )


# ------------------------------------------------------------------ measuring


def measure() -> dict:
    """Run every measurement; the code is that of bench_core.py and bench_nipype.py."""
    import bench_core
    import bench_nipype
    from nipype import config

    results: dict = {'machine': machine()}
    with tempfile.TemporaryDirectory(prefix='nibtrack-plots-') as tmp:
        work = Path(tmp)
        print('clean as_filename against nib.save ...', flush=True)
        results['resolution'] = bench_core.measure_clean_as_filename(work, SIZES)
        print('dirty as_filename against nib.save ...', flush=True)
        dirty = bench_core.measure_dirty_as_filename(work, SIZES[-1])
        results['dirty'] = {'n': SIZES[-1], **dirty}
        print('clean or dirty, per format ...', flush=True)
        results['formats'] = bench_core.measure_formats(work)
        print('digests ...', flush=True)
        results['digest'] = {n: bench_core.measure_digest(n, md5=True) for n in DIGEST_SIZES}
    import bench_limits

    print('against the physical floor (bench_limits) ...', flush=True)
    results['limits'] = bench_limits.measure()
    config.set('execution', 'hash_method', 'timestamp')
    try:
        print('workflow first run and rerun ...', flush=True)
        results['workflow'] = {
            'nodes': bench_nipype.N_NODES,
            'shape': list(bench_nipype.SHAPE),
            **bench_nipype.bench_reruns(),
        }
        print('pickle bytes per node ...', flush=True)
        pickles = bench_nipype.bench_pickles()
        results['pickles'] = {'shape': list(bench_nipype.BIG_SHAPE), **pickles}
        print('peak memory ...', flush=True)
        results['memory'] = bench_nipype.bench_memory()
    finally:
        shutil.rmtree(bench_nipype._TMP, ignore_errors=True)
    return results


def _int_keys(mapping: dict) -> dict:
    """JSON turned the sizes into strings: turn them back."""
    return {int(k): v for k, v in mapping.items()}


def load_results(path: Path) -> dict:
    results = json.loads(path.read_text())
    results['resolution'] = {ext: _int_keys(v) for ext, v in results['resolution'].items()}
    results['digest'] = _int_keys(results['digest'])
    return results


# ------------------------------------------------------------------ formatting


def fmt_time(seconds: float) -> str:
    """Seconds in the unit that reads best.

    >>> fmt_time(6.4e-5), fmt_time(0.0123), fmt_time(2.5)
    ('64 µs', '12.3 ms', '2.50 s')
    """
    if seconds < 1e-3:
        return f'{seconds * 1e6:.0f} µs'
    if seconds < 1:
        return f'{seconds * 1e3:.1f} ms'
    return f'{seconds:.2f} s'


def fmt_bytes(n: float) -> str:
    """Bytes, in decimal units.

    >>> fmt_bytes(612), fmt_bytes(67_110_000)
    ('612 B', '67.1 MB')
    """
    for unit in ('B', 'kB', 'MB', 'GB'):
        if n < 1000 or unit == 'GB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1000
    return str(n)


def _size_label(n: int) -> str:
    mib = n**3 * 4 / 2**20
    return f'{n}³\n{mib:g} MiB'


def _finish(fig, m: dict, path: Path) -> None:
    """Lay out, sign with the machine and date, save and close a figure."""
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.text(0.01, 0.01, machine_line(m), fontsize=8.5, color=GREY, ha='left', va='bottom')
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _tick_time(seconds: float, _pos: object = None) -> str:
    """A round number of seconds as a tick label.

    >>> _tick_time(1e-4), _tick_time(0.01), _tick_time(1.0)
    ('100 µs', '10 ms', '1 s')
    """
    for scale, unit in ((1, 's'), (1e-3, 'ms'), (1e-6, 'µs')):
        if seconds >= scale * 0.999:
            return f'{seconds / scale:.3g} {unit}'
    return f'{seconds * 1e9:.3g} ns'


def _tick_bytes(n: float, _pos: object = None) -> str:
    """A round number of bytes as a tick label.

    >>> _tick_bytes(100), _tick_bytes(1e4), _tick_bytes(1e9)
    ('100 B', '10 kB', '1 GB')
    """
    for scale, unit in ((1e9, 'GB'), (1e6, 'MB'), (1e3, 'kB')):
        if n >= scale * 0.999:
            return f'{n / scale:.3g} {unit}'
    return f'{n:.3g} B'


# ------------------------------------------------------------------ the figures


def plot_resolution(r: dict, path: Path) -> None:
    m, res = r['machine'], r['resolution']
    fig, axes = plt.subplots(1, len(res), figsize=(9.6, 4.8), sharey=True)
    for ax, (ext, by_size) in zip(axes, res.items(), strict=True):
        sizes = sorted(by_size)
        save = [by_size[n]['save'] for n in sizes]
        first = [by_size[n]['first'] for n in sizes]
        warm = [by_size[n]['warm'] for n in sizes]
        ax.plot(sizes, save, 'o--', color=BASE, lw=2, label='nib.save to a temporary file')
        ax.plot(
            sizes,
            first,
            's:',
            color=OURS_LIGHT,
            lw=1.5,
            label='as_filename, first call (parses the header)',
        )
        ax.plot(sizes, warm, 'o-', color=OURS, lw=2, label='as_filename, every later call')
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xticks(sizes, [_size_label(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlim(sizes[0] / 1.4, sizes[-1] * 1.4)
        ax.set_title(f'clean {ext} file', fontsize=11.5)
        ax.set_xlabel('image (float32 voxels)')
        ax.grid(True, which='major', alpha=0.3)
        n = sizes[-1]
        ratio = by_size[n]['save'] / by_size[n]['warm']
        ax.annotate(
            f'{ratio:,.0f}{X}\nless time',
            xy=(n, (by_size[n]['first'] * by_size[n]['warm']) ** 0.5),
            xytext=(-8, 0),
            textcoords='offset points',
            ha='right',
            va='center',
            fontsize=11,
            fontweight='bold',
            color=OURS,
        )
        ax.annotate(
            '',
            xy=(n, by_size[n]['warm'] * 1.15),
            xytext=(n, by_size[n]['save'] / 1.15),
            arrowprops={'arrowstyle': '<->', 'color': GREY},
        )
    axes[0].set_ylabel('time per image (log scale)')
    axes[0].yaxis.set_major_formatter(FuncFormatter(_tick_time))
    axes[0].legend(loc='upper left', fontsize=9.5, framealpha=0.95)
    fig.suptitle(
        'A clean image reaches the tool by its own path: no copy, no data read, '
        'the same cost at any size',
        fontsize=12.5,
    )
    _finish(fig, m, path)


def plot_digest(r: dict, path: Path) -> None:
    m, dig = r['machine'], r['digest']
    sizes = sorted(dig)
    fig, ax = plt.subplots(figsize=(8.6, 4.6))
    styles = {
        'image_digest': ('o-', OURS, 'image_digest (xxh3-128: header, affine, voxels)'),
        'joblib.hash': ('s--', BASE, 'joblib.hash of the array (md5)'),
        'hashlib.md5': ('^:', BASE_LIGHT, 'hashlib.md5 of the array bytes'),
    }
    big = sizes[-1]
    # the two md5-based lines end close together: put the higher label above
    low, high = sorted(
        ('joblib.hash', 'hashlib.md5'), key=lambda k: dig[big]['bytes'] / dig[big][k]
    )
    offsets = {'image_digest': 0, low: -7, high: 7}
    for key, (style, color, label) in styles.items():
        rates = [dig[n]['bytes'] / dig[n][key] / 1e9 for n in sizes]
        ax.plot(sizes, rates, style, color=color, lw=2, label=label)
        ax.annotate(
            f'{rates[-1]:.{1 if rates[-1] >= 10 else 2}f} GB/s',
            xy=(sizes[-1], rates[-1]),
            xytext=(8, offsets[key]),
            textcoords='offset points',
            va='center',
            fontsize=10,
            color=color,
        )
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xticks(sizes, [_size_label(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlim(sizes[0] / 1.3, sizes[-1] * 2.3)
    ax.set_ylim(0.2, 400)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    ax.set_ylabel('GB/s (log scale)')
    ax.set_xlabel('in-memory float32 image')
    ax.grid(True, which='major', alpha=0.3)
    ax.legend(loc='upper left', fontsize=10, framealpha=0.95)
    ratio = dig[big]['joblib.hash'] / dig[big]['image_digest']
    ax.set_title(
        f'Content digests of in-memory images: {ratio:.0f}{X} faster than joblib.hash at {big}³',
        fontsize=12.5,
    )
    _finish(fig, m, path)


def _goal_ratio(goal: str) -> float | None:
    """The ratio a goal names, if any.

    >>> _goal_ratio('<= 0.8x nib.save'), _goal_ratio('<= 2x xxh3-128'), _goal_ratio('flat')
    (0.8, 2.0, None)
    """
    for word in goal.split():
        if word.endswith('x'):
            try:
                return float(word[:-1])
            except ValueError:
                continue
    return None


def plot_limits(r: dict, path: Path) -> None:
    """Each bench_limits row with a floor: ours / floor, with the goal's ratio marked."""
    m = r['machine']
    rows = [x for x in r['limits'] if x.get('ratio')]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.8))
    ys = list(range(len(rows)))[::-1]
    goals = [_goal_ratio(x['goal']) for x in rows]
    for y, x, goal in zip(ys, rows, goals, strict=True):
        met = goal is None or x['ratio'] <= goal
        ax.barh(y, x['ratio'], color=OURS if met else BASE, height=0.6)
        ax.text(x['ratio'] * 1.08, y, f'{x["ratio"]:.2f}{X}', va='center', fontsize=9)
        if goal is not None:
            ax.plot([goal, goal], [y - 0.42, y + 0.42], color='black', lw=2)
    ax.set_yticks(ys, [x['what'] for x in rows], fontsize=9)
    ax.set_xscale('log')
    ax.set_xlim(0.3, max(x['ratio'] for x in rows) * 3)
    ax.axvline(1, color=GREY, lw=1, ls=':')
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}{X}'))
    ax.set_xlabel('ours / floor, both measured in this run (log scale); black: the goal')
    ax.set_title('Against the physical floor: blue meets its goal, red does not', fontsize=12.5)
    _finish(fig, m, path)


def limits_table(r: dict) -> str:
    """The bench_limits rows as text: what, ours, floor, ratio, goal."""
    lines = [f'{"row":<62} {"ours":>10} {"floor":>10} {"ratio":>8}  goal']
    for x in r['limits']:
        memory = 'RSS' in x['what']
        ours = fmt_bytes(x['ours']) if memory else fmt_time(x['ours'])
        floor = '-' if x['floor'] is None else fmt_time(x['floor'])
        ratio = '-' if x['ratio'] is None else f'{x["ratio"]:.2f}x'
        lines.append(f'{x["what"]:<62} {ours:>10} {floor:>10} {ratio:>8}  {x["goal"]}')
    lines.append('bench_limits: best of repeats; memory rows: peak RSS above what was resident')
    return '\n'.join(lines) + '\n' + machine_line(r['machine']) + '\n'


def _label_bars(ax, bars, texts, color='black', inside=False) -> None:
    """Write ``texts`` above the bars, or just inside their tops (in white)."""
    for bar, text in zip(bars, texts, strict=True):
        ax.annotate(
            text,
            xy=(bar.get_x() + bar.get_width() / 2, bar.get_height()),
            xytext=(0, -4 if inside else 3),
            textcoords='offset points',
            ha='center',
            va='top' if inside else 'bottom',
            fontsize=10,
            color='white' if inside else color,
            fontweight='bold' if inside else 'normal',
        )


def plot_workflow(r: dict, path: Path) -> None:
    m, w = r['machine'], r['workflow']
    fig, ax = plt.subplots(figsize=(8.6, 4.6))
    groups = ['first run', 'rerun, same images']
    x = [0, 1]
    width = 0.36
    usual = [w['usual_first_s'], w['usual_rerun_s']]
    ours = [w['ours_first_s'], w['ours_rerun_s']]
    b1 = ax.bar(
        [i - width / 2 for i in x],
        usual,
        width,
        color=BASE,
        label='the usual way: nib.save each image to a temporary file, then run',
    )
    b2 = ax.bar(
        [i + width / 2 for i in x],
        ours,
        width,
        color=OURS,
        label='nipype_nibtrack: pass the images themselves',
    )
    _label_bars(ax, b1, [f'{v:.2f} s' for v in usual])
    _label_bars(ax, b2, [f'{v:.2f} s' for v in ours], OURS)
    ax.annotate(
        f'every node cached:\n{w["rerun_pct_of_first"]:.1f}% of the first run,\n'
        f'{w["rerun_image_writes"]} image files written',
        xy=(1 + width * 0.8, ours[1] * 1.2),
        xytext=(1 + width * 1.4, max(usual) * 0.4),
        ha='center',
        fontsize=10,
        color=OURS,
        arrowprops={'arrowstyle': '->', 'color': OURS},
    )
    ax.set_xticks(x, groups)
    ax.set_xlim(-0.6, 1.95)
    ax.set_ylabel('wall time (s)')
    ax.set_ylim(0, max(usual + ours) * 1.35)
    ax.legend(loc='upper center', fontsize=10, framealpha=0.95)
    ax.grid(True, axis='y', alpha=0.3)
    shape = X.join(str(s) for s in w['shape'])
    ax.set_title(
        f'A workflow of {w["nodes"]} nodes, each smoothing an in-memory {shape} image:\n'
        f'the rerun is {w["rerun_speedup_vs_usual"]:.0f}{X} faster than the usual way, '
        'which reruns every node',
        fontsize=12.5,
    )
    _finish(fig, m, path)


def plot_pickles(r: dict, path: Path) -> None:
    m, p = r['machine'], r['pickles']
    fig, ax = plt.subplots(figsize=(8.6, 4.6))
    groups = ['MultiProc submission\n(pickle of the node)', '_node.pklz\n(written by every run)']
    keys = ['submission', 'node_pklz']
    series = [
        ('plain nipype, Function node', 'plain_function', BASE),
        ('nipype_nibtrack, Function node', 'ours_function', OURS),
        ('nipype_nibtrack, image-aware interface', 'ours_aware', OURS_LIGHT),
    ]
    width = 0.26
    for i, (label, prefix, color) in enumerate(series):
        values = [p[f'{prefix}_{key}'] for key in keys]
        xs = [g + (i - 1) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, color=color, label=label)
        _label_bars(ax, bars, [fmt_bytes(v) for v in values], inside=prefix.startswith('plain'))
    image_bytes = p['image_MiB'] * 2**20
    ax.axhline(image_bytes, color=GREY, ls=':', lw=1)
    ax.text(
        0.25,
        image_bytes * 1.3,
        f'the image: {fmt_bytes(image_bytes)}',
        ha='center',
        fontsize=10,
        color=GREY,
    )
    ax.set_yscale('log')
    ax.set_ylim(100, image_bytes * 80)
    ax.yaxis.set_major_formatter(FuncFormatter(_tick_bytes))
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel('bytes per node (log scale)')
    ax.legend(loc='upper right', fontsize=9.5, framealpha=0.95)
    ax.grid(True, axis='y', which='major', alpha=0.3)
    ratio = p['plain_function_submission'] / p['ours_function_submission']
    ax.set_title(
        f'Pickled nodes carry a file reference, not the {p["image_MiB"]:.0f} MiB image: '
        f'{ratio:,.0f}{X} fewer bytes',
        fontsize=12.5,
    )
    _finish(fig, m, path)


# ------------------------------------------------------------------ the summary


def summary(r: dict) -> str:
    m = r['machine']
    v = m['versions']
    lines = [
        f'Measured {m["date"]} on {m["cpu"]}, {m["cores"]} cores, {m["ram_gib"]:.0f} GiB RAM, '
        f'{m["system"]};',
        f'Python {m["python"]}, nipype_nibtrack {v["nipype_nibtrack"]}, nibabel '
        f'{v["nibabel"]}, nipype {v["nipype"]}, numpy {v["numpy"]}.',
        f'Medians of repeated runs on a shared machine. Regenerate: {COMMAND}',
        '',
        'Clean image to a file name (as_filename) vs nib.save to a temporary file',
        f'  {"image":<16}{"first call":>12}{"later calls":>13}{"nib.save":>12}{"ratio":>10}',
    ]
    for ext, by_size in r['resolution'].items():
        for n, t in sorted(by_size.items()):
            lines.append(
                f'  {f"{n}^3 {ext}":<16}{fmt_time(t["first"]):>12}{fmt_time(t["warm"]):>13}'
                f'{fmt_time(t["save"]):>12}{t["save"] / t["warm"]:>9,.0f}x'
            )
    lines += [
        '',
        'Deciding clean or dirty (dirty_reason after nipype_nibtrack.load), per format',
        *(f'  {line}' for line in _format_rows(r)),
    ]
    d = r['dirty']
    lines += [
        '',
        f'Dirty image, {d["n"]}^3 float32, to a file name (as_filename) vs nib.save to .nii',
        f'  {"":<24}{"first call (written)":>22}{"nib.save":>12}{"later calls (reused)":>22}',
    ]
    for label, key in (('in memory', 'memory'), ('loaded, header edited', 'header')):
        lines.append(
            f'  {label:<24}{fmt_time(d[f"{key}_first"]):>22}{fmt_time(d[f"{key}_save"]):>12}'
            f'{fmt_time(d[f"{key}_again"]):>22}'
        )
    lines += [
        '',
        'Digest throughput of an in-memory float32 image, GB/s',
        f'  {"image":<16}{"image_digest":>14}{"joblib.hash":>13}{"hashlib.md5":>13}',
    ]
    for n, t in sorted(r['digest'].items()):
        rates = [t['bytes'] / t[k] / 1e9 for k in ('image_digest', 'joblib.hash', 'hashlib.md5')]
        lines.append(f'  {f"{n}^3":<16}{rates[0]:>14.1f}{rates[1]:>13.2f}{rates[2]:>13.2f}')
    w = r['workflow']
    shape = 'x'.join(str(s) for s in w['shape'])
    lines += [
        '',
        f'Workflow of {w["nodes"]} nodes, one in-memory {shape} float32 image each (Linear)',
        f'  {"":<44}{"first run":>10}{"rerun":>10}',
        f'  {"nipype_nibtrack (images passed as they are)":<44}'
        f'{w["ours_first_s"]:>9.2f}s{w["ours_rerun_s"]:>9.2f}s',
        f'  {"usual way (nib.save to temporary files)":<44}'
        f'{w["usual_first_s"]:>9.2f}s{w["usual_rerun_s"]:>9.2f}s',
        f'  rerun: {w["rerun_pct_of_first"]:.1f}% of the first run, '
        f'{w["rerun_image_writes"]} image files written, '
        f'{w["rerun_speedup_vs_usual"]:.0f}x faster than the usual way',
    ]
    p = r['pickles']
    lines += [
        '',
        f'Pickle bytes per node, {p["image_MiB"]:.0f} MiB image input',
        f'  {"":<44}{"MultiProc":>12}{"_node.pklz":>12}',
    ]
    for label, prefix in (
        ('plain nipype, Function node', 'plain_function'),
        ('nipype_nibtrack, Function node', 'ours_function'),
        ('nipype_nibtrack, image-aware interface', 'ours_aware'),
    ):
        lines.append(
            f'  {label:<44}{p[f"{prefix}_submission"]:>12,d}{p[f"{prefix}_node_pklz"]:>12,d}'
        )
    mem = r['memory']
    lines += [
        '',
        f'Peak memory (tracemalloc), Function node taking a {mem["image_MiB"]:.0f} MiB image',
        f'  {"":<44}{"first run":>12}{"rerun":>12}',
        f'  {"plain nipype":<44}{p["plain_function_run_peak_MiB"]:>8.1f} MiB'
        f'{p["plain_function_rerun_peak_MiB"]:>8.1f} MiB',
        f'  {"nipype_nibtrack":<44}{mem["function_workflow_run_peak_MiB"]:>8.1f} MiB'
        f'{mem["function_workflow_rerun_peak_MiB"]:>8.1f} MiB',
    ]
    return '\n'.join(lines) + '\n'


def _format_rows(r: dict) -> list[str]:
    lines = [f'{"format":<24}{"sample":<32}{"bytes":>9}{"first check":>12}{"later":>9}']
    for label, t in r['formats'].items():
        lines.append(
            f'{label:<24}{t.get("loaded", t["files"][0]):<32}{t["bytes"]:>9,d}'
            f'{fmt_time(t["first"]):>12}{fmt_time(t["later"]):>9}'
        )
    return lines


def formats_table(r: dict) -> str:
    m = r['machine']
    lines = [
        *_format_rows(r),
        '',
        f'Medians; measured {m["date"]} on {m["cpu"]}, {m["cores"]} cores. Regenerate: {COMMAND}',
    ]
    return '\n'.join(lines) + '\n'


def write_all(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plot_resolution(results, out / 'resolution.png')
    plot_digest(results, out / 'digest.png')
    plot_workflow(results, out / 'workflow.png')
    plot_pickles(results, out / 'pickles.png')
    if 'limits' in results:
        plot_limits(results, out / 'limits.png')
        (out / 'limits.txt').write_text(limits_table(results))
    (out / 'summary.txt').write_text(summary(results))
    (out / 'formats.txt').write_text(formats_table(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=OUT, help=f'output folder (default {OUT})')
    parser.add_argument(
        '--replot', action='store_true', help='redraw from results.json without measuring'
    )
    args = parser.parse_args(argv)
    if args.replot:
        results = load_results(args.out / 'results.json')
    else:
        results = measure()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / 'results.json').write_text(json.dumps(results, indent=1) + '\n')
    write_all(results, args.out)
    print((args.out / 'summary.txt').read_text())
    print(f'wrote {", ".join(sorted(p.name for p in args.out.iterdir()))} in {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
