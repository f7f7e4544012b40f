"""Row loading: a block's rows from the input files, fitted to the job's vocabulary."""

from __future__ import annotations

import numpy as np

from della_cli.engine.aligned_rows import AlignedRows
from della_cli.engine.shared import BlockTask, MergeInputs, reference_expert, rows_shape
from della_cli.io.buffers import BufferPool
from della_cli.io.dtypes import cast
from della_cli.plan import Source, TensorJob
from della_cli.quant.view import QuantizedRows
from della_cli.vocab_rows import VocabularyAlignment


class RowLoader:
    """Reads the rows of blocks as stored; ``compute_dtype`` is what fitted expert rows are
    cast to (a vocabulary row an expert lacks is the reference's, a zero task vector).
    With ``vocabulary``, rows re-indexed to a built tokenizer come from ``AlignedRows``."""

    def __init__(
        self,
        inputs: MergeInputs,
        compute_dtype: str,
        vocabulary: VocabularyAlignment | None = None,
    ):
        self.inputs = inputs
        self.compute_dtype = compute_dtype
        self.aligned = (
            None if vocabulary is None else AlignedRows(inputs, vocabulary, compute_dtype)
        )

    def load(self, task: BlockTask, pool: BufferPool | None = None) -> list[np.ndarray]:
        """The raw rows of a block (reference first, then each expert), as stored."""
        job = task.job
        if job.action == "copy":
            if job.reference.aligned:
                return [
                    self.read_reference_rows(job, 0, rows_shape(job.shape)[0]).reshape(job.shape)
                ]
            if job.reference.rows is None:
                return [self.read(job.reference)]
            rows, _ = rows_shape(job.shape)
            return [self.read_reference_rows(job, 0, rows).reshape(job.shape)]
        experts = [
            self.read_expert_rows(job, source, task.start, task.stop, pool)
            for source in job.experts
        ]
        shared = reference_expert(job)
        if shared is not None:  # the same rows, read once
            return [experts[shared], *experts]
        return [self.read_reference_rows(job, task.start, task.stop, pool), *experts]

    def read(self, source: Source) -> np.ndarray:
        """One input tensor, as stored."""
        return self.inputs.reader(source.model).read(source.tensor)

    def read_rows(
        self, source: Source, start: int, stop: int, pool: BufferPool | None = None
    ) -> np.ndarray | QuantizedRows:
        """Rows as stored; quantized rows the plan sends to the device come with their
        scales, to be dequantized there (``quant.placement``)."""
        reader = self.inputs.reader(source.model)
        if source.on_device:
            return reader.stored_rows(source.tensor, start, stop)
        return reader.read_rows(source.tensor, start, stop, pool)

    def read_reference_rows(
        self, job: TensorJob, start: int, stop: int, pool: BufferPool | None = None
    ) -> np.ndarray:
        """The reference's rows, fitted to the job's shape when ``tokenizer_source`` changed the
        vocabulary: rows past the job's are not read, and rows past the reference's own come
        from its ``fill`` source."""
        source = job.reference
        if source.aligned:
            return self.aligned.rows(job, source, start, stop)
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
        if source.aligned:
            return self.aligned.rows(job, source, start, stop)
        if source.rows is None:
            return self.read_rows(source, start, stop, pool)
        return self.fitted_rows(job, source, start, stop, None, self.compute_dtype)

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
