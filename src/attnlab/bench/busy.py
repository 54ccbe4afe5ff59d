"""Competing CPU load for benchmarks: N processes that each spin one core for as long as a block runs.

``with spinners(n): ...`` starts them (and waits until each is spinning) before
the block and stops them after it, however the block ends (an error, Ctrl-C).
A spinner whose parent dies without stopping it (killed with SIGKILL) notices
within a fraction of a second and exits on its own.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from collections.abc import Iterator

_START_TIMEOUT_S = 60.0
_CHECK_EVERY = 1 << 20  # loop iterations between checks that the parent is still alive


def _spin(started, parent: int) -> None:
    """A tight Python loop (one core at 100%) until terminated or orphaned."""
    started.set()
    i = 0
    while True:
        i += 1
        if i == _CHECK_EVERY:
            if os.getppid() != parent:
                return
            i = 0


def _context():
    # fork: no re-import of the caller (its torch, its __main__); the child only runs the loop above.
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


@contextlib.contextmanager
def spinners(n: int) -> Iterator[list[int]]:
    """Run ``n`` spinning processes during the block; yields their pids (empty for n = 0)."""
    ctx = _context()
    procs = []
    try:
        for _ in range(n):
            started = ctx.Event()
            p = ctx.Process(target=_spin, args=(started, os.getpid()), daemon=True, name="attnlab-busy")
            p.start()
            procs.append(p)
            if not started.wait(_START_TIMEOUT_S):
                raise RuntimeError(f"a --busy spinner did not start within {_START_TIMEOUT_S:.0f} s")
        yield [p.pid for p in procs if p.pid is not None]
    finally:
        _stop(procs)


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5.0)
        if p.is_alive():
            p.kill()
            p.join()
