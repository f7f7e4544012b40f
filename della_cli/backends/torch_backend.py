"""The torch backend: the reference functions of ``methods`` on the merge's device.

The plan gives it every job on CUDA, and on the CPU the jobs the CPU backend leaves out
(``della_cli.kernels``): float16 or float64 inputs, inputs of mixed dtypes (a vocabulary fitted
to another model's), the L1 rescale, MAGPRUNE rows of one entry, or no numba. Blocks arrive and
leave as numpy arrays; here they become tensors on the device and go through ``methods.merge``
unchanged, so this backend is the reference the CPU backend is tested against. Importing this
module imports torch, so the engine does it only when a job needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from della_cli.io.dtypes import from_torch, to_torch, torch_dtype
from della_cli.methods import ExpertParams, GlobalParams, MethodSpec
from della_cli.methods import streamed as catalog_methods
from della_cli.methods.merge import merge_tensor
from della_cli.methods.randomness import Draws
from della_cli.methods.sparsify import middle_magnitude_mask, top_magnitude_mask

Mask = np.ndarray | torch.Tensor


class TorchBackend:
    """Tensors on ``device`` in the compute dtype, merged by the reference functions."""

    def __init__(self, device: str, compute_code: str):
        self.device = torch.device(device)
        self.compute_dtype = torch_dtype(compute_code)

    def inputs(self, loaded: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Stored rows on the device in the compute dtype."""
        return [self.to_device(raw) for raw in loaded]

    def to_device(self, raw: np.ndarray) -> torch.Tensor:
        return to_torch(raw).to(self.device, dtype=self.compute_dtype, non_blocking=True)

    def as_stored(self, raw: np.ndarray) -> torch.Tensor:
        """Stored rows on the device in their own dtype (on the CPU, the same memory): the
        catalog methods widen them a chunk at a time (``row_chunks``)."""
        return to_torch(raw).to(self.device, non_blocking=True)

    def row_chunks(
        self, base: torch.Tensor | None, models: Sequence[torch.Tensor]
    ) -> Iterator[tuple[int, int, torch.Tensor | None, list[torch.Tensor]]]:
        """(start, stop, base, models) of consecutive slices along dim 0 of a block, in the
        compute dtype: cache-sized on the CPU, the whole block on CUDA or where the tensor
        is 1-D (a 1-D tensor is one row to the methods: its block is never split)."""
        first = models[0] if base is None else base
        rows, row_length = _rows(first)
        step = rows
        if self.device.type == "cpu" and first.dim() > 1:
            step = max(1, catalog_methods.CPU_CHUNK_ELEMENTS // max(row_length, 1))
        widen = lambda t: t if t is None else t.to(self.compute_dtype)  # noqa: E731
        if step >= rows:
            yield 0, rows, widen(base), [widen(m) for m in models]
            return
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            sliced = None if base is None else widen(base[start:stop])
            yield start, stop, sliced, [widen(m[start:stop]) for m in models]

    @staticmethod
    def nonfinite(blocks: Sequence[torch.Tensor]) -> list[bool] | None:
        """Which blocks hold NaN or Inf, or None when none does. One sum per block is the
        cheap test (a non-finite value makes it non-finite); only then is each searched."""
        sums = torch.stack([block.sum() for block in blocks])
        if bool(torch.isfinite(sums).all()):
            return None
        return [not bool(torch.isfinite(block).all()) for block in blocks]

    def merge(
        self,
        method: MethodSpec,
        base: torch.Tensor,
        models: list[torch.Tensor],
        params: list[ExpertParams],
        global_params: GlobalParams,
        uniform: Callable[[int], Draws] | None,
        mask_blocks: Sequence[Mask] | None,
        out_code: str,
    ) -> np.ndarray:
        """The merged rows, on the CPU in the output dtype."""
        masks = None if mask_blocks is None else [self.as_tensor(mask) for mask in mask_blocks]
        merged = merge_tensor(
            method, base, models, params, global_params, uniform=uniform, keep_masks=masks
        )
        return from_torch(merged.to(torch_dtype(out_code)))

    def prepare(self, kernel, params: list[ExpertParams], blocks, numel: int):
        """A catalog method's view of a whole tensor before its merge (``methods.streamed``),
        from ``blocks()`` of stored rows, which reach the method in row chunks."""

        def chunks():
            for base, models in blocks():
                for _, _, base_chunk, model_chunks in self.row_chunks(base, models):
                    yield base_chunk, model_chunks

        return catalog_methods.prepare(kernel.name, kernel.settings, params, chunks, numel)

    def streamed(
        self,
        kernel,
        params: list[ExpertParams],
        state,
        base: torch.Tensor | None,
        models: list[torch.Tensor],
        out_code: str,
    ) -> np.ndarray:
        """One block of a catalog method from its stored rows, on the CPU in the output
        dtype, as (rows, row length): merged chunk by chunk (``row_chunks``) into one array."""
        name, settings, out_dtype = kernel.name, kernel.settings, torch_dtype(out_code)
        rows, row_length = _rows(models[0] if base is None else base)
        out = None
        for start, stop, base_chunk, model_chunks in self.row_chunks(base, models):
            merged = catalog_methods.apply(name, settings, params, state, base_chunk, model_chunks)
            if out is None and stop == rows:  # the whole block at once
                return from_torch(merged.to(out_dtype).reshape(rows, -1))
            if out is None:
                out = torch.empty((rows, row_length), dtype=out_dtype)
            out[start:stop].copy_(merged.reshape(stop - start, -1))
        return from_torch(out)

    def as_tensor(self, mask: Mask) -> torch.Tensor:
        return to_torch(mask).to(self.device) if isinstance(mask, np.ndarray) else mask

    def keep_mask(
        self, expert: np.ndarray, reference: np.ndarray, density: float, gamma: float | None
    ) -> torch.Tensor:
        """TIES (``gamma`` None) or breadcrumbs keep mask of a whole tensor, on the device."""
        magnitude = self.task_vector_magnitude(expert, reference)
        if gamma is None:
            return top_magnitude_mask(magnitude, density)
        return middle_magnitude_mask(magnitude, density, gamma)

    def task_vector_magnitude(self, expert: np.ndarray, reference: np.ndarray) -> torch.Tensor:
        """|expert - reference| in the compute dtype, from the arrays as stored."""
        return self.to_device(expert).sub_(self.to_device(reference)).abs_()


def _rows(block: torch.Tensor) -> tuple[int, int]:
    """(rows, row length) of a block: slices along dim 0; a 1-D block is one row."""
    rows = block.shape[0] if block.dim() > 1 else 1
    return rows, block.numel() // max(rows, 1)
