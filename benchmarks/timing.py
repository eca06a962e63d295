"""The timing loop every benchmark script shares, and the idle thread some rows run with."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


def timings(
    fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None
) -> list[float]:
    """Wall times of ``fn()`` over ``repeats`` runs (``setup()`` untimed before each)."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def idle_thread(active: bool = True) -> Iterator[None]:
    """One more Python thread alive and idle while the block runs (when ``active``).

    A MultiProc parent and a Jupyter kernel have such threads: the memos must keep
    their answers all the same.
    """
    if not active:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name='idle', daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
