"""Reliability report: faults injected, attacks on the store, bad inputs, concurrency.

Runs every check of ``tests/reliability_checks.py`` outside pytest, each in a fresh
temporary folder, plus the concurrent-resolution run, and writes the figures, with the
date and the machine, to ``docs/_static/reliability.txt`` (included in the docs; paste
the summary into the README's "Reliability" section)::

    python benchmarks/reliability_report.py            # everything (~1 min, 2 GiB disk)
    python benchmarks/reliability_report.py --quick    # without the > 2 GiB image

Checks that inject their fault with ``mount`` need root; run as another user they are
listed as skipped. Exits 1 when a check fails or a wrong path is handed out.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import logging
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Never the user's store: checks that use the default store get a scratch one
os.environ['NIBTRACK_STORE'] = tempfile.mkdtemp(prefix='nibtrack-report-store-')
atexit.register(shutil.rmtree, os.environ['NIBTRACK_STORE'], True)
sys.path.insert(0, str(ROOT))

import nibabel  # noqa: E402
import nipype  # noqa: E402

from tests.reliability_checks import (  # noqa: E402
    Check,
    Skip,
    checks,
    is_root,
    run_concurrency,
)

WIDTH = 96


def machine() -> str:
    try:
        with open('/proc/meminfo') as f:
            kib = int(next(line for line in f if line.startswith('MemTotal')).split()[1])
        memory = f'{kib / 2**20:.1f} GiB RAM'
    except (OSError, StopIteration, ValueError):
        memory = 'RAM unknown'
    return (
        f'{platform.system()} {platform.release()} {platform.machine()}, '
        f'{os.cpu_count()} cores, {memory}; Python {platform.python_version()}, '
        f'nibabel {nibabel.__version__}, nipype {nipype.__version__}; '
        f'{"as root" if is_root() else "not root"}'
    )


def run(check: Check, work: Path) -> tuple[str, int, str, float]:
    """(status, faults or inputs used, what came out, seconds) of one check."""
    start = time.monotonic()
    if check.needs_root and not is_root():
        return 'skipped', 0, 'needs root (mount)', 0.0
    try:
        outcome = check.run(work)
    except Skip as why:
        return 'skipped', 0, str(why), time.monotonic() - start
    except Exception as err:
        traceback.print_exc()
        return 'FAILED', 0, f'{type(err).__name__}: {err}', time.monotonic() - start
    return 'ok', outcome.injected, outcome.text, time.monotonic() - start


def wrap(text: str, indent: int = 6) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=' ' * indent, subsequent_indent=' ' * indent)


def section(title: str, group: str, quick: bool, lines: list[str]) -> tuple[int, int, int]:
    """Run a group; append its lines; return (used, survived, failed checks)."""
    rows = []
    for check in checks(group):
        if quick and check.slow:
            rows.append((check, 'skipped', 0, 'skipped with --quick', 0.0))
            continue
        work = Path(tempfile.mkdtemp(prefix=f'nibtrack-{check.name}-'))
        try:
            rows.append((check, *run(check, work)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f'  {rows[-1][1]:<8} {check.name}', flush=True)
    used = sum(r[2] for r in rows)
    failed = sum(r[1] == 'FAILED' for r in rows)
    survived = sum(r[2] for r in rows if r[1] == 'ok')
    skipped = sum(r[1] == 'skipped' for r in rows)
    lines.append(f'{title}: {survived} of {used} in {len(rows)} checks')
    lines.append(f'  ({failed} checks failed, {skipped} skipped)')
    for check, status, n, text, seconds in rows:
        title = f'[{status}] {check.name} ({n}, {seconds:.1f} s): {check.doc}'
        lines.extend(textwrap.wrap(title, WIDTH, initial_indent='  ', subsequent_indent='      '))
        lines.extend(wrap(text, 8))
    lines.append('')
    return used, survived, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='skip the > 2 GiB image')
    parser.add_argument('--out', type=Path, default=ROOT / 'docs' / '_static' / 'reliability.txt')
    parser.add_argument('--processes', type=int, default=16)
    parser.add_argument('--threads', type=int, default=16)
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args(argv)
    logging.getLogger('nipype_nibtrack').setLevel(logging.ERROR)  # expected warnings
    logging.getLogger('nipype.workflow').setLevel(logging.WARNING)

    started = time.monotonic()
    now = datetime.datetime.now(datetime.timezone.utc)
    body: list[str] = []
    print('faults')
    faults = section('Faults injected and survived', 'fault', args.quick, body)
    print('attacks on the store')
    attacks = section('Attacks on the store refused', 'security', args.quick, body)
    print('bad inputs')
    inputs = section(
        'Bad inputs with a clear error or a correct result', 'input', args.quick, body
    )
    print('concurrency')
    work = Path(tempfile.mkdtemp(prefix='nibtrack-concurrency-'))
    try:
        report = run_concurrency(work, args.processes, args.threads, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    body.append(
        f'Concurrent resolutions: {report.resolutions}, wrong paths handed out: '
        f'{report.wrong_paths}'
    )
    body.extend(wrap(report.summary(), 2))
    failed = faults[2] + attacks[2] + inputs[2] + len(report.errors) + report.wrong_paths

    head = [
        'nipype_nibtrack reliability report',
        f'date:    {now:%Y-%m-%d %H:%M} UTC',
        f'machine: {machine()}',
        f'command: python benchmarks/reliability_report.py{" --quick" if args.quick else ""}'
        f' ({time.monotonic() - started:.0f} s)',
        '',
        'Summary',
        f'  faults injected and survived:      {faults[1]} of {faults[0]}',
        f'  attacks on the store refused:      {attacks[1]} of {attacks[0]}',
        f'  bad inputs, clear error or result: {inputs[1]} of {inputs[0]} '
        f'({len(checks("input"))} kinds)',
        f'  concurrent resolutions:            {report.resolutions} '
        f'({report.processes} processes x {report.threads} threads x {report.rounds} rounds)',
        f'  wrong paths handed out:            {report.wrong_paths}',
        f'  failed checks:                     {failed}',
        '',
    ]
    text = '\n'.join(head + body).rstrip() + '\n'
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print()
    print('\n'.join(head))
    print(f'written to {args.out}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
