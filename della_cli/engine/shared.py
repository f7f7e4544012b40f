"""What the rooms of the engine share: the opened inputs, a block task, block sizes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from della_cli.io.reader import ModelReader
from della_cli.plan import BASE, TensorJob

# Elements merged at a time. On the CPU 4M (16 MiB per float32 temporary) amortizes the cost
# of each torch call and larger blocks gain nothing (measured: 1M and 4M equal, 256K 15%
# slower). On a GPU a block of 16M entries still keeps every kernel far longer than its launch,
# and the host holds a block per input in each recycled read buffer (two blocks in flight):
# at 64M the ~1.1B model's embedding and lm_head went whole, 131 MB per bfloat16 input, and the
# buffers that held them stayed that large in the process's resident memory (issue 18: peak RSS
# 1.9 GB against a 1.5 GB target; not measured again since).
CPU_BLOCK_ELEMENTS = 1 << 22
CUDA_BLOCK_ELEMENTS = 1 << 24
DEFAULT_BLOCK_ELEMENTS = CPU_BLOCK_ELEMENTS
# Entries per chunk of a weighted-sum merge on the CPU, which one thread reads, merges and
# writes (``schedule.run_in_chunks``). Smaller chunks pay Python's cost per chunk more
# often, and larger ones no longer fit the caches: with a base and three bfloat16 experts, a
# 1M-entry chunk and its result take 10 MiB, and the reference machine's L3 is 32 MiB. Measured
# there (~250M task arithmetic, medians of 7): 128K 2.24 s, 512K 1.48-1.56, 1M 1.39-1.45, 4M 1.63.
CHUNK_ELEMENTS = 1 << 20
# Bytes per element of the widest dtype a pooled block buffer holds (float32).
MAX_ITEMSIZE = 4
# A task of at most this many elements is small: its buffers are ordinary allocations (the
# pool's are a block's size each), and the pipeline hands small tasks between its threads in
# batches (``schedule.task_batches``). A mixture-of-experts model has 30,000 tensors of a few
# thousand entries; one hand-over per tensor cost more than merging it.
SMALL_TASK_ELEMENTS = 1 << 15
# Elements of a batch of small tasks: a few hundred KiB of inputs, so that the batches in
# flight (one read ahead, one merging, two being written) hold less than the blocks' buffers
# did; batches of a whole block's elements raised a 31,000-tensor TIES merge's peak RSS by
# 64 MB.
BATCH_ELEMENTS = 1 << 18

ProgressCallback = Callable[[TensorJob], None]
WarningCallback = Callable[[str], None]


class WarningLog:
    """A WarningCallback that keeps every warning for the command's report and passes each on
    to ``on_warning`` (the terminal) as it comes."""

    def __init__(self, on_warning: WarningCallback | None = None):
        self.messages: list[str] = []
        self.on_warning = on_warning

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        if self.on_warning:
            self.on_warning(message)


# A block merged by a CPU kernel: its rows, and per input (base first) whether it held NaN or Inf.
Merged = tuple[np.ndarray, np.ndarray]


def block_elements_for(device: str) -> int:
    return CUDA_BLOCK_ELEMENTS if str(device).startswith("cuda") else CPU_BLOCK_ELEMENTS


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


def task_elements(task: BlockTask) -> int:
    """Output elements of a task (a copy's are its whole tensor's)."""
    if task.job.action != "merge":
        return math.prod(task.job.shape)
    return (task.stop - task.start) * rows_shape(task.job.shape)[1]


def rows_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length) of a tensor seen as (shape[0], -1); a 1-D or 0-D tensor is one row."""
    if len(shape) <= 1:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def reference_expert(job: TensorJob) -> int | None:
    """The expert whose rows are also the job's reference, where one is: a linear merge
    without a base takes its first model as the reference, whose rows are then read once (a
    quarter of the reads with three models)."""
    for index, source in enumerate(job.experts):
        if source == job.reference and source.rows is None:
            return index
    return None
