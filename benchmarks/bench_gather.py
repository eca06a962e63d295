"""The compiled gather against its floor: memcpy and xxh3-128 of the same bytes.

Run ``python benchmarks/bench_gather.py [--quick] [--only NAME ...]``. For each
non-Fortran layout that matters (C-ordered 2-D to 4-D images, several item sizes) it
prints ``what: gather, digest, memcpy, xxh3, gather/xxh3, digest/xxh3, lanes/xxh3``
where

- *gather* is :func:`nipype_nibtrack.digest.f_blocks` without hashing: the kernel's
  copies into Fortran order, a slab at a time, as the digest does them;
- *digest* is ``array_digest(arr, 'F')``: the gather and the hashing;
- *memcpy* copies the same bytes, in memory order, 1 MiB at a time into a reused
  buffer (a copy that stays in cache: the floor of any gather);
- *xxh3* hashes the same bytes in memory order (the floor the digest's goal is set by);
- *lanes* is a prototype of a digest definition that was measured and not adopted (a
  "lane tree": xxh3-128 of the 16-byte digests of each last-axis slice's Fortran-ordered
  bytes, a C-ordered array gathered a block along axis -2 at a time, one hashing state
  per slice): what it would cost with this kernel, for the shapes where every slice
  holds at least 64 KiB.

All are measured in the same run (best of a few). Exits 0 whatever the numbers.
"""

from __future__ import annotations

import argparse

import numpy as np
import xxhash
from timing import timings

from nipype_nibtrack.digest import array_digest, f_blocks, gather

RGB = np.dtype([('R', 'u1'), ('G', 'u1'), ('B', 'u1')])
CASES = {
    '3d-256-f4': ((256, 256, 256), '<f4'),
    '3d-250-f4': ((250, 250, 250), '<f4'),
    '4d-160x16-f4': ((160, 160, 160, 16), '<f4'),
    '4d-64x200-f4': ((64, 64, 36, 200), '<f4'),
    '2d-4096-f4': ((4096, 4096), '<f4'),
    '2d-4000-f4': ((4000, 4000), '<f4'),
    '3d-256-i2': ((256, 256, 256), '<i2'),
    '3d-256-u1': ((256, 256, 256), 'u1'),
    '3d-256-f8': ((256, 256, 256), '<f8'),
    '3d-256-rgb': ((256, 256, 256), RGB),
}
QUICK = ['3d-256-f4', '4d-160x16-f4', '2d-4096-f4', '3d-256-i2']


def interleaved(fns: dict, repeats: int) -> dict:
    """Best wall time of each of ``fns`` over ``repeats`` rounds, each round timing every
    one once: on a shared machine, the floors and ours meet the same noise."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += timings(fn, 1)
    return {name: min(values) for name, values in times.items()}


def memcpy(flat: np.ndarray, buffer: np.ndarray) -> None:
    step = buffer.size
    for start in range(0, flat.size, step):
        part = flat[start : start + step]
        np.copyto(buffer[: part.size], part)


def gather_only(arr: np.ndarray) -> None:
    for _ in f_blocks(arr):
        pass


LANE_BYTES = 1 << 16  # a lane of the prototype: a last-axis slice of at least 64 KiB
REGION_BYTES = 1 << 22  # a block along axis -2 gathered at once, at most about this
RUN_BYTES = 256  # and at least this many bytes of each source run


def lane_digest(arr: np.ndarray) -> str | None:
    """The lane-tree prototype's digest of a C-ordered ``arr`` (None: not a lane shape)."""
    if arr.ndim < 2 or arr[..., 0].nbytes < LANE_BYTES:
        return None
    lanes = [xxhash.xxh3_128() for _ in range(arr.shape[-1])]
    row = arr[..., :1, :].nbytes  # one index along axis -2
    step = max(-(-RUN_BYTES // (arr.shape[-1] * arr.itemsize)), REGION_BYTES // row)
    step = max(1, min(step, arr.shape[-2]))
    buffer = np.empty(row * step, np.uint8)
    for j in range(0, arr.shape[-2], step):
        region = arr[..., j : j + step, :]
        block = gather(region, buffer[: region.nbytes])
        piece = region.nbytes // len(lanes)
        for t, lane in enumerate(lanes):
            lane.update(block[t * piece : (t + 1) * piece])
    top = xxhash.xxh3_128(repr((arr.dtype.str, arr.shape)).encode())
    for lane in lanes:
        top.update(lane.digest())
    return top.hexdigest()


def lane_reference(arr: np.ndarray) -> str:
    """The same digest from the Fortran-ordered bytes, one slice at a time."""
    top = xxhash.xxh3_128(repr((arr.dtype.str, arr.shape)).encode())
    for t in range(arr.shape[-1]):
        top.update(xxhash.xxh3_128(np.asfortranarray(arr[..., t]).tobytes(order='F')).digest())
    return top.hexdigest()


def measure(name: str, repeats: int) -> None:
    shape, dtype = CASES[name]
    dtype = np.dtype(dtype)
    raw = np.random.default_rng(0).integers(0, 256, int(np.prod(shape)) * dtype.itemsize, 'u1')
    arr = raw.view(dtype).reshape(shape)  # C-ordered
    flat = raw
    buffer = np.empty(1 << 20, np.uint8)
    fns = {
        'memcpy': lambda: memcpy(flat, buffer),
        'xxh3': lambda: xxhash.xxh3_128(flat).hexdigest(),
        'gather': lambda: gather_only(arr),
        'digest': lambda: array_digest(arr, 'F'),
    }
    if lane_digest(arr) is not None:
        assert lane_digest(arr) == lane_reference(arr)  # the prototype is faithful
        fns['lanes'] = lambda: lane_digest(arr)
    t = interleaved(fns, repeats)
    floor_copy, floor_hash, ours, digest = t['memcpy'], t['xxh3'], t['gather'], t['digest']
    lanes = f'{t["lanes"] / floor_hash:.2f}x' if 'lanes' in t else '-'
    mib = arr.nbytes / 2**20
    print(
        f'{name} ({mib:.0f} MiB, C-ordered): gather {ours * 1e3:.1f} ms, digest '
        f'{digest * 1e3:.1f} ms, memcpy {floor_copy * 1e3:.1f} ms, xxh3 {floor_hash * 1e3:.1f} '
        f'ms, gather/xxh3 {ours / floor_hash:.2f}x, digest/xxh3 {digest / floor_hash:.2f}x, '
        f'lanes/xxh3 {lanes}',
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='four cases, fewer repeats')
    parser.add_argument('--only', nargs='+', choices=sorted(CASES), help='these cases')
    args = parser.parse_args()
    names = args.only or (QUICK if args.quick else list(CASES))
    for name in names:
        measure(name, 3 if args.quick else 7)


if __name__ == '__main__':
    main()
