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
from typing import Any, ClassVar

import numpy as np
import torch

from della_cli.io.dtypes import from_torch, to_torch, torch_dtype
from della_cli.methods import ExpertParams, GlobalParams, MethodSpec
from della_cli.methods import streamed as catalog_methods
from della_cli.methods.merge import merge_tensor
from della_cli.methods.randomness import Draws
from della_cli.methods.sparsify import middle_magnitude_mask, top_magnitude_mask

Mask = np.ndarray | torch.Tensor


class SimulatedOutOfMemory(torch.OutOfMemoryError):
    """The out-of-memory error a test's ``TorchBackend.fault_injector`` raises: before the
    block is touched, so that, unlike a real one on the CPU, it leaves the inputs intact."""


class TorchBackend:
    """Tensors on ``device`` in the compute dtype, merged by the reference functions.

    ``fallback``: the CPU backend the engine retries a block on after the device ran out of
    memory (``engine.memory_retry``).
    """

    # The seam through which tests make a device run out of memory: called with the backend
    # and the entries of each block (or whole tensor) before it is computed; where it answers
    # True, the backend raises ``SimulatedOutOfMemory`` as a device raises
    # ``torch.OutOfMemoryError``. None in every real merge.
    fault_injector: ClassVar[Callable[[TorchBackend, int], bool] | None] = None

    def __init__(self, device: str, compute_code: str, fallback: bool = False):
        self.device = torch.device(device)
        self.compute_dtype = torch_dtype(compute_code)
        self.fallback = fallback
        self._uploads = None
        if self.device.type == "cuda":
            from della_cli.backends.cuda_uploads import CudaUploads

            self._uploads = CudaUploads(self.device)

    def about_to_compute(self, elements: int) -> None:
        """Where a test's ``fault_injector`` makes the device run out of memory."""
        injector = TorchBackend.fault_injector
        if injector is not None and injector(self, elements):
            raise SimulatedOutOfMemory(f"{self.device}: no memory for {elements} entries (test)")

    def release_memory(self) -> None:
        """Give the CUDA caching allocator's free blocks back before a retry in smaller
        blocks, so that the smaller ones find room in unfragmented memory."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def inputs(self, loaded: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Stored rows on the device in the compute dtype: on CUDA copied as stored (half
        the bytes of bfloat16 widened on the host), staged ahead where ``stage`` was called,
        and widened there."""
        if self._uploads is None:
            return [self.to_device(raw) for raw in loaded]
        return [tensor.to(self.compute_dtype) for tensor in self._uploads.take(loaded)]

    def stage(self, loaded: Sequence[np.ndarray]) -> None:
        """Start copying a block's rows to the device, so that ``inputs`` finds them there;
        nothing on the CPU. Called from the reader thread while another block merges."""
        if self._uploads is not None:
            self._uploads.stage(loaded)

    def to_device(self, raw: np.ndarray) -> torch.Tensor:
        if not isinstance(raw, np.ndarray):  # quantized rows, dequantized on the device
            return raw.on_device(self.device).to(self.compute_dtype)
        return to_torch(raw).to(self.device, dtype=self.compute_dtype, non_blocking=True)

    def stored_inputs(self, loaded: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """A block's rows on the device in their own dtypes (``as_stored``), on CUDA staged
        ahead where ``stage`` was called."""
        if self._uploads is None:
            return [self.as_stored(raw) for raw in loaded]
        return self._uploads.take(loaded)

    def as_stored(self, raw: np.ndarray) -> torch.Tensor:
        """Stored rows on the device in their own dtype (on the CPU, the same memory): the
        catalog methods widen them a chunk at a time (``row_chunks``). Quantized rows
        (``quant.view.QuantizedRows``) arrive as stored and are dequantized there, to float32."""
        if not isinstance(raw, np.ndarray):
            return raw.on_device(self.device)
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

    def nonfinite_later(self, blocks: Sequence[torch.Tensor]) -> Callable[[], list[bool] | None]:
        """``nonfinite`` of ``blocks`` as they are now, answered when called. On CUDA the
        test is queued on the device and read after the merge, whose copy back waits for the
        device anyway: asking now would stop the host once more per block. (The merge works
        on its inputs in place, so the test is queued before it.)"""
        if self.device.type != "cuda":
            answer = self.nonfinite(blocks)
            return lambda: answer
        finite = torch.stack([torch.isfinite(block).all() for block in blocks])

        def answer() -> list[bool] | None:
            flags = finite.cpu().tolist()
            return None if all(flags) else [not flag for flag in flags]

        return answer

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
        self.about_to_compute(base.numel() * (1 + len(models)))
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
                self.about_to_compute(sum(m.numel() for m in models))
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
        dtype, as (rows, row length): merged chunk by chunk (``row_chunks``) into one array.
        The whole tensor's ``state`` (made on this device or another) is updated only when
        the block succeeds: sce counts its ties as it goes, and a block retried after the
        device ran out of memory must count them once."""
        name, settings, out_dtype = kernel.name, kernel.settings, torch_dtype(out_code)
        rows, row_length = _rows(models[0] if base is None else base)
        self.about_to_compute(rows * row_length * (len(models) + 1))
        scratch = self.on_device(state)
        out = None
        for start, stop, base_chunk, model_chunks in self.row_chunks(base, models):
            merged = catalog_methods.apply(
                name, settings, params, scratch, base_chunk, model_chunks
            )
            if out is None and stop == rows:  # the whole block at once
                out = merged.to(out_dtype).reshape(rows, -1)
                break
            if out is None:
                out = torch.empty((rows, row_length), dtype=out_dtype)
            out[start:stop].copy_(merged.reshape(stop - start, -1))
        result = from_torch(out)
        if isinstance(state, dict):
            state.update({key: value for key, value in scratch.items() if key == "ties"})
        return result

    def on_device(self, state: Any) -> Any:
        """A catalog method's statistics with their tensors on this device; a dict (sce's,
        whose tie count the blocks update) is always a copy."""
        if isinstance(state, torch.Tensor):
            return state.to(self.device)
        if isinstance(state, dict):
            return {key: self.on_device(value) for key, value in state.items()}
        if isinstance(state, (tuple, list)):
            return type(state)(self.on_device(value) for value in state)
        return state

    def as_tensor(self, mask: Mask) -> torch.Tensor:
        """A keep mask on this device (made by the CPU backend, or on another device)."""
        return (
            to_torch(mask).to(self.device) if isinstance(mask, np.ndarray) else mask.to(self.device)
        )

    def keep_mask(
        self, expert: np.ndarray, reference: np.ndarray, density: float, gamma: float | None
    ) -> torch.Tensor:
        """TIES (``gamma`` None) or breadcrumbs keep mask of a whole tensor, on the device."""
        self.about_to_compute(expert.size)
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
