"""The ``nibtrack`` command: inspect and clean the image store.

The demo is ``scripts/demo.sh`` (``workflows/realign.py``), not a subcommand: the example
workflows live beside the package, not in it.
"""

from __future__ import annotations

import argparse
import math
import sys

from .store import RECENT_SECONDS, StoreError, get_store

__all__ = ['main']


def _size(n: int) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if n < 1024 or unit == 'GiB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024
    return str(n)


def _days(text: str) -> float:
    """A number of days: finite and not negative.

    >>> _days('1.5')
    1.5
    >>> _days('-3')
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a number of days >= 0, such as 7 or 0.5, got '-3'
    """
    try:
        days = float(text)
    except ValueError:
        days = math.nan
    if not math.isfinite(days) or days < 0:
        raise argparse.ArgumentTypeError(
            f'expected a number of days >= 0, such as 7 or 0.5, got {text!r}'
        )
    return days


def _byte_count(text: str) -> int:
    """A whole number of bytes, not negative.

    >>> _byte_count('1000')
    1000
    >>> _byte_count('1e9')
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected a whole number of bytes >= 0, such as 1000000, got '1e9'
    """
    try:
        count = int(text.strip(), 10)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(
            f'expected a whole number of bytes >= 0, such as 1000000, got {text!r}'
        )
    return count


def _info(args: argparse.Namespace) -> int:
    info = get_store().info()
    print(f'location: {info.location}')
    print(f'entries:  {info.entries} ({info.files} image files)')
    print(f'size:     {_size(info.bytes)} ({info.bytes} bytes)')
    return 0


def _gc(args: argparse.Namespace) -> int:
    if args.older_than is None and args.max_bytes is None:
        print('nibtrack store gc: give --older-than DAYS and/or --max-bytes N', file=sys.stderr)
        return 2
    report = get_store().gc(args.older_than, args.max_bytes)
    print(
        f'removed {report.removed} entries ({_size(report.freed_bytes)}), kept {report.kept}, '
        f'{report.skipped_busy} busy'
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nibtrack``.

    >>> build_parser().parse_args(['store', 'gc', '--older-than', '7']).older_than
    7.0
    """
    parser = argparse.ArgumentParser(prog='nibtrack', description=__doc__)
    commands = parser.add_subparsers(dest='command', required=True)
    store = commands.add_parser('store', help='inspect or clean the image store')
    store_commands = store.add_subparsers(dest='store_command', required=True)
    store_commands.add_parser('info', help='location, entries and bytes').set_defaults(func=_info)
    gc = store_commands.add_parser(
        'gc',
        help='delete old or excess entries',
        description=(
            'Delete entries unused for DAYS days, then the least recently used ones until '
            f'the store holds at most N bytes. Entries used in the last '
            f'{RECENT_SECONDS / 3600:g} hour(s), being written or being handed out are '
            'never deleted, so gc may run while workflows do.'
        ),
    )
    gc.add_argument('--older-than', type=_days, metavar='DAYS', help='unused for DAYS days')
    gc.add_argument(
        '--max-bytes', type=_byte_count, metavar='N', help='shrink the store to N bytes'
    )
    gc.set_defaults(func=_gc)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StoreError as err:  # its message names the store, the cause and the remedy
        print(f'nibtrack: {err.strerror or err}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
