"""Row loading for vocabulary tensors re-indexed to a tokenizer the merge builds.

The plan says, per input and output row, which of the input's own rows it is or which default
it takes (``della_cli.vocab_rows``). A block's rows are gathered from that: runs of consecutive
own rows read at once, each default row made of the few rows it names. Rows past the
vocabulary (``pad_to_multiple_of``) are the input's mean aligned row, which needs the whole
tensor: it is summed in a first pass over the input's aligned rows, a bounded block at a time,
when a job first needs it, and kept (one row per input and vocabulary tensor).
"""

from __future__ import annotations

import threading

import numpy as np

from della_cli.engine.shared import MergeInputs
from della_cli.io.dtypes import NUMPY_DTYPES, cast
from della_cli.plan import Source, TensorJob
from della_cli.vocab_rows import VocabularyAlignment

MEAN_PASS_ELEMENTS = 1 << 20  # entries per block of the padding mean's pass


class AlignedRows:
    """Builds rows of ``aligned`` sources in ``dtype`` (the compute dtype)."""

    def __init__(self, inputs: MergeInputs, alignment: VocabularyAlignment, dtype: str):
        self.inputs = inputs
        self.alignment = alignment
        self.dtype = dtype
        self._means: dict[tuple[str, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def rows(self, job: TensorJob, source: Source, start: int, stop: int) -> np.ndarray:
        """Output rows ``start:stop`` of ``source`` re-indexed; a 1-D tensor (an lm_head bias)
        is one row, whose entries are re-indexed."""
        if len(job.shape) <= 1:
            return self.gather(job, source, 0, job.shape[0]).reshape(1, -1)
        return self.gather(job, source, start, stop)

    def gather(self, job: TensorJob, source: Source, start: int, stop: int) -> np.ndarray:
        """Output rows ``start:stop`` as (rows, row length), each row the input's own, a
        default, or its padding mean."""
        width = int(np.prod(job.shape[1:])) if len(job.shape) > 1 else 1
        out = np.empty((stop - start, width), dtype=NUMPY_DTYPES[self.dtype])
        size = self.alignment.size
        own = self.alignment.own[source.model][start : min(stop, size)]
        for first, last, row in _runs(own):
            out[first:last] = self.read(job, source.model, source.tensor, row, row + last - first)
        lacking = np.flatnonzero(own < 0)
        if lacking.size:
            tensors = {s.model: s.tensor for s in (job.reference, *job.experts)}
            for index in lacking:
                out[index] = self.default_row(job, tensors, start + int(index), width)
        if stop > size:
            out[max(size - start, 0) :] = self.padding_mean(job, source)
        return out

    def read(self, job: TensorJob, model: int, tensor: str, first: int, last: int) -> np.ndarray:
        """Rows ``first:last`` of a model's tensor as (rows, row length), in the compute dtype."""
        reader = self.inputs.reader(model)
        if len(job.shape) <= 1:
            rows = reader.read(tensor).reshape(-1)[first:last].reshape(-1, 1)
        else:
            rows = reader.read_rows(tensor, first, last).reshape(last - first, -1)
        return cast(rows, self.dtype)

    def default_row(
        self, job: TensorJob, tensors: dict[int, str], row: int, width: int
    ) -> np.ndarray:
        """The default of output ``row``: the mean of the rows it names (summed in order, then
        divided, as mergekit does), or zero."""
        total = np.zeros(width, dtype=NUMPY_DTYPES[self.dtype])
        rows = self.alignment.defaults[row].rows
        for model, own in rows:
            total += self.read(job, model, tensors[model], own, own + 1)[0]
        return total / len(rows) if len(rows) > 1 else total

    def padding_mean(self, job: TensorJob, source: Source) -> np.ndarray:
        """The input's mean over its aligned rows of the vocabulary: a pass over the tensor in
        blocks, once per job and input."""
        key = (job.name, source.model)
        with self._lock:
            if key not in self._means:
                self._means[key] = self._mean(job, source)
            return self._means[key]

    def _mean(self, job: TensorJob, source: Source) -> np.ndarray:
        size = self.alignment.size
        width = int(np.prod(job.shape[1:])) if len(job.shape) > 1 else 1
        step = max(1, MEAN_PASS_ELEMENTS // width)
        total = np.zeros(width, dtype=np.float64)
        for first in range(0, size, step):
            total += self.gather(job, source, first, min(first + step, size)).sum(axis=0)
        # float64 to float32 (or 64) rounds to nearest in numpy as in torch, without importing it
        return (total / max(size, 1)).astype(NUMPY_DTYPES[self.dtype])


def _runs(own: np.ndarray) -> list[tuple[int, int, int]]:
    """(first, last, source row) of each run of output rows that are consecutive own rows."""
    if own.size == 0:
        return []
    valid = own >= 0
    follows = np.concatenate([[False], valid[:-1] & (own[1:] == own[:-1] + 1)])
    starts = np.flatnonzero(valid & ~follows)
    ends = np.flatnonzero(valid & ~np.concatenate([follows[1:], [False]])) + 1
    return [(int(a), int(b), int(own[a])) for a, b in zip(starts, ends, strict=True)]
