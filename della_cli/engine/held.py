"""Inputs read once for methods that make a statistics pass before their merge pass.

slerp, nuslerp, multislerp, karcher, model_stock, sce, ram, ramplus_tl and arcee_fusion on
the CPU backend need whole-tensor statistics (norms, Gram matrices, a selection) before the
first output row, so their passes go over each tensor's row blocks more than once. Read from
the files each pass, every input is copied from the page cache two to four times. Where a
tensor's stored inputs fit in ``READ_ONCE_BYTES`` (``Plan.read_once_bytes``), the reader
thread reads all of its blocks at once, the passes run over those blocks in memory, and the
merge pass takes each block from there, in order, giving its buffers back once merged. The
reads happen ahead: where the tensor before is read once too, while the merging thread runs
that one's statistics passes (when the reader hands over its second block), else when the
reader reads the last block of the tensor before. A larger tensor is read again for each pass, a
block at a time.

The default budget is also no more than the tensors of a layer need (``budget_of``): at
~1.1B (bf16 base + 3 experts) every MLP matrix (4 × 23 MB) is read once, and the embeddings
and output head (4 × 131 MB, two tensors of their size) are read for each pass; the plan
reports which. Memory: the blocks of the tensor being merged and of the next one, read ahead,
so at most two budgets beyond the pipeline's blocks.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable

import numpy as np

from della_cli.engine.shared import (
    MAX_ITEMSIZE,
    BlockTask,
    MergeInputs,
    reference_expert,
    rows_shape,
)
from della_cli.io.dtypes import NUMPY_DTYPES, itemsize
from della_cli.plan import Source, TensorJob

READ_ONCE_BYTES = 512 << 20
# Tensors at least this many share a size class with (or exceed), for the default budget.
REPEATED_TENSORS = 4


def has_passes(job: TensorJob) -> bool:
    """Whether a job's method makes statistics passes before its merge pass."""
    return job.action == "merge" and job.kernel is not None and job.kernel.passes > 1


def held_input_bytes(job: TensorJob, inputs: MergeInputs) -> int:
    """The bytes of a job's inputs as the reader hands them over: as stored (at least the
    output's itemsize, for rows dequantized on reading), in float32 where rows are computed,
    fitted to another vocabulary or re-indexed. The reference is counted once where an expert
    is also it."""
    sources = list(job.experts)
    if reference_expert(job) is None:
        sources.append(job.reference)
    return sum(job.numel * _held_itemsize(job, source, inputs) for source in sources)


def _held_itemsize(job: TensorJob, source: Source, inputs: MergeInputs) -> int:
    if source.rows is not None or source.aligned or source.on_device:
        return MAX_ITEMSIZE
    reader = inputs.reader(source.model)
    info = getattr(reader, "tensors", {}).get(source.tensor)
    if info is None or reader.computes(source.tensor) or info.dtype not in NUMPY_DTYPES:
        return MAX_ITEMSIZE
    return max(itemsize(info.dtype), itemsize(job.out_dtype))


def reads_once(job: TensorJob, inputs: MergeInputs, blocks: int, budget: int) -> bool:
    """Whether a job with statistics passes reads each input once: a tensor of one block
    (the passes reuse it), or a CPU job whose inputs fit in ``budget``."""
    if blocks <= 1:
        return True
    on_cpu = job.kernel is not None and job.kernel.backend == "cpu"
    return on_cpu and held_input_bytes(job, inputs) <= budget


def read_note(job: TensorJob, inputs: MergeInputs, blocks: int, budget: int) -> str:
    """What ``della plan`` says of a job's reads, where its method makes several passes."""
    if not has_passes(job):
        return ""
    if reads_once(job, inputs, blocks, budget):
        return ", inputs read once"
    return f", inputs read {job.kernel.passes} times"


class HeldBlocks:
    """The blocks of the tensors read once, filled by the reader thread: at a job's first
    block (``load``), or earlier, while the merging thread works on the job before (the next
    job's blocks are read when the reader hands over that job's first kept block, so the reads
    overlap its statistics passes instead of following its merge). The whole list is taken
    once by the merging thread for the statistics passes (``take``), and each later block is
    handed to the reader's ``load`` in turn, so that each structure has one consumer."""

    def __init__(self, inputs: MergeInputs, budget: int, jobs: list[TensorJob] = ()):
        self.inputs = inputs
        self.budget = budget
        # The job after each one, in the order of the writes (that of the reads).
        self._next = {job.name: after for job, after in itertools.pairwise(jobs)}
        self._for_passes: dict[str, list[list[np.ndarray]]] = {}
        self._for_merge: dict[str, deque[list[np.ndarray]]] = {}
        self._first: dict[str, list[np.ndarray]] = {}  # a first block read ahead
        self._lock = threading.Lock()

    def load(
        self,
        task: BlockTask,
        tasks: Callable[[TensorJob], list[BlockTask]],
        read: Callable[[BlockTask], list[np.ndarray]],
    ) -> list[np.ndarray]:
        """A block's rows: at the first block of a tensor read once, all of its blocks
        (``read``), kept, unless read ahead; a later block of such a tensor from those kept;
        else ``read``. The next job, where it is read once, is read ahead at the first kept
        block of a tensor read once, or at the last block of any other."""
        job = task.job
        with self._lock:
            waiting = self._for_merge.get(job.name) if task.start > 0 else None
            loaded = None if waiting is None else waiting.popleft()
            first_kept = waiting is not None and len(waiting) == len(tasks(job)) - 2
            if waiting is not None and not waiting:
                del self._for_merge[job.name]
            ahead = self._first.pop(job.name, None) if task.start == 0 else None
            if task.start == 0:
                self._drop_unasked()
        if loaded is not None:
            if first_kept:
                self._read_ahead(job, tasks, read)
            return loaded
        if ahead is not None:
            return ahead
        if task.start > 0 or not self._holds(job, tasks):
            rows = read(task)
            if task.last:
                self._read_ahead(job, tasks, read)
            return rows
        blocks = [read(block) for block in tasks(job)]
        self._keep(job, blocks)
        with self._lock:
            return self._first.pop(job.name)

    def _read_ahead(
        self,
        job: TensorJob,
        tasks: Callable[[TensorJob], list[BlockTask]],
        read: Callable[[BlockTask], list[np.ndarray]],
    ) -> None:
        """Read the job after ``job`` now, where it is read once."""
        after = self._next.get(job.name)
        if after is not None and after.name not in self._first and self._holds(after, tasks):
            self._keep(after, [read(block) for block in tasks(after)])

    def _keep(self, job: TensorJob, blocks: list[list[np.ndarray]]) -> None:
        with self._lock:
            self._for_passes[job.name] = blocks
            self._for_merge[job.name] = deque(blocks[1:])
            self._first[job.name] = blocks[0]

    def _drop_unasked(self) -> None:
        """Forget tensors read ahead whose first block was not asked for next (a sweep's
        batch may read the next job through another candidate's engine), so that at most
        one is kept beyond the tensor merging. Called with the lock held."""
        for name in list(self._first):
            del self._first[name]
            self._for_passes.pop(name, None)
            self._for_merge.pop(name, None)

    def take(self, job: TensorJob) -> list[list[np.ndarray]] | None:
        """All of a job's blocks for its statistics passes (None: it is not read once)."""
        with self._lock:
            return self._for_passes.pop(job.name, None)

    def _holds(self, job: TensorJob, tasks: Callable[[TensorJob], list[BlockTask]]) -> bool:
        """Whether a job is read once by this: statistics passes on the CPU backend, over
        several blocks, its inputs within the budget."""
        on_cpu = has_passes(job) and job.kernel.backend == "cpu"
        return on_cpu and held_input_bytes(job, self.inputs) <= self.budget and len(tasks(job)) > 1


def held_buffers(budget: int, block_elements: int) -> int:
    """How many block buffers the tensors read once may hold at a time: two budgets (the
    tensor merging and the next, read ahead) of blocks whose entries take a byte or more.
    The engine's buffer pool keeps that many free beyond the pipeline's, so that the buffers
    of one tensor read once serve the next: given back to the allocator, each buffer was
    faulted in and zeroed again (at ~1.1B, model_stock spent 18% of its CPU zeroing pages)."""
    return 2 * -(-budget // max(block_elements, 1))


def budget_of(
    read_once_bytes: int | None,
    jobs: list[TensorJob] = (),
    inputs: MergeInputs | None = None,
    block_elements: int = 0,
) -> int:
    """The plan's budget where it sets one; else ``READ_ONCE_BYTES``, lowered to what the
    ``REPEATED_TENSORS``-th largest of ``jobs`` with statistics passes over several blocks
    holds (0 where there are fewer). So a tensor without peers (a model's embeddings and
    output head, whose inputs are the largest) is read again for each pass: kept, its inputs
    took memory faulted in and zeroed for it alone, which cost more than a second copy from
    the page cache (at ~1.1B, model_stock with the 4 × 131 MB embeddings kept: 5.7-6.4 s and
    0.73 GB; read twice: 4.7-5.2 s and 0.39 GB), while the buffers of the tensors of each
    layer serve the next."""
    if read_once_bytes is not None:
        return read_once_bytes
    several = [job for job in jobs if has_passes(job) and block_count(job, block_elements) > 1]
    sizes = sorted((held_input_bytes(job, inputs) for job in several), reverse=True)
    if len(sizes) < REPEATED_TENSORS:
        return 0  # none repeats: at ~250M, only the embeddings and head have several blocks
    return min(READ_ONCE_BYTES, sizes[REPEATED_TENSORS - 1])


def block_count(job: TensorJob, block_elements: int) -> int:
    """How many row blocks the engine merges a job in (``MergeEngine.row_blocks``)."""
    rows, row_length = rows_shape(job.shape)
    if rows * row_length <= block_elements:
        return 1
    step = max(1, block_elements // max(row_length, 1))
    return -(-rows // step)


def held_jobs(
    jobs: list[TensorJob], inputs: MergeInputs, block_elements: int, budget: int
) -> tuple[list[TensorJob], list[TensorJob]]:
    """The jobs with statistics passes over several blocks, in plan order, and those of them
    read once (their inputs kept in memory)."""
    several = [job for job in jobs if has_passes(job) and block_count(job, block_elements) > 1]
    held = [job for job in several if reads_once(job, inputs, 2, budget)]
    return several, held


def held_peak_bytes(held: list[TensorJob], inputs: MergeInputs) -> int:
    """The most memory tensors read once hold at a time: one merging and the next, read
    ahead (so at most two budgets)."""
    sizes = [held_input_bytes(job, inputs) for job in held] + [0]
    return max((a + b for a, b in itertools.pairwise(sizes)), default=0)


__all__ = [
    "READ_ONCE_BYTES",
    "HeldBlocks",
    "block_count",
    "budget_of",
    "held_buffers",
    "held_input_bytes",
    "held_jobs",
    "held_peak_bytes",
    "read_note",
    "reads_once",
]
