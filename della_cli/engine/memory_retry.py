"""A device that runs out of memory mid-merge: the block again in halves, then on the CPU.

The plan sizes blocks to the memory each device has free (``device_plan``), but other
processes share a GPU and the caching allocator fragments, so a block can still fail with
``torch.OutOfMemoryError``. The merge does not stop there: the block's rows are merged in two
halves (each halved again as needed, down to ``MIN_RETRY_ELEMENTS``), then, if even those fail,
by the torch backend on the CPU. Every step of a block merge is row-wise once the whole-tensor
selections are made, and the random draws are keyed by entry position, so the halves give the
bytes the whole block would have (on the CPU: the CPU's bytes, which the random methods share
with CUDA and the others match to float32 rounding). A whole-tensor computation (a keep mask,
a catalog method's statistics) goes to the CPU directly. The run warns once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from della_cli.engine.shared import BlockTask, WarningCallback
from della_cli.engine.torch_jobs import TorchJobs

# The smallest block a retry halves to before it gives the block to the CPU.
MIN_RETRY_ELEMENTS = 1 << 16

Result = TypeVar("Result")
RowsMerge = Callable[[TorchJobs, BlockTask, list[np.ndarray]], np.ndarray]


def retryable(jobs: TorchJobs, error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory error worth a retry: a GPU's (its inputs are
    copies on the device, the host's rows untouched) or a test's simulated one. On the CPU
    torch may have changed a float32 block's rows in place before failing, and the CPU is
    the last resort anyway."""
    from della_cli.backends.torch_backend import SimulatedOutOfMemory

    if isinstance(error, SimulatedOutOfMemory):
        return True
    import torch

    kind = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(error, kind) and jobs.backend.device.type == "cuda"


class MemoryRetry:
    """Retries what a device had no memory for; ``cpu``: the CPU worker that takes it last."""

    def __init__(self, cpu: TorchJobs, on_warning: WarningCallback):
        self.cpu = cpu
        self.on_warning = on_warning
        self._warned = False
        self._lock = threading.Lock()

    def rows(
        self, jobs: TorchJobs, task: BlockTask, loaded: list[np.ndarray], merge: RowsMerge
    ) -> np.ndarray:
        """``merge(jobs, task, loaded)``, retried in halves and then on the CPU."""
        try:
            return merge(jobs, task, loaded)
        except Exception as error:
            if jobs is self.cpu or not retryable(jobs, error):
                raise
        self.warn(jobs.device, task.job.name)
        jobs.backend.release_memory()
        return self._in_halves(jobs, task, loaded, merge)

    def whole(self, jobs: TorchJobs, name: str, compute: Callable[[TorchJobs], Result]) -> Result:
        """``compute(jobs)`` of a whole tensor, on the CPU if the device has no memory for it."""
        try:
            return compute(jobs)
        except Exception as error:
            if jobs is self.cpu or not retryable(jobs, error):
                raise
        self.warn(jobs.device, name)
        jobs.backend.release_memory()
        return compute(self.cpu)

    def _in_halves(
        self, jobs: TorchJobs, task: BlockTask, loaded: list[np.ndarray], merge: RowsMerge
    ) -> np.ndarray:
        rows = task.stop - task.start
        splittable = all(array.ndim >= 2 and array.shape[0] == rows for array in loaded)
        if not splittable or rows < 2 or loaded[0].size // 2 < MIN_RETRY_ELEMENTS:
            return merge(self.cpu, task, loaded)
        middle = rows // 2
        parts = []
        for low, high in ((0, middle), (middle, rows)):
            half = BlockTask(task.job, task.start + low, task.start + high, last=False)
            half_rows = [array[low:high] for array in loaded]
            try:
                parts.append(merge(jobs, half, half_rows))
            except Exception as error:
                if not retryable(jobs, error):
                    raise
                jobs.backend.release_memory()
                parts.append(self._in_halves(jobs, half, half_rows, merge))
        return np.concatenate(parts, axis=0)

    def warn(self, device: str, tensor: str) -> None:
        """Say once per run that a device ran out of memory (the first tensor it happened on)."""
        with self._lock:
            if self._warned:
                return
            self._warned = True
        self.on_warning(
            f"{device} ran out of memory merging '{tensor}'; such blocks are merged again in "
            "smaller pieces, then on the CPU (slower; lower the load on the device or use more "
            "devices to avoid it)"
        )
