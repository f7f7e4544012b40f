"""How many threads compute: never more than the cores this process may run on.

The budget is the cores the process may use (``os.sched_getaffinity``), or fewer with
``della merge --threads N``. Weighted sums in chunks use the calling thread and ``budget - 1``
helpers (the reader and writer threads are idle then). numba's kernels, run by the pipeline's
merging thread, get the whole budget: the reader and writer beside them spend nearly all their
time waiting on it or on the disk. Counting them as a core each had left one kernel thread on 2
cores; two took a 250M merge from 8.05 to 5.86 s (ties) and 3.48 to 2.87 s (dare_ties) on
this 2-core machine, task_arithmetic unchanged (bench/RESULTS.md, issue 15). That rule came from a
TIES merge beside other work, 8.1 s on two threads against 1.1 s on one: idle OpenMP threads
spun for the next parallel loop and took the cores the merging thread needed, which
``OMP_WAIT_POLICY=PASSIVE`` (set in ``della_cli/__init__.py``) now prevents. torch on the CPU
keeps ``budget - 2`` threads (one on 2 cores): two gained nothing reliable for the catalog
methods even on an idle machine (issue 17).
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

    def limit_torch_per_caller(self) -> None:
        """One torch thread for each thread that calls torch at once (arcee_fusion's
        importances, made by the merging thread and its helpers): they already use every
        core. Left at torch's default (every core), each caller's softmax forked OpenMP
        threads of its own: at ~1.1B on 2 cores, perf found two such threads running beside
        the merging thread and its helper, and the threads' waking and switching took 5% of
        the merge's CPU time."""
        import torch

        torch.set_num_threads(1)

    def limit_torch(self) -> None:
        """Give torch's CPU kernels their threads (a process-wide setting). The catalog
        methods write the same bytes on one thread and on two (test_threads_catalog.py)."""
        import torch

        torch.set_num_threads(self.torch_threads)
