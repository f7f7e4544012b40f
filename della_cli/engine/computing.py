"""How the engine merges one block: by the kernel the plan chose for its job.

``BlockComputation`` is the part of ``MergeEngine`` that takes a block's rows to its output
rows: a chunk of a weighted sum (``merge_chunk``), a block of the pipeline (``compute_block``:
a copy, a ``cpu/block`` or weighted-sum block, or the torch backend's, after the whole-tensor
selections of TIES and breadcrumbs), or a block of a catalog method (``streamed_block``, after
the passes its statistics need). It uses what ``MergeEngine.__init__`` sets up (the backends'
runners, the row loader, the reporter, the recycled buffers) and the engine's ``load``,
``release``, ``output_buffer`` and ``block_tasks``; the scheduling and the writes are the
engine's.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from della_cli.engine.masks import global_keep_masks
from della_cli.engine.shared import BlockTask, Merged, rows_shape
from della_cli.io.dtypes import cast
from della_cli.plan import TensorJob


class BlockComputation:
    """A block's output rows by its job's kernel (mixed into ``MergeEngine``)."""

    def merge_chunk(self, task: BlockTask) -> Merged:
        """One chunk of a weighted sum in chunks: read and merged by the streamed reader, or
        read into buffers and merged by the kernel, as the plan says."""
        if self.cpu.stands_in(task):  # the kernel compiles beside the merge: the reference
            loaded = self.load(task)
            merged = self.torch.block(task, loaded, None, self.report)  # reports non-finites
            self.release(task, loaded)
            return merged, np.zeros(len(loaded), dtype=np.bool_)
        out = self.output_buffer(task, (task.stop - task.start, rows_shape(task.job.shape)[1]))
        if task.job.kernel.name == "streamed_sum":
            return self.cpu.streamed_sum(task, self.inputs, out)
        loaded = self.load(task)
        merged = self.cpu.weighted_sum(task.job, loaded, out)
        self.release(task, loaded)
        return merged

    def compute_block(self, task: BlockTask, loaded: list[np.ndarray]) -> np.ndarray:
        """The output rows of one block, in the output dtype, by the job's kernel."""
        job = task.job
        if job.action == "copy":
            self.report.experts_differ(job, loaded[0])
            self.report.copied_values(job, loaded[0])
            return cast(loaded[0], job.out_dtype)
        if job.kernel.streamed:
            return self.streamed_block(task, loaded)
        on_torch = job.kernel.backend == "torch" or self.cpu.stands_in(task)
        if task.start == 0:
            # The block is the whole tensor: the numba selection only reads it (torch's
            # works on its inputs in place, a float32 block's memory among them).
            whole = loaded if task.last and not on_torch else None
            self._masks[job.name] = self.global_keep_masks(job, on_torch, whole)
        masks = self._masks[job.name]
        if task.last:
            del self._masks[job.name]
        if on_torch:
            return self.workers.block(task, loaded, masks, self.report)
        mask_blocks = None if masks is None else [m[task.start : task.stop] for m in masks]
        kernel = job.kernel
        out = self.output_buffer(task, loaded[0].shape)
        if kernel.name == "block":
            merged, nonfinite = self.cpu.block(task, loaded, mask_blocks, out)
        else:  # a weighted sum in the pipeline's blocks, its spans split among the helpers
            helpers = self.threads.chunk_helpers if self._helpers else 0
            merged, nonfinite = self.cpu.weighted_sum(job, loaded, out, self._helpers, helpers)
        if nonfinite.any():
            self.report.nonfinite(job, [bool(flag) for flag in nonfinite])
        return merged

    def streamed_block(self, task: BlockTask, loaded: list[np.ndarray]) -> np.ndarray:
        """One block of a catalog method's job. At its first block, a job whose method needs
        the whole tensor first (slerp's norms, sce's selection) makes its passes over the row
        blocks: those the reader kept where the tensor is read once (``engine.held``; a
        tensor of one block is that block), else each read again in turn (one at a time, so
        memory holds a block, not the tensor). A ``cpu/<method>`` job runs on the CPU
        backend, or wholly on torch where it began while its kernels compiled."""
        job = task.job
        on_cpu = job.kernel.backend == "cpu" and not self.cpu.stands_in(task)
        runner = self.catalog if on_cpu else self.workers
        if task.start == 0 and job.kernel.passes > 1:
            held = [loaded] if task.last else self.held.take(job)
            if held is not None:
                blocks = lambda: iter(held)  # noqa: E731
            elif on_cpu:
                blocks = lambda: self._recycled_blocks(job, loaded)  # noqa: E731
            else:
                blocks = lambda: (self.rows.load(other) for other in self.block_tasks(job))  # noqa: E731
            self._statistics[job.name] = runner.prepare(job, blocks)
        state = self._statistics.get(job.name)
        if task.last:
            self._statistics.pop(job.name, None)
        return runner.streamed_block(task, loaded, state, self.report)

    def _recycled_blocks(
        self, job: TensorJob, first: list[np.ndarray]
    ) -> Iterator[list[np.ndarray]]:
        """A job's blocks for a CPU kernel's statistics pass: the first as the pipeline read
        it, the others read into the recycled buffers and given back as the next is read
        (fresh arrays cost a page fault every 4 KiB: at 1.1B, model_stock's statistics pass
        spent more time in the kernel's faults than in its arithmetic). The CPU kernels keep
        nothing of a block once it is summed."""
        yield first
        for other in self.block_tasks(job)[1:]:
            block = self.read_block(other)
            yield block
            self.release(other, block)

    def global_keep_masks(
        self, job: TensorJob, on_torch: bool = False, whole: list[np.ndarray] | None = None
    ) -> list | None:
        """Whole-tensor selections (TIES trim, breadcrumbs) as (rows, n) masks
        (``masks.global_keep_masks``); ``whole``: the tensor's rows, when one block holds it."""
        return global_keep_masks(self, job, on_torch, whole)

    def compute(self, job: TensorJob) -> np.ndarray:
        """One job's whole output tensor, in its output dtype (blocks joined)."""
        chunks = [self.compute_block(task, self.load(task)) for task in self.block_tasks(job)]
        return np.concatenate([chunk.reshape(-1) for chunk in chunks]).reshape(job.shape)
