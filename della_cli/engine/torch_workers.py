"""The torch workers of a merge: one per device the plan spread the jobs over, and the CPU
worker that takes what a device had no memory for (``memory_retry``).

Each job is merged by the worker of its device (``TensorJob.device``); every call that
computes on a device goes through ``MemoryRetry``, so an out-of-memory error there becomes a
retry in smaller blocks, then on the CPU, instead of a failed merge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from della_cli.engine.memory_retry import MemoryRetry
from della_cli.engine.shared import (
    SMALL_TASK_ELEMENTS,
    BlockTask,
    WarningCallback,
    task_elements,
)
from della_cli.engine.threads import ThreadBudget
from della_cli.engine.torch_jobs import TorchJobs
from della_cli.methods import MethodSpec
from della_cli.plan import TensorJob

if TYPE_CHECKING:
    from della_cli.engine.reporting import Reporter


class TorchWorkers:
    """``devices``' workers in the plan's order (the first also runs any torch job of a plan
    made for one device)."""

    def __init__(
        self,
        devices: list[str],
        compute_dtype: str,
        method: MethodSpec,
        threads: ThreadBudget,
        on_warning: WarningCallback,
    ):
        self.workers = [TorchJobs(device, compute_dtype, method, threads) for device in devices]
        cpu = TorchJobs("cpu", compute_dtype, method, threads, fallback=True)
        self.retry = MemoryRetry(cpu, on_warning)

    def __len__(self) -> int:
        return len(self.workers)

    def __iter__(self) -> Iterator[TorchJobs]:
        return iter(self.workers)

    def of(self, job: TensorJob) -> TorchJobs:
        """The worker of the device the plan gave ``job``."""
        return self.workers[job.device] if job.device < len(self.workers) else self.workers[0]

    def stage(self, task: BlockTask, loaded: list[np.ndarray]) -> None:
        """Start a torch job's block on its way to its CUDA device (from a reader thread).
        Small tasks, which travel in batches of many, are copied when merged instead: a
        batch would stage more of them than ``cuda_uploads.MAX_STAGED`` keeps."""
        job = task.job
        if task_elements(task) <= SMALL_TASK_ELEMENTS:
            return
        if job.action == "merge" and job.kernel.backend == "torch":
            jobs = self.of(job)
            if jobs.device.startswith("cuda"):
                jobs.stage(loaded)

    def block(
        self, task: BlockTask, loaded: list[np.ndarray], masks: list | None, reporter: Reporter
    ) -> np.ndarray:
        """A ``torch/merge`` block; ``masks``: the job's whole-tensor keep masks, if any."""

        def merge(jobs: TorchJobs, rows: BlockTask, inputs: list[np.ndarray]) -> np.ndarray:
            mask_blocks = None if masks is None else [m[rows.start : rows.stop] for m in masks]
            return jobs.block(rows, inputs, mask_blocks, reporter)

        return self.retry.rows(self.of(task.job), task, loaded, merge)

    def prepare(self, job: TensorJob, blocks: Callable[[], Iterable[list[np.ndarray]]]):
        """A catalog method's whole-tensor statistics (``TorchJobs.prepare``)."""
        return self.retry.whole(self.of(job), job.name, lambda jobs: jobs.prepare(job, blocks))

    def streamed_block(
        self, task: BlockTask, loaded: list[np.ndarray], state, reporter: Reporter
    ) -> np.ndarray:
        """A catalog method's block, with its tensor's statistics ``state``."""

        def merge(jobs: TorchJobs, rows: BlockTask, inputs: list[np.ndarray]) -> np.ndarray:
            return jobs.streamed_block(rows, inputs, state, reporter)

        return self.retry.rows(self.of(task.job), task, loaded, merge)

    def keep_mask(self, job: TensorJob, expert: np.ndarray, reference: np.ndarray, step, gamma):
        """One expert's whole-tensor keep mask (TIES, breadcrumbs) on the job's device."""
        return self.retry.whole(
            self.of(job),
            job.name,
            lambda jobs: jobs.keep_mask(expert, reference, step.params, gamma),
        )
