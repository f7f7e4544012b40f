"""The one loop over tensors: read inputs, run the kernel the plan chose, hand the result to
the writer.

Tensors are merged in blocks of rows, so memory is bounded by a few blocks (plus, for trim
methods, one tensor at a time; see ``Plan.working_memory_bytes``), never by the model's size.
The plan gives each job its backend and kernel (``della_cli.kernels``); the engine runs it:

- ``shared``: the opened inputs, block tasks and sizes every room uses;
- ``schedule``: the threads (the reader, merging and writer pipeline, and the chunks of
  weighted sums that one thread reads, merges and writes) and the order of the writes;
- ``rows``: a block's rows from the input files, fitted to the job's vocabulary
  (``aligned_rows``: re-indexed, token by token, to a tokenizer the merge builds);
- ``computing``: a block through its job's kernel (``BlockComputation``, which the engine
  is built on): a chunk of a weighted sum, a pipeline block, a catalog method's block;
- ``masks``: the whole-tensor selections (TIES, breadcrumbs) made before a job's blocks;
- ``cpu_jobs``, ``catalog_jobs`` and ``torch_jobs``: the two backends applied to blocks; a
  catalog method that needs whole-tensor statistics (slerp's norms and dot product) first
  sums them over the tensor's row blocks, read one at a time, then merges block by block
  (``streamed_block``);
  ``torch_workers``: one torch worker per device (on several, ``schedule.run_on_devices``),
  each merging the jobs the plan gave its device, and ``memory_retry``: a block a device had
  no memory for, merged again in halves, then on the CPU;
- ``reporting``: warnings (non-finite inputs, differing non-float tensors).

The engine never prints: progress and warnings go to callbacks. Block buffers are recycled
and placed for fast page-cache copies (``io.buffers``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np

from della_cli.engine.allocator import keep_freed_memory
from della_cli.engine.catalog_jobs import CatalogJobs, relays_rows
from della_cli.engine.computing import BlockComputation
from della_cli.engine.cpu_jobs import CpuJobs
from della_cli.engine.held import HeldBlocks, budget_of, held_buffers
from della_cli.engine.reporting import Reporter
from della_cli.engine.rows import RowLoader
from della_cli.engine.schedule import InOrder, run_in_chunks, run_on_devices, run_pipeline
from della_cli.engine.shared import (
    CHUNK_ELEMENTS,
    CPU_BLOCK_ELEMENTS,
    CUDA_BLOCK_ELEMENTS,
    DEFAULT_BLOCK_ELEMENTS,
    MAX_ITEMSIZE,
    SMALL_TASK_ELEMENTS,
    BlockTask,
    MergeInputs,
    ProgressCallback,
    WarningCallback,
    WarningLog,
    block_elements_for,
    rows_shape,
    task_elements,
)
from della_cli.engine.threads import ThreadBudget
from della_cli.engine.torch_jobs import TorchJobs
from della_cli.engine.torch_workers import TorchWorkers
from della_cli.io.buffers import BufferPool, RelayPool, write_offset
from della_cli.io.dtypes import NUMPY_DTYPES
from della_cli.io.writer import ShardWriter
from della_cli.kernels import WHOLE_TENSOR_SPARSIFIERS
from della_cli.methods import Rescale
from della_cli.plan import Plan, TensorJob
from della_cli.recipe import Recipe

# Free buffers the pool keeps for the pipeline's blocks (the reader's, the merging thread's
# and the writer's, a few each), beyond those of the tensors read once.
PIPELINE_FREE_BUFFERS = 32

__all__ = [
    "CHUNK_ELEMENTS",
    "CPU_BLOCK_ELEMENTS",
    "CUDA_BLOCK_ELEMENTS",
    "DEFAULT_BLOCK_ELEMENTS",
    "WHOLE_TENSOR_SPARSIFIERS",
    "BlockTask",
    "InOrder",
    "MergeEngine",
    "MergeInputs",
    "ProgressCallback",
    "WarningCallback",
    "WarningLog",
    "block_elements_for",
]


class MergeEngine(BlockComputation):
    """Runs a plan in blocks of rows, on ``device``, in plan order, each job by its kernel.

    ``threads``: the compute threads the merge may use (default: the cores this process may
    run on, never more); the engine's reader and writer threads, which mostly wait, are not
    counted against it (``threads``).
    """

    def __init__(
        self,
        recipe: Recipe,
        plan: Plan,
        inputs: MergeInputs,
        device: str,
        on_progress: ProgressCallback | None = None,
        on_warning: WarningCallback | None = None,
        block_elements: int | None = None,
        strict: bool = False,
        threads: int | None = None,
        on_notice: WarningCallback | None = None,
    ):
        self.recipe = recipe
        self.on_notice = on_notice
        self.plan = plan
        self.inputs = inputs
        self.device = str(device)  # "cpu", "cuda" or "cuda:N" (a torch.device is accepted)
        # The plan's devices where it spread the jobs over several, else this one.
        self.devices = list(plan.devices) if len(plan.devices) > 1 else [self.device]
        self.on_progress = on_progress or (lambda job: None)
        self.block_elements = (
            block_elements or plan.block_elements or block_elements_for(self.device)
        )
        if self.device != "cpu" and any(
            job.kernel is not None and job.kernel.backend == "cpu" for job in plan.jobs
        ):
            raise ValueError(f"the plan was made for the CPU, not for {self.device}")
        self.threads = ThreadBudget(threads)
        self.rows = RowLoader(inputs, plan.compute_dtype, plan.vocabulary)
        budget = budget_of(plan.read_once_bytes, plan.jobs, inputs, self.block_elements)
        self.held = HeldBlocks(inputs, budget, plan.jobs)
        self.report = Reporter(recipe, inputs, on_warning or (lambda message: None), strict)
        self.cpu = CpuJobs(recipe.method, self.threads)
        self.workers = TorchWorkers(
            self.devices, plan.compute_dtype, recipe.method, self.threads, self.report.on_warning
        )
        self.torch: TorchJobs = self.workers.workers[0]
        self.catalog = CatalogJobs(
            self.torch, self.output_buffer, self.threads, lambda: self._helpers
        )
        self._masks: dict[str, list | None] = {}
        self._statistics: dict[str, object] = {}  # per job of a catalog method, while it runs
        # Set while ``run`` runs: helper threads, recycled block buffers, and the writer
        # (whose file offsets place the output buffers).
        self._helpers: ThreadPoolExecutor | None = None
        self._buffers: BufferPool | None = None
        self._writer: ShardWriter | None = None

    def run(self, writer: ShardWriter, start: int = 0) -> None:
        """Compute and write the jobs from position ``start`` on (later ones on resume)."""
        helpers = self.threads.chunk_helpers
        keep_freed_memory()
        with (
            ThreadPoolExecutor(1, thread_name_prefix="della-read") as reads,
            ThreadPoolExecutor(1, thread_name_prefix="della-write") as writes,
            ThreadPoolExecutor(max(helpers, 1), thread_name_prefix="della-sum") as sums,
        ):
            self._helpers = sums if helpers > 0 else None
            self._buffers = self.block_pool()
            self._writer = writer
            try:
                self.cpu.start_compiling(self.plan.jobs[start:], self.inputs)
                with self._compile_notice():
                    self._run_jobs(start, reads, writes, helpers)
            finally:
                self._helpers = self._buffers = self._writer = None

    def block_pool(self) -> BufferPool:
        """Recycled buffers of a block each, enough kept free for the pipeline's blocks and
        for the tensors read once (``held.held_buffers``)."""
        kept = PIPELINE_FREE_BUFFERS + held_buffers(self.held.budget, self.block_elements)
        return BufferPool(self.block_elements * MAX_ITEMSIZE, max_free=kept)

    def _compile_notice(self) -> contextlib.AbstractContextManager:
        """Say so once when numba compiles (``backends.cpu.compile_notice``)."""
        compiled = any(job.kernel is not None and job.kernel.compiled for job in self.plan.jobs)
        if self.on_notice is None or not compiled:
            return contextlib.nullcontext()
        from della_cli.backends.cpu import compile_notice

        return compile_notice(self.on_notice)

    def _run_jobs(self, start: int, reads: Executor, writes: Executor, helpers: int) -> None:
        """The jobs from ``start`` on: weighted sums in chunks, the rest in the pipeline."""
        jobs = self.plan.jobs[start:]
        for in_chunks, group in itertools.groupby(jobs, key=_in_chunks):
            tasks = [task for job in group for task in self.block_tasks(job)]
            if in_chunks:
                run_in_chunks(self, tasks, self._helpers, helpers if self._helpers else 0)
            elif len(self.workers) > 1:
                run_on_devices(self, tasks, len(self.workers))
            else:
                run_pipeline(self, tasks, reads, writes)

    def load(self, task: BlockTask) -> list[np.ndarray]:
        """The raw rows of a block (reference first, then each expert), as stored; of a
        tensor read once (``engine.held``), all its blocks at its first."""
        return self.held.load(task, self.block_tasks, self.read_block)

    def load_kernels(self) -> None:
        """Load the cached CPU kernels the merge will call (``CpuJobs.load_kernels``)."""
        self.cpu.load_kernels()

    def read_block(self, task: BlockTask) -> list[np.ndarray]:
        """A block's raw rows from the files, into the recycled buffers."""
        return self.rows.load(task, self._pool_for(task))

    def load_ahead(self, task: BlockTask) -> list[np.ndarray]:
        """``load``, by a reader thread ahead of the block's merge; a block that a CUDA
        device merges with ``torch/merge`` also starts on its way there (``stage``)."""
        loaded = self.load(task)
        self.workers.stage(task, loaded)
        return loaded

    def _pool_for(self, task: BlockTask) -> BufferPool | RelayPool | None:
        """The recycled block buffers, for all but small tasks (``SMALL_TASK_ELEMENTS``): a
        batch of small tasks would otherwise hold a block-sized buffer for each input. Rows
        that go to the writer as read (``relays_rows``) are placed for their write too."""
        if task_elements(task) <= SMALL_TASK_ELEMENTS:
            return None
        if self._writer is None or not relays_rows(task.job):
            return self._buffers
        return RelayPool(self._buffers, self._write_at(task))

    def _write_at(self, task: BlockTask) -> int:
        """Where the first byte of a block's output lands in its shard file."""
        row_bytes = rows_shape(task.job.shape)[1] * NUMPY_DTYPES[task.job.out_dtype].itemsize
        return self._writer.file_offset(task.job.name, task.start * row_bytes)

    def release(self, task: BlockTask, loaded: list[np.ndarray], merged=None) -> None:
        """Give a merged block's input buffers back (a copy's output is its input), each once
        (the reference's rows are an expert's too where it is one of them: given twice, a
        buffer the reader took again between the two gives went back to the pool while in
        use), but for ``merged``, the output, where the kernel passed an input on as it (the
        writer gives it back once written)."""
        if task.job.action != "merge" or self._buffers is None:
            return
        given: set[int] = set()
        for array in loaded:
            # not rows sent as stored to the device
            if isinstance(array, np.ndarray) and array is not merged and id(array) not in given:
                given.add(id(array))
                self._buffers.give(array)

    def write(self, task: BlockTask, chunk: np.ndarray) -> None:
        self._writer.write_part(task.job.name, chunk)
        if task.job.action == "merge":
            self._buffers.give(chunk)
        if task.last:
            self.on_progress(task.job)

    def write_merged(self, task: BlockTask, merged: np.ndarray, nonfinite: np.ndarray) -> None:
        """Write a chunk, first reporting its non-finite inputs (in order, so a warning names
        the first tensor that had one)."""
        if nonfinite.any():
            self.report.nonfinite(task.job, [bool(flag) for flag in nonfinite])
        self.write(task, merged)

    def output_buffer(self, task: BlockTask, shape: tuple[int, ...]) -> np.ndarray:
        """An array for a block's output, placed for the write of its bytes (``io.buffers``);
        recycled once written."""
        dtype = NUMPY_DTYPES[task.job.out_dtype]
        nbytes = math.prod(shape) * dtype.itemsize
        small = task_elements(task) <= SMALL_TASK_ELEMENTS  # as ``_pool_for`` says
        if self._writer is None or self._buffers is None or small:
            return np.empty(shape, dtype=dtype)
        placement = write_offset(self._write_at(task))
        return self._buffers.take(nbytes, placement).view(dtype).reshape(shape)

    def block_tasks(self, job: TensorJob) -> list[BlockTask]:
        if job.action != "merge":
            blocks = [(0, 1)]
        elif _in_chunks(job):
            blocks = self.row_blocks(job, min(self.block_elements, CHUNK_ELEMENTS))
        else:
            blocks = self.row_blocks(job)
        return [BlockTask(job, a, b, last=(b == blocks[-1][1])) for a, b in blocks]

    def row_blocks(self, job: TensorJob, elements: int | None = None) -> list[tuple[int, int]]:
        """Blocks of whole rows to merge at a time, so temporaries stay small.

        Every step of the pipeline is element-wise or row-wise once whole-tensor selections
        (TIES, breadcrumbs) are made up front, so merging by blocks gives the same bytes as
        merging the whole tensor; only the L1 rescale, a whole-tensor norm, needs it whole.
        ``elements``: the block size (default the engine's).
        """
        elements = elements or self.block_elements
        total_rows, row_length = rows_shape(job.shape)
        l1 = job.kernel is not None and job.kernel.shared.rescale is Rescale.L1
        whole = l1 and self.recipe.method.is_random
        if whole or total_rows * row_length <= elements:
            return [(0, total_rows)]
        step = max(1, elements // max(row_length, 1))
        return [(r, min(r + step, total_rows)) for r in range(0, total_rows, step)]


def _in_chunks(job: TensorJob) -> bool:
    return job.action == "merge" and job.kernel.in_chunks
