"""How many threads compute: never more than the cores this process may run on.

The budget is the cores the process may use (``os.sched_getaffinity``), or fewer with
``della merge --threads N``; no merge computes on more threads than that. Weighted sums in
chunks use the calling thread and ``budget - 1`` helpers (the reader and writer threads are idle
then); the pipeline's merging thread runs its kernels (numba, and torch's intra-op threads on
the CPU) on the whole budget too. The engine's reader and writer threads are not counted against
the kernels: for the kernels that run in the pipeline (the trim and DARE methods, the catalog
methods) they spend nearly all their time waiting on the merging thread or on the disk. On this
2-core machine, ~250M base + 3, one compute thread beside them against two (bench/RESULTS.md):
ties 7.25 -> 5.40 s, dare_ties 3.28 -> 2.43 s, task_arithmetic unchanged (its C weighted sum
already used both cores). An earlier budget counted the reader and writer as a core each, which
left one kernel thread on two cores; that rule came from a TIES merge on a machine loaded far
beyond its cores (8.1 s with two threads, 1.1 s with one), where every parallel loop's barrier
waited for a descheduled thread; ``--threads 1`` gives that behaviour where it pays.
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
        """Threads of a numba kernel run by the pipeline's merging thread: the whole budget, as
        the reader and writer beside it mostly wait (see the module's note)."""
        return self.total

    def limit_numba(self) -> None:
        """Cap numba's threads for the calling thread (numba keeps the setting per thread);
        set once per thread, as a block of a small tensor took longer to set it than to merge."""
        if getattr(self._numba_set, "done", False):
            return
        import numba

        numba.set_num_threads(min(self.kernel_threads, numba.config.NUMBA_NUM_THREADS))
        self._numba_set.done = True

    @property
    def torch_threads(self) -> int:
        """torch's intra-op threads on the CPU: the budget less the reader and writer, as
        before. torch forks and joins its OpenMP threads for every step of a catalog method
        (dozens per 64K-entry chunk), and they spin between steps; beside other work that spin
        takes the core the merging thread needs (see the module's note)."""
        return max(1, self.total - 2)

    def limit_torch(self) -> None:
        """Give torch's CPU kernels their threads (a process-wide setting). The catalog
        methods write the same bytes on one thread and on two (test_threads_catalog.py)."""
        import torch

        torch.set_num_threads(self.torch_threads)
