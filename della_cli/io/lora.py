"""A model with a LoRA adapter merged in on the fly, behind the ``ModelReader`` interface.

``model+adapter`` in a recipe is read through ``LoraModelReader``: the model's own headers
(the adapter changes values, never names, shapes or dtypes), and for each tensor the adapter
changes (``io.lora_adapter.Patch``), rows computed when they are asked for:

    rows of W' = rows of W + scale * (B[rows] @ A)      ((A[:, rows]).T @ B.T when transposed)

and for a DoRA adapter, each of those rows i then rescaled to the norm its magnitude gives it,
as peft's ``merge_and_unload`` does:

    W'[i] = m[i] / ||W[i] + scale * (B @ A)[i]|| * (W[i] + scale * (B @ A)[i])

The norm runs over the input dimension of one output row, so it streams with the row blocks
(weights stored transposed and embeddings, whose norms would run across rows, are refused).

in float32 from the stored values, whatever their dtype, and handed over in float32 (the
engine's compute dtype; ``kernels`` knows such rows arrive widened, and never hands them to
the kernel that reads rows straight from the files). A and B are small (r rows or columns), so
memory stays bounded by the block being read, as for any other input: the merged expert never
exists whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from della_cli.io.buffers import BufferPool
from della_cli.io.lora_adapter import LoraAdapter, Patch
from della_cli.io.reader import ModelReader
from della_cli.io.streamed_sum import FileSpan

COMPUTED_DTYPE = "F32"  # what the rows of a changed tensor are handed over in
# Entries of B @ A computed at a time: a CPU block's (16 MiB in float32), at most one such
# product beside the block. Smaller pieces bound memory further but cost time: numpy's BLAS
# starts its threads for each product, and on a loaded two-core machine 256K-entry pieces
# took 10.3 s where whole 4M-entry blocks took 1.5 s (12 tensors of 1024 x 4096, r 16).
DELTA_ELEMENTS = 1 << 22


class LoraModelReader(ModelReader):
    """``model`` with ``adapter`` merged in, as the recipe names it (``label``)."""

    def __init__(self, model: ModelReader, adapter: LoraAdapter, label: str):
        self.model, self.adapter, self.label = model, adapter, label
        self.folder, self.root = model.folder, model.root
        self.tensors, self.shadowed = model.tensors, model.shadowed
        self.weight_map, self.config = model.weight_map, model.config
        self._handles = {}
        self.patches: dict[str, Patch] = adapter.patches(model.tensors)

    def computes(self, name: str) -> bool:
        """Whether the rows of ``name`` are computed (in ``COMPUTED_DTYPE``), not read."""
        return name in self.patches

    def has_row_spans(self, name: str) -> bool:
        return name not in self.patches and self.model.has_row_spans(name)

    def read(self, name: str) -> np.ndarray:
        patch = self.patches.get(name)
        if patch is None:
            return self.model.read(name)
        shape = self.tensors[name].shape
        rows = shape[0] if len(shape) > 1 else 1
        return self.patched_rows(patch, 0, rows).reshape(shape)

    def read_rows(
        self, name: str, start: int, stop: int, pool: BufferPool | None = None
    ) -> np.ndarray:
        patch = self.patches.get(name)
        if patch is None:
            return self.model.read_rows(name, start, stop, pool)
        return self.patched_rows(patch, start, stop)

    def patched_rows(self, patch: Patch, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``patch.target`` (seen as (shape[0], -1)) with the adapter
        merged in, in float32."""
        adapter = self.adapter.weights
        source = adapter if patch.replacement is not None else self.model
        name = patch.replacement or patch.target
        # A fresh array (read without a pool), so widened in place when it is float32 already.
        rows = source.read_rows(name, start, stop).astype(np.float32, copy=False)
        scale = np.float32(patch.scale)
        if patch.bias is not None:
            rows += scale * adapter.read(patch.bias).astype(np.float32)
        if patch.a is None:
            return rows
        a = adapter.read(patch.a).astype(np.float32)  # (r, in), or (r, rows) transposed
        b = adapter.read(patch.b).astype(np.float32) if patch.transposed else None
        # The product in pieces of about DELTA_ELEMENTS, so that it adds little to the block.
        step = max(1, DELTA_ELEMENTS // max(rows.shape[1], 1))
        for first in range(start, stop, step):
            last = min(first + step, stop)
            if b is not None:
                delta = (b @ a[:, first:last]).T  # (B @ A) transposed: A's columns are rows
            else:
                delta = adapter.read_rows(patch.b, first, last).astype(np.float32) @ a
            delta *= scale  # peft scales B @ A, then adds it
            rows[first - start : last - start] += delta
        if patch.magnitude is not None:
            magnitude = adapter.read(patch.magnitude).astype(np.float32)[start:stop]
            rows *= (magnitude / np.linalg.norm(rows, axis=1))[:, None]
        return rows

    def row_span(self, name: str, start: int) -> FileSpan:
        if name in self.patches:
            raise RuntimeError(f"'{name}' of '{self.label}' is computed, not read from a file")
        return self.model.row_span(name, start)

    def close(self) -> None:
        self.model.close()
        self.adapter.close()


def input_folders(reader: ModelReader) -> list[Path]:
    """The folders a reader reads: a model's, and its adapter's where it has one."""
    if isinstance(reader, LoraModelReader):
        return [reader.folder, reader.adapter.folder]
    return [reader.folder]
