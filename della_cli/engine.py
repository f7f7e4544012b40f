"""The one loop over tensors: read inputs, merge on the device, hand the result to the writer.

Tensors are merged in blocks of rows, so memory is bounded by a few blocks (plus, for trim
methods, one tensor at a time; see ``Plan.working_memory_bytes``), never by the model's size.
The engine never prints: progress and warnings go to callbacks.

Blocks are numpy arrays of the stored dtypes (``io.dtypes``). On the CPU, merges that neither
sparsify nor elect signs (task arithmetic, linear) are a weighted sum (``methods.weighted_sum``:
a small C kernel, or numpy's loops where it was not built), the others the compiled pass
(``methods.fused_merge``, numba, imported when first needed), both on the inputs as stored,
and torch is never imported; the remaining cases go through ``torch_path``, imported the first
time a block needs it. Block buffers are recycled and placed for fast page-cache copies
(``io.buffers``). Weighted sums on the CPU run in chunks that one thread reads, merges and
writes (``MergeEngine._run_in_chunks``), the reads done by the kernel itself where it was built
(``io.streamed_sum``); the other merges pipeline their blocks through a reader thread, the
merging threads and a writer thread.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from della_cli.errors import ModelError
from della_cli.io import streamed_sum
from della_cli.io.buffers import BufferPool, write_offset
from della_cli.io.dtypes import NUMPY_DTYPES, cast, is_floating
from della_cli.io.reader import ModelReader
from della_cli.io.writer import ShardWriter
from della_cli.methods import ExpertParams, GlobalParams, Rescale, Sparsifier, weighted_sum
from della_cli.methods.counts import magnitude_rank_window
from della_cli.methods.randomness import Draws, derive_key
from della_cli.plan import BASE, Plan, Source, TensorJob
from della_cli.recipe import Recipe

if TYPE_CHECKING:
    from della_cli.methods import fused_merge
    from della_cli.torch_path import Mask, TorchPath

# Elements merged at a time. On the CPU 4M (16 MiB per float32 temporary) amortizes the cost
# of each torch call and larger blocks gain nothing (measured: 1M and 4M equal, 256K 15%
# slower); on a GPU larger blocks keep the device busy.
CPU_BLOCK_ELEMENTS = 1 << 22
CUDA_BLOCK_ELEMENTS = 1 << 26
DEFAULT_BLOCK_ELEMENTS = CPU_BLOCK_ELEMENTS
MAX_WRITES_IN_FLIGHT = 2
# Entries per chunk of a weighted-sum merge on the CPU, which one thread reads, merges and
# writes (``MergeEngine._run_in_chunks``). Smaller chunks pay Python's cost per chunk more
# often, and larger ones no longer fit the caches: with a base and three bfloat16 experts, a
# 1M-entry chunk and its result take 10 MiB, and the reference machine's L3 is 32 MiB. Measured
# there (~250M task arithmetic, medians of 7): 128K 2.24 s, 512K 1.48-1.56, 1M 1.39-1.45, 4M 1.63.
CHUNK_ELEMENTS = 1 << 20
# Bytes per element of the widest dtype a pooled block buffer holds (float32).
MAX_ITEMSIZE = 4
# Sparsifiers that select over a whole tensor before it can be merged in blocks.
WHOLE_TENSOR_SPARSIFIERS = (Sparsifier.MAGNITUDE, Sparsifier.MAGNITUDE_OUTLIERS)


def block_elements_for(device: str) -> int:
    return CUDA_BLOCK_ELEMENTS if device.startswith("cuda") else CPU_BLOCK_ELEMENTS


ProgressCallback = Callable[[TensorJob], None]
# A block merged by a fast CPU pass: its rows, and per input (base first) whether it held
# NaN or Inf.
Merged = tuple[np.ndarray, np.ndarray]
WarningCallback = Callable[[str], None]


@dataclass
class MergeInputs:
    """The opened models of a merge: the base (if any) and the recipe's models, in order."""

    base: ModelReader | None
    experts: list[ModelReader]
    # The commit each Hub input was pinned to, by its reference in the recipe.
    pins: dict[str, str] = field(default_factory=dict)
    download_bytes: int = 0  # weight files of Hub inputs not in the cache yet

    def reader(self, model: int) -> ModelReader:
        if model == BASE:
            assert self.base is not None  # the plan only names BASE when there is one
            return self.base
        return self.experts[model]


@dataclass(frozen=True)
class BlockTask:
    """Rows ``start:stop`` of one job's output (a copy job is one task of the whole tensor)."""

    job: TensorJob
    start: int
    stop: int
    last: bool


class MergeEngine:
    """Runs a plan in blocks of rows, on ``device``, in plan order.

    Three stages overlap: a reader thread fetches the next block's rows from the input files
    (positioned reads release the GIL), the calling thread merges the current block, and a
    writer thread appends finished blocks to their shard (file writes and hashing release the
    GIL too). Only a few blocks are in flight, so memory does not grow with tensor size, except
    that trim methods (TIES, breadcrumbs) read a tensor whole once to select its largest deltas.

    Weighted sums on the CPU (task arithmetic, linear), which move far more bytes than they
    compute on, skip that pipeline: each thread reads, merges and writes chunks of its own
    (``_run_in_chunks``), and the writer still receives every chunk in order.
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
        fused_kernels: bool = True,
        stream_reads: bool = True,
    ):
        self.recipe = recipe
        self.plan = plan
        self.inputs = inputs
        self.device = str(device)  # "cpu", "cuda" or "cuda:N" (a torch.device is accepted)
        self.on_cpu = self.device == "cpu"
        self.on_progress = on_progress or (lambda job: None)
        self.on_warning = on_warning or (lambda message: None)
        self.block_elements = block_elements or block_elements_for(self.device)
        # The compiled whole-merge pass (same bytes as the torch path; off for comparisons).
        self.fused_kernels = fused_kernels
        # Weighted-sum chunks read by io.streamed_sum where it is built (off for comparisons).
        self.stream_reads = stream_reads
        self._stream_scratch = streamed_sum.Scratch()
        # Per job (by name), decided once rather than for each of its chunks: what it sums,
        # and whether io.streamed_sum can read its inputs.
        self._sum_specs: dict[str, weighted_sum.WeightedSum | None] = {}
        self._streamable: dict[str, bool] = {}
        # The merge-wide parameters per tensor (filters and gradients may vary them), by name.
        self._global_params: dict[str, GlobalParams] = {}
        self.strict = strict
        self._masks: dict[str, list[Mask] | None] = {}
        self._reported_nonfinite: set[tuple[int, str]] = set()
        self._torch_path: TorchPath | None = None
        self._scratch = weighted_sum.Scratch()
        # Set while ``run`` runs: weighted_sum's helper threads, recycled block buffers, and
        # the writer (whose file offsets place the output buffers).
        self._sum_pool: ThreadPoolExecutor | None = None
        self._sum_helpers = 0
        self._buffers: BufferPool | None = None
        self._writer: ShardWriter | None = None

    @property
    def _cpu_fast_paths(self) -> bool:
        """Whether the numpy and compiled CPU passes may run (float32 math on the CPU, and
        not switched off for a comparison with the torch path)."""
        return self.fused_kernels and self.on_cpu and self.plan.compute_dtype == "F32"

    @property
    def torch_path(self) -> TorchPath:
        """The torch path, made (and torch imported) the first time a block needs it."""
        if self._torch_path is None:
            from della_cli.torch_path import TorchPath

            self._torch_path = TorchPath(self.device, self.plan.compute_dtype)
        return self._torch_path

    def run(self, writer: ShardWriter, start: int = 0) -> None:
        """Compute and write the jobs from position ``start`` on (later ones on resume)."""
        helpers = _cpu_count() - 1  # asked once: the affinity is a system call
        with (
            ThreadPoolExecutor(1, thread_name_prefix="della-read") as reads,
            ThreadPoolExecutor(1, thread_name_prefix="della-write") as writes,
            # helpers of the calling thread for weighted_sum (threads start on first use)
            ThreadPoolExecutor(max(helpers, 1), thread_name_prefix="della-sum") as sums,
        ):
            self._sum_pool, self._sum_helpers = (sums, helpers) if helpers > 0 else (None, 0)
            self._buffers = BufferPool(self.block_elements * MAX_ITEMSIZE)
            self._writer = writer
            try:
                jobs = self.plan.jobs[start:]
                for in_chunks, group in itertools.groupby(jobs, key=self.merges_in_chunks):
                    tasks = [task for job in group for task in self.block_tasks(job)]
                    if in_chunks:
                        self._run_in_chunks(tasks, writer)
                    else:
                        self._run_tasks(tasks, reads, writes, writer)
            finally:
                self._sum_pool = self._buffers = self._writer = None
                self._sum_helpers = 0

    def _run_tasks(
        self,
        tasks: list[BlockTask],
        reads: ThreadPoolExecutor,
        writes: ThreadPoolExecutor,
        writer: ShardWriter,
    ) -> None:
        prefetched = reads.submit(self.load, tasks[0]) if tasks else None
        in_flight: deque[Future] = deque()
        for index, task in enumerate(tasks):
            loaded = prefetched.result()
            if index + 1 < len(tasks):
                prefetched = reads.submit(self.load, tasks[index + 1])
            chunk = self.compute_block(task, loaded)
            if task.job.action == "merge":  # the output is a new array: the inputs are free
                for array in loaded:
                    self._buffers.give(array)
            del loaded
            in_flight.append(writes.submit(self._write, writer, task, chunk))
            while len(in_flight) > MAX_WRITES_IN_FLIGHT:
                in_flight.popleft().result()
        for future in in_flight:
            future.result()

    def _run_in_chunks(self, tasks: list[BlockTask], writer: ShardWriter) -> None:
        """Weighted-sum chunks, each read, merged and written by one thread, in parallel.

        A sum of a few operations per entry spends more time moving bytes than computing. In
        the pipeline of ``_run_tasks`` every block crosses three threads, so its bytes travel
        between cores and through memory more often than the copies need. Here the calling
        thread and the helpers each take the next chunk, read its rows, merge them and hand
        the result to the writer, which still gets the chunks in order (``_InOrder``); a chunk
        mostly stays in one core's caches from its read to its write. On the 2-core reference
        machine (alternating runs, medians) the ~1.1B model's task arithmetic went from 3.73 to
        3.04 s and from 144 to 78 MB this way (``_InOrder``'s queue then took 3.35 s to 2.93).
        """
        order = _InOrder(len(tasks), ahead=2 * (self._sum_helpers + 1))
        others = [
            self._sum_pool.submit(self._merge_chunks, tasks, order, writer)
            for _ in range(self._sum_helpers)  # none without a pool
        ]
        try:
            self._merge_chunks(tasks, order, writer)
        finally:
            for future in others:
                future.result()

    def _merge_chunks(self, tasks: list[BlockTask], order: _InOrder, writer: ShardWriter) -> None:
        """One thread's share of ``_run_in_chunks``: chunks until none is left."""
        with order.failing_all_on_error():
            while (index := order.claim()) is not None:
                task = tasks[index]
                merged = self.merge_chunk(task)
                order.deliver(index, functools.partial(self._write_merged, writer, task, *merged))

    def merge_chunk(self, task: BlockTask) -> Merged:
        """One chunk of ``_run_in_chunks``: read and merged by ``io.streamed_sum`` where it is
        built, else read into buffers (``load``) and merged by ``weighted_sum``."""
        if self.stream_reads and self._streams(task.job):
            return self.streamed_chunk(task)
        loaded = self.load(task)
        merged = self.weighted_sum_block(task, loaded, split=False)
        if merged is None:  # merges_in_chunks promised otherwise
            raise RuntimeError(f"'{task.job.name}' cannot be merged in chunks")
        for array in loaded:
            self._buffers.give(array)
        return merged

    def _streams(self, job: TensorJob) -> bool:
        """Whether ``io.streamed_sum`` can read and merge ``job``'s chunks (a weighted sum of
        dtypes and an expert count it takes)."""
        streams = self._streamable.get(job.name)
        if streams is None:
            sources = [job.reference, *job.experts]
            dtypes = [self.inputs.reader(s.model).tensors[s.tensor].dtype for s in sources]
            streams = self._weighted_sum_spec(job) is not None and streamed_sum.supports(
                [*dtypes, job.out_dtype], len(job.experts)
            )
            self._streamable[job.name] = streams
        return streams

    def streamed_chunk(self, task: BlockTask) -> Merged:
        """A chunk of a weighted sum whose rows ``io.streamed_sum`` reads from the files itself
        (inputs as stored, as ``merges_in_chunks`` requires, and ``_streams`` true)."""
        job = task.job
        spec = self._weighted_sum_spec(job)
        experts = [
            self.inputs.reader(source.model).row_span(source.tensor, task.start)
            for source in job.experts
        ]
        base = _reference_expert(job)
        if base is None:
            reader = self.inputs.reader(job.reference.model)
            base = reader.row_span(job.reference.tensor, task.start)
        _, row_length = _rows_shape(job.shape)
        out = self.output_buffer(task, (task.stop - task.start, row_length))
        flags = streamed_sum.merge(
            out,
            base,
            experts,
            spec.weights,
            spec.on_deltas,
            None if spec.divisor is None else float(spec.divisor),
            spec.lambda_,
            self._stream_scratch,
        )
        return out, flags

    def _write_merged(
        self, writer: ShardWriter, task: BlockTask, merged: np.ndarray, nonfinite: np.ndarray
    ) -> None:
        """Write a chunk merged by ``_merge_chunks``, first reporting its non-finite inputs
        (in order, so a warning names the first tensor that had one)."""
        if nonfinite.any():
            sources = [task.job.reference, *task.job.experts]
            self.report_nonfinite(sources, [bool(flag) for flag in nonfinite])
        self._write(writer, task, merged)

    def merges_in_chunks(self, job: TensorJob) -> bool:
        """Whether ``job`` runs in ``_run_in_chunks``: a weighted-sum merge on the CPU
        (``weighted_sum_block``'s conditions, read from the headers) of inputs taken as they
        are stored, without fitting a vocabulary."""
        if job.action != "merge" or self._weighted_sum_params(job) is None:
            return False
        sources = [job.reference, *job.experts]
        if any(source.rows is not None for source in sources):
            return False
        infos = [self.inputs.reader(s.model).tensors.get(s.tensor) for s in sources]
        if any(info is None or tuple(info.shape) != job.shape for info in infos):
            return False
        dtypes = [NUMPY_DTYPES.get(info.dtype) for info in infos]
        dtypes.append(NUMPY_DTYPES.get(job.out_dtype))
        return all(dtype is not None and weighted_sum.supports(dtype) for dtype in dtypes)

    def _weighted_sum_params(self, job: TensorJob) -> list[ExpertParams] | None:
        """The experts' parameters where ``job`` merges as a weighted sum on the CPU (nothing
        sparsified or elected, the fast paths on), else None."""
        method = self.recipe.method
        if not self._cpu_fast_paths or method.sign_consensus:
            return None
        params = [self.recipe.expert_params(source.model, job.name) for source in job.experts]
        if not all(_keeps_everything(method.sparsifier, p) for p in params):
            return None
        return params

    def global_params(self, name: str) -> GlobalParams:
        """The merge-wide parameters of tensor ``name``, asked of the recipe once per tensor."""
        params = self._global_params.get(name)
        if params is None:
            params = self._global_params[name] = self.recipe.global_params(name)
        return params

    def _weighted_sum_spec(self, job: TensorJob) -> weighted_sum.WeightedSum | None:
        """What ``job`` sums where it merges as a weighted sum on the CPU, else None (decided
        once per job: its chunks ask again and again)."""
        if job.name not in self._sum_specs:
            params = self._weighted_sum_params(job)
            spec = None
            if params is not None:
                spec = weighted_sum.WeightedSum(
                    weights=tuple(p.weight for p in params),
                    on_deltas=self.recipe.method.on_deltas,
                    normalize=self.global_params(job.name).normalize,
                    lambda_=self.global_params(job.name).lambda_,
                )
            self._sum_specs[job.name] = spec
        return self._sum_specs[job.name]

    def _write(self, writer: ShardWriter, task: BlockTask, chunk: np.ndarray) -> None:
        writer.write_part(task.job.name, chunk)
        if task.job.action == "merge":
            self._buffers.give(chunk)
        if task.last:
            self.on_progress(task.job)

    def compute(self, job: TensorJob) -> np.ndarray:
        """One job's whole output tensor, in its output dtype (blocks joined)."""
        chunks = [self.compute_block(task, self.load(task)) for task in self.block_tasks(job)]
        return np.concatenate([chunk.reshape(-1) for chunk in chunks]).reshape(job.shape)

    def block_tasks(self, job: TensorJob) -> list[BlockTask]:
        if job.action != "merge":
            blocks = [(0, 1)]
        elif self.merges_in_chunks(job):
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
        total_rows, row_length = _rows_shape(job.shape)
        whole = self.global_params(job.name).rescale is Rescale.L1 and self.recipe.method.is_random
        if whole or total_rows * row_length <= elements:
            return [(0, total_rows)]
        step = max(1, elements // max(row_length, 1))
        return [(r, min(r + step, total_rows)) for r in range(0, total_rows, step)]

    def load(self, task: BlockTask) -> list[np.ndarray]:
        """The raw rows of a block (reference first, then each expert), as stored."""
        job = task.job
        if job.action == "copy":
            if job.reference.rows is None:
                return [self.read(job.reference)]
            rows, _ = _rows_shape(job.shape)
            return [self.read_reference_rows(job, 0, rows).reshape(job.shape)]
        pool = self._buffers
        experts = [
            self.read_expert_rows(job, source, task.start, task.stop, pool)
            for source in job.experts
        ]
        shared = _reference_expert(job)
        if shared is not None:  # the same rows, read once
            return [experts[shared], *experts]
        return [self.read_reference_rows(job, task.start, task.stop, pool), *experts]

    def read(self, source: Source) -> np.ndarray:
        """One input tensor, as stored."""
        return self.inputs.reader(source.model).read(source.tensor)

    def read_rows(
        self, source: Source, start: int, stop: int, pool: BufferPool | None = None
    ) -> np.ndarray:
        return self.inputs.reader(source.model).read_rows(source.tensor, start, stop, pool)

    def read_reference_rows(
        self, job: TensorJob, start: int, stop: int, pool: BufferPool | None = None
    ) -> np.ndarray:
        """The reference's rows, fitted to the job's shape when ``tokenizer_source`` changed the
        vocabulary: rows past the job's are not read, and rows past the reference's own come
        from its ``fill`` source."""
        source = job.reference
        if source.rows is None:
            return self.read_rows(source, start, stop, pool)
        return self.fitted_rows(job, source, start, stop, source.fill)

    def read_expert_rows(
        self,
        job: TensorJob,
        source: Source,
        start: int,
        stop: int,
        pool: BufferPool | None = None,
    ) -> np.ndarray:
        """An expert's rows, fitted to the reference's vocabulary: extra rows are cropped, and
        rows it lacks are the reference's own (a zero delta), in the compute dtype."""
        if source.rows is None:
            return self.read_rows(source, start, stop, pool)
        return self.fitted_rows(job, source, start, stop, None, self.plan.compute_dtype)

    def fitted_rows(
        self,
        job: TensorJob,
        source: Source,
        start: int,
        stop: int,
        fill: Source | None,
        dtype: str | None = None,
    ) -> np.ndarray:
        """Rows ``start:stop`` of the job's shape from ``source``, which has ``source.rows``
        rows: its own up to there, the rest from ``fill`` (None: the job's reference), each
        part in ``dtype`` if given. A 1-D vocabulary tensor (an lm_head bias) is one row whose
        entries are fitted instead."""
        one_row = len(job.shape) <= 1
        if one_row:
            start, stop = 0, job.shape[0]

        def rows_of(of: Source | None, first: int, last: int) -> np.ndarray:
            if of is None:
                if one_row:
                    return self.read_reference_rows(job, 0, 1).reshape(-1)[first:last]
                return self.read_reference_rows(job, first, last)
            return self.read(of)[first:last] if one_row else self.read_rows(of, first, last)

        have = min(source.rows, stop)
        parts = [rows_of(source, start, have)] if start < have else []
        if stop > have:
            parts.append(rows_of(fill, max(start, have), stop))
        joined = np.concatenate([cast(part, dtype) for part in parts] if dtype else parts)
        return joined.reshape(1, -1) if one_row else joined

    def compute_block(self, task: BlockTask, loaded: list[np.ndarray]) -> np.ndarray:
        """The output rows of one block, in the output dtype."""
        job = task.job
        if job.action == "copy":
            self.warn_if_experts_differ(job, loaded[0])
            self.check_copied_values(job, loaded[0])
            return cast(loaded[0], job.out_dtype)
        if task.start == 0:
            self._masks[job.name] = self.global_keep_masks(job)
        masks = self._masks[job.name]
        if task.last:
            del self._masks[job.name]
        mask_blocks = None if masks is None else [m[task.start : task.stop] for m in masks]
        fast = self.weighted_sum_block(task, loaded) or self.fused_block(task, loaded, mask_blocks)
        if fast is not None:
            merged, nonfinite = fast
            if nonfinite.any():
                self.report_nonfinite([job.reference, *job.experts], [bool(f) for f in nonfinite])
            return merged
        path = self.torch_path
        base, *models = path.inputs(loaded)
        flagged = path.nonfinite([base, *models])
        if flagged is not None:
            self.report_nonfinite([job.reference, *job.experts], flagged)
        recipe_indices = [source.model for source in job.experts]
        return path.merge(
            self.recipe.method,
            base,
            models,
            [self.recipe.expert_params(i, job.name) for i in recipe_indices],
            self.global_params(job.name),
            self.uniform_draws(job, recipe_indices, task.start * base.shape[1]),
            mask_blocks,
            job.out_dtype,
        )

    def weighted_sum_block(
        self, task: BlockTask, loaded: list[np.ndarray], split: bool = True
    ) -> Merged | None:
        """The block merged by ``weighted_sum`` where nothing is sparsified or elected (task
        arithmetic, linear): a few operations per entry, for which numba's start-up would cost
        more than it saves. None where it does not apply. ``split``: whether the helper
        threads take spans of the block (not when each thread merges chunks of its own)."""
        job = task.job
        first = loaded[0]
        if not (
            weighted_sum.supports(NUMPY_DTYPES[job.out_dtype])
            and all(weighted_sum.supports(t.dtype) and t.shape == first.shape for t in loaded)
        ):
            return None
        spec = self._weighted_sum_spec(job)
        if spec is None:
            return None
        return weighted_sum.merge_block(
            first,
            loaded[1:],
            spec,
            NUMPY_DTYPES[job.out_dtype],
            self._sum_pool if split else None,
            self._sum_helpers if split else 0,
            out=self.output_buffer(task, first.shape),
            scratch=self._scratch,
        )

    def output_buffer(self, task: BlockTask, shape: tuple[int, ...]) -> np.ndarray:
        """An array for a block's output, placed for the write of its bytes (``io.buffers``);
        recycled once written."""
        job = task.job
        dtype = NUMPY_DTYPES[job.out_dtype]
        nbytes = math.prod(shape) * dtype.itemsize
        if self._writer is None or self._buffers is None:
            return np.empty(shape, dtype=dtype)
        offset = self._writer.file_offset(job.name, task.start * (nbytes // max(shape[0], 1)))
        return self._buffers.take(nbytes, write_offset(offset)).view(dtype).reshape(shape)

    def fused_block(
        self, task: BlockTask, loaded: list[np.ndarray], mask_blocks: list[Mask] | None
    ) -> Merged | None:
        """The block merged by the compiled whole-merge pass, straight from the inputs as
        stored, or None where that pass does not apply (the torch path then runs). Where it
        applies, the trim masks are trim_select's arrays: both need the same CPU dtypes."""
        from della_cli.methods import fused_merge  # numba: imported only when needed

        job = task.job
        out_dtype = NUMPY_DTYPES[job.out_dtype]
        shared = self.global_params(job.name)
        if not self._fused_applies(loaded, out_dtype, shared):
            return None
        n = loaded[0].shape[1]
        plans = [self._expert_plan(job.name, source.model, n) for source in job.experts]
        if any(plan is None for plan in plans):
            return None
        return fused_merge.merge_block(
            loaded[0],
            loaded[1:],
            plans,
            mask_blocks,
            start=task.start * n,
            rescale=shared.rescale is Rescale.KEEP_PROB,
            on_deltas=self.recipe.method.on_deltas,
            consensus=self.recipe.method.sign_consensus,
            normalize=shared.normalize,
            lambda_=shared.lambda_,
            out_dtype=out_dtype,
            out=self.output_buffer(task, loaded[0].shape),
        )

    def _fused_applies(
        self, loaded: list[np.ndarray], out_dtype: np.dtype, shared: GlobalParams
    ) -> bool:
        from della_cli.methods import fused_merge

        first = loaded[0]
        return (
            self._cpu_fast_paths
            and fused_merge.supports(first.dtype)
            and fused_merge.supports(out_dtype)
            and first.ndim == 2
            and all(t.dtype == first.dtype and t.shape == first.shape for t in loaded)
            and shared.rescale in (Rescale.KEEP_PROB, Rescale.NONE)
        )

    def _expert_plan(self, name: str, index: int, n: int) -> fused_merge.ExpertPlan | None:
        """How expert ``index`` is sparsified in the fused pass, as ``sparsify_delta`` does it
        (None: a case only the torch path handles)."""
        from della_cli.methods import fused_merge

        params = self.recipe.expert_params(index, name)
        sparsifier = self.recipe.method.sparsifier
        density = params.density
        if _keeps_everything(sparsifier, params):
            return fused_merge.ExpertPlan(fused_merge.KEEP_ALL, weight=params.weight)
        if sparsifier in WHOLE_TENSOR_SPARSIFIERS:
            return fused_merge.ExpertPlan(fused_merge.MASK, weight=params.weight)
        if sparsifier is Sparsifier.MAGPRUNE and n <= 1:
            return None  # a row of one entry has q = 1/2, which the torch path computes
        key = self.draws(name, index, 0).key_words
        mode = fused_merge.MAGPRUNE if sparsifier is Sparsifier.MAGPRUNE else fused_merge.RANDOM
        epsilon = (params.epsilon or 0.0) if mode == fused_merge.MAGPRUNE else 0.0
        return fused_merge.ExpertPlan(mode, density, epsilon, params.weight, key)

    def check_copied_values(self, job: TensorJob, values: np.ndarray) -> None:
        """A copied tensor meets no merge kernel, whose pass over the inputs flags NaN and
        Inf; a NaN in a base tensor no expert has would reach the output unannounced."""
        if is_floating(job.out_dtype) and not np.isfinite(values).all():
            self.report_nonfinite([job.reference], [True], "it is copied into the output as is")

    def report_nonfinite(
        self,
        sources: Sequence[Source],
        flagged: Sequence[bool],
        outcome: str = "the merged tensor may hold them too",
    ) -> None:
        """Warn once per input tensor that held NaN or Inf; under ``strict``, fail."""
        for source, bad in zip(sources, flagged, strict=True):
            key = (source.model, source.tensor)
            if key in self._reported_nonfinite or not bad:
                continue
            self._reported_nonfinite.add(key)
            message = f"'{self.label(source.model)}' has NaN or Inf values in '{source.tensor}'"
            if self.strict:
                raise ModelError(f"{message}; refusing to merge under --strict")
            self.on_warning(f"{message}; {outcome}")

    def label(self, model: int) -> str:
        if model == BASE:
            return self.recipe.schema.base_model or "base"
        return self.recipe.model_refs[model]

    def global_keep_masks(self, job: TensorJob) -> list[Mask] | None:
        """Whole-tensor selections (TIES trim, breadcrumbs) as (rows, n) masks, made before
        blocking, one expert at a time so only one full task vector is alive."""
        sparsifier = self.recipe.method.sparsifier
        if sparsifier not in WHOLE_TENSOR_SPARSIFIERS:
            return None
        from della_cli.methods import trim_select  # numba: imported only when needed

        total_rows, _ = _rows_shape(job.shape)
        reference = self.read_reference_rows(job, 0, total_rows)  # kept as stored: smaller
        masks: list[Mask] = []
        for source in job.experts:
            params = self.recipe.expert_params(source.model, job.name)
            expert = self.read_expert_rows(job, source, 0, total_rows)
            if _keeps_everything(sparsifier, params):
                masks.append(np.ones(expert.shape, dtype=np.bool_))
                continue
            gamma = None if sparsifier is Sparsifier.MAGNITUDE else (params.gamma or 0.0)
            if self.on_cpu and trim_select.supports(expert, reference):
                low, high = magnitude_rank_window(expert.size, params.density, gamma)
                masks.append(trim_select.window_keep_mask(expert, reference, low, high))
            else:
                masks.append(self.torch_path.keep_mask(expert, reference, params.density, gamma))
            del expert
        return masks

    def uniform_draws(self, job: TensorJob, recipe_indices: Sequence[int], start: int):
        """Draws for the expert at each position, keyed by its index in the recipe and by the
        flat index of the block's first element, so blocks draw what the whole tensor would."""
        if not self.recipe.method.is_random:
            return None
        return lambda position: self.draws(job.name, recipe_indices[position], start)

    def draws(self, name: str, index: int, start: int) -> Draws:
        """The draws of recipe model ``index`` on tensor ``name`` from flat index ``start``."""
        return Draws(derive_key(self.recipe.seed, name, index), start)

    def warn_if_experts_differ(self, job: TensorJob, reference: np.ndarray) -> None:
        """Non-floating tensors (buffers, masks) are copied from the reference; say so if an
        expert disagrees, since that usually means a different architecture setting."""
        for index, expert in enumerate(self.inputs.experts):
            info = expert.tensors.get(job.name)
            if info is None or info.is_floating or index == job.reference.model:
                continue
            other = expert.read(job.name)
            if other.shape != reference.shape or not np.array_equal(other, reference):
                self.on_warning(
                    f"'{self.recipe.model_refs[index]}' differs from the base in "
                    f"non-float tensor '{job.name}'; the base's is kept"
                )


class _InOrder:
    """Hands out task indices to threads and writes their results in index order.

    A thread that finishes a task out of turn leaves its write queued and goes on to the next
    task rather than wait; the thread whose result fills the gap writes every queued result
    that follows. A thread stays at most ``ahead`` tasks ahead of the last one written, which
    bounds the memory held by queued results.
    """

    def __init__(self, count: int, ahead: int):
        self.count = count
        self.ahead = ahead
        self._claimed = 0
        self._written = 0  # tasks written (all those before this index)
        self._queued: dict[int, Callable[[], None]] = {}
        self._writing = False  # whether a thread is writing queued results
        self._failed = False
        self._condition = threading.Condition()

    def claim(self) -> int | None:
        """The next task nobody took, or None when all are taken (or a thread failed)."""
        with self._condition:
            if self._failed or self._claimed == self.count:
                return None
            self._claimed += 1
            return self._claimed - 1

    def deliver(self, index: int, write: Callable[[], None]) -> None:
        """Queue ``write``, the result of task ``index``, and write in order whatever is due;
        first wait while the task is ``ahead`` or more past the last one written."""
        with self._condition:
            self._condition.wait_for(lambda: index < self._written + self.ahead or self._failed)
            if self._failed:
                raise _OtherThreadFailed
            self._queued[index] = write
            if self._writing:  # the writing thread takes it when its turn comes
                return
            self._writing = True
        while True:
            with self._condition:
                due = self._queued.pop(self._written, None)
                if due is None or self._failed:
                    self._writing = False
                    return
            due()  # if it raises, failing_all_on_error stops every thread
            with self._condition:
                self._written += 1
                self._condition.notify_all()

    @contextmanager
    def failing_all_on_error(self) -> Iterator[None]:
        """If the body raises, stops the other threads (their waits end) and re-raises; a
        thread stopped so returns quietly, leaving the error to the thread that had it."""
        try:
            yield
        except _OtherThreadFailed:
            return
        except BaseException:
            with self._condition:
                self._failed = True
                self._condition.notify_all()
            raise


class _OtherThreadFailed(Exception):
    """Raised in a thread waiting for its turn when another thread failed."""


def _reference_expert(job: TensorJob) -> int | None:
    """The expert whose rows are also the job's reference, where one is: a linear merge
    without a base takes its first model as the reference, whose rows are then read once (a
    quarter of the reads with three models)."""
    for index, source in enumerate(job.experts):
        if source == job.reference and source.rows is None:
            return index
    return None


def _keeps_everything(sparsifier: Sparsifier, params: ExpertParams) -> bool:
    """Whether an expert's task vector is kept whole, as ``sparsify_delta`` decides it."""
    return sparsifier is Sparsifier.NONE or params.density is None or params.density >= 1.0


def _cpu_count() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _rows_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length) of a tensor seen as (shape[0], -1); a 1-D or 0-D tensor is one row."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])
