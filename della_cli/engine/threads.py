"""How many threads compute: never more than the cores this process may run on.

On a loaded two-core machine a TIES merge took 8.1 s with numba's default threads (one per
core) beside the engine's reader and writer threads, and 1.1 s with one: threads that outnumber
the cores wait for each other at every parallel loop's barrier. So the budget is the cores the
process may use (``os.sched_getaffinity``), or fewer with ``della merge --threads N``, and the
engine's own threads are counted in it: weighted sums in chunks use the calling thread and
``budget - 1`` helpers (the reader and writer threads are idle then); the pipeline's merging
thread runs its kernels on ``budget - 2`` threads (at least one) beside the reader and the writer.
"""

from __future__ import annotations

import os
import threading


def usable_cores() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ThreadBudget:
    """The compute threads of one merge: ``threads`` (None: every usable core), capped at the
    usable cores."""

    def __init__(self, threads: int | None = None):
        cores = usable_cores()  # asked once: the affinity is a system call
        self.total = max(1, min(threads or cores, cores))
        self._numba_set = threading.local()

    @property
    def chunk_helpers(self) -> int:
        """Threads beside the calling one that merge chunks of weighted sums."""
        return self.total - 1

    @property
    def kernel_threads(self) -> int:
        """Threads of a parallel kernel (numba, torch) run by the pipeline's merging thread."""
        return max(1, self.total - 2)

    def limit_numba(self) -> None:
        """Cap numba's threads for the calling thread (numba keeps the setting per thread);
        set once per thread, as a block of a small tensor took longer to set it than to merge."""
        if getattr(self._numba_set, "done", False):
            return
        import numba

        numba.set_num_threads(min(self.kernel_threads, numba.config.NUMBA_NUM_THREADS))
        self._numba_set.done = True

    def limit_torch(self) -> None:
        import torch

        torch.set_num_threads(self.kernel_threads)
