"""The CPU backend's runs of sce, ram, ramplus_tl and arcee_fusion (``cpu/<method>``; the last
in ``arcee``, on the chunks made here).

The passes are those of ``methods.streamed`` over the same row chunks of each block (so that
the sums the torch reference makes per chunk come out the same), with the per-entry work in
the numba kernels of ``catalog_kernels``: sce's variance, selection, weights and fusion; ram's
and ramplus_tl's counts and fusion; the radix selections of sce's top-k and of arcee_fusion's
quartiles (whose importance, a softmax, stays torch's: numba's ``exp`` has other bits).
Blocks arrive as stored, (rows, row length) arrays, the reference first; the results are the
torch backend's bytes.

The order statistics (sce's top-k, arcee_fusion's quartiles) are ``catalog_select``'s: two
16-bit radix passes on a large tensor, a partition of the kept keys on a small one (issue 19:
the 65,536 buckets of a 16-bit digit cost more to clear and sum than a 6K-entry tensor's
merge), where arcee_fusion's merge pass then reads the kept keys too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from della_cli.backends.cpu import block, catalog_kernels, catalog_select
from della_cli.backends.cpu.catalog_select import (
    order_statistics,
)
from della_cli.methods import streamed
from della_cli.methods.counts import fraction_count

Blocks = Callable[[], Iterable[list[np.ndarray]]]
# (start row, stop row, base float32 (c,), task vectors float32 (n, c)) of one row chunk
Chunk = tuple[int, int, np.ndarray, np.ndarray]


def chunks(
    loaded: Sequence[np.ndarray],
    flags: np.ndarray | None = None,
    task_vectors: bool = True,
    elements: int | None = None,
) -> Iterator[Chunk]:
    """The row chunks of one block ``[reference, *models]``, widened, the models made task
    vectors (unless ``task_vectors`` is False); the chunks of ``TorchBackend.row_chunks`` (a
    1-D tensor, one row, whole), or of about ``elements`` entries where the work is row by row.
    ``flags`` (n + 1,): set where an input holds a NaN or Inf."""
    reference, *models = (block.kernel_view(raw) for raw in loaded)
    rows = reference.shape[0] if reference.ndim > 1 else 1
    row_length = reference.size // max(rows, 1)
    step = rows
    if reference.ndim > 1:
        elements = elements or streamed.CPU_CHUNK_ELEMENTS
        step = min(rows, max(1, elements // max(row_length, 1)))
    scratch = np.empty((len(models) + 1) * step * row_length, dtype=np.float32)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        size = (stop - start) * row_length
        base = scratch[:size]
        deltas = scratch[size : size * (len(models) + 1)].reshape(len(models), size)
        for index, raw in enumerate([reference, *models]):
            source = raw.reshape(rows, row_length)[start:stop].reshape(-1)
            target = base if index == 0 else deltas[index - 1]
            nonfinite = catalog_kernels.widen(source, target)
            if flags is not None:
                flags[index] |= nonfinite
        if task_vectors:
            catalog_kernels.subtract_base(deltas, base)
        yield start, stop, base, deltas


def output_rows(out: np.ndarray, start: int, stop: int) -> np.ndarray:
    rows = out.shape[0] if out.ndim > 1 else 1
    return block.kernel_view(out).reshape(rows, -1)[start:stop].reshape(-1)


# ---------------------------------------------------------------- sce


def _sce_keys(
    loaded: Sequence[np.ndarray], flags: np.ndarray | None = None
) -> Iterator[tuple[Chunk, np.ndarray, int]]:
    """Each chunk of a block with the keys of its variances and how many are nonzero."""
    keys = None
    for chunk in chunks(loaded, flags):
        deltas = chunk[3]
        if keys is None or keys.size < deltas.shape[1]:
            keys = np.empty(deltas.shape[1], dtype=np.uint32)
        chunk_keys = keys[: deltas.shape[1]]
        nonzero, nan = catalog_kernels.sce_keys(deltas, chunk_keys)
        if nan:
            raise catalog_select.nan_score()
        yield chunk, chunk_keys, nonzero


def sce_prepare(select_topk: float, blocks: Blocks, numel: int, shape: tuple[int, ...]) -> dict:
    """``streamed._sce_prepare``: the selection (count and radix passes), then the model
    weights from Σ(keep·δᵢ)², summed per chunk by ``block_sums.whole_sum`` as there."""
    import torch

    from della_cli.methods import selection as reference
    from della_cli.methods.block_sums import whole_sum

    chosen: object = None if select_topk >= 1 else "none"
    if 0 < select_topk < 1:

        def rank(total: int, nonzero: int) -> list[int]:
            k = fraction_count(select_topk, nonzero)
            return [total - k] if k > 0 else []

        def key_chunks():
            for loaded in blocks():
                for _, keys, nonzero in _sce_keys(loaded):
                    yield keys, nonzero

        found, _ = order_statistics(key_chunks, numel, rank)
        chosen = found[0] if found else "none"
    state = {"selection": chosen, "ties": 0}
    squares = None
    for loaded in blocks():
        for (start, stop, _, deltas), keys, _ in _sce_keys(loaded):
            keep = sce_keep(state, keys)
            values = np.empty_like(deltas)
            catalog_kernels.masked_squares(deltas, keep, values)
            rows_shape = (stop - start, -1) if len(shape) > 1 else (-1,)
            part = torch.stack(
                [whole_sum(torch.from_numpy(row).reshape(rows_shape)) for row in values]
            )
            squares = part if squares is None else squares + part
    weights = reference.sce_weights(squares, numel)
    return {"selection": chosen, "weights": weights.to(torch.float32).numpy(), "ties": 0}


def sce_keep(state: dict, keys: np.ndarray) -> np.ndarray:
    """The keep mask of one chunk, counting the ties of the selection in ``state``."""
    keep = np.empty(keys.size, dtype=np.bool_)
    chosen = state["selection"]
    if chosen is None or isinstance(chosen, str):
        keep[:] = chosen is None
        return keep
    pivot, skip = chosen
    ties = catalog_kernels.top_rank_keep(keys, np.uint32(pivot), skip, state["ties"], keep)
    state["ties"] += ties
    return keep


def sce_apply(state: dict, loaded: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    """One block of sce into ``out``; returns the input flags (NaN or Inf) of the block."""
    flags = np.zeros(len(loaded), dtype=np.bool_)
    for (start, stop, base, deltas), keys, _ in _sce_keys(loaded, flags):
        keep = sce_keep(state, keys)
        target = output_rows(out, start, stop)
        catalog_kernels.sce_fuse(deltas, keep, state["weights"], base, target)
    return flags


# ---------------------------------------------------------------- ram, ramplus_tl


def ramplus_tl_prepare(values: dict, blocks: Blocks, models: int) -> np.ndarray:
    """The λᵢ of ramplus_tl from the counts, float32 as the merge uses them:
    ``selection.ramplus_tl_lambdas``' float64 steps in numpy (no torch to import)."""
    counts = np.zeros((models, 2), dtype=np.int64)
    epsilon = values["epsilon"]
    for loaded in blocks():
        for _, _, _, deltas in chunks(loaded):
            catalog_kernels.ram_counts(deltas, np.float32(epsilon), counts)
    rho = counts[:, 0].astype(np.float64) / np.maximum(counts[:, 1].astype(np.float64), epsilon)
    lambdas = 1 + values["r"] * np.minimum(np.maximum(rho, 0.0), values["alpha"])
    return lambdas.astype(np.float32)


def ram_apply(
    lambdas: np.ndarray | None, epsilon: float, loaded: Sequence[np.ndarray], out: np.ndarray
) -> np.ndarray:
    """One block of ram (``lambdas`` None) or ramplus_tl into ``out``; the input flags."""
    flags = np.zeros(len(loaded), dtype=np.bool_)
    boosted = lambdas is not None
    factors = lambdas if boosted else np.ones(len(loaded) - 1, dtype=np.float32)
    for start, stop, base, deltas in chunks(loaded, flags):
        target = output_rows(out, start, stop)
        catalog_kernels.ram_fuse(deltas, base, np.float32(epsilon), factors, boosted, target)
    return flags
