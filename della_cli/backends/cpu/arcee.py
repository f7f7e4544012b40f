"""The CPU backend's run of arcee_fusion (``cpu/arcee_fusion``): the importance of every entry
(torch's, for its bits: a softmax of each row of both models, their KL divergence, times the
change), the quartiles of all importances by ``catalog_select``'s radix selection over their
kept keys (or over keys made afresh for each digit, where too many to keep), then each block
merged from the kept keys: θ₀ + δ where the importance reaches median + 1.5·IQR.

The work is split between the merging thread and the engine's helpers: each makes the
importances (and counts the top radix digits) of whole chunks of a block, shares the low
digits' pass, and merges part of each block's rows. Every split gives the one thread's bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from functools import partial

import numpy as np

from della_cli.backends.cpu import catalog_kernels, catalog_select
from della_cli.backends.cpu.catalog import Blocks, chunks, output_rows
from della_cli.backends.cpu.catalog_select import key_value, order_statistics, select_kept
from della_cli.backends.cpu.shared_work import run_shared
from della_cli.methods import streamed

# arcee_fusion's importances are made in chunks of this many entries: each row's is the same
# in chunks of any size (a softmax and a sum along the row), and larger chunks hand the GIL
# between the threads that make them less often (1 << 16: 3.6 ns an entry on one thread;
# 1 << 18: 3.3).
IMPORTANCE_ELEMENTS = 1 << 18


def arcee_fusion_prepare(
    blocks: Blocks,
    numel: int,
    shape: tuple[int, ...],
    keep: bool | None = None,
    helpers: Executor | None = None,
    helper_count: int = 0,
    keys: np.ndarray | None = None,
) -> dict | None:
    """{"threshold": median + 1.5·IQR of the importances (a float32 0-dim tensor, as the
    reference's), "keys": the importances' keys where kept (``keep``, by default
    ``streamed.keys_kept``), else None}: the importances torch's, their quartiles selected
    here. Kept keys make the importance once: the radix digits and the merge read them; each
    block's are then made by the calling thread and ``helper_count`` of ``helpers``, into
    ``keys`` where given (a buffer of ``numel`` entries or more, reused from tensor to tensor:
    fresh, each tensor's keys were faulted in and zeroed, 9% of the time at ~1.1B)."""
    from della_cli.methods import selection as reference

    if numel == 0:
        return None
    if keep is None:
        keep = streamed.keys_kept("arcee_fusion", numel)
    ranks = reference.quantile_ranks(numel)
    if keep:
        reuse = keys is not None and keys.size >= numel
        kept = keys[:numel] if reuse else np.empty(numel, dtype=np.uint32)
        # the keys' top radix digits, counted as they are made (one histogram a thread)
        tops = None
        if numel >= catalog_select.PARTITION_BELOW:
            tops = [catalog_select.digit_counts() for _ in range(helper_count + 1)]
        position = 0
        for loaded in blocks():
            size = loaded[0].size
            part = kept[position : position + size]
            _block_keys(loaded[:2], shape, part, helpers, helper_count, tops)
            position += size
        top = None if tops is None else sum(tops[1:], tops[0])
        found = select_kept(kept, ranks, top, helpers, helper_count)
    else:
        kept = None

        def key_chunks():
            """Each chunk's importance keys, made afresh for each radix digit."""
            scratch = np.empty(0, dtype=np.uint32)
            for loaded in blocks():
                pair = loaded[:2]
                for start, stop, base, models in chunks(pair, None, False, IMPORTANCE_ELEMENTS):
                    if scratch.size < base.size:
                        scratch = np.empty(base.size, dtype=np.uint32)
                    yield _importance_keys(base, models[0], start, stop, shape, scratch), 0

        found, _ = order_statistics(key_chunks, numel, lambda total, _: ranks)
    import torch

    q1, median, q3 = (torch.tensor(key_value(key)) for key, _ in found)
    return {"threshold": median + 1.5 * (q3 - q1), "keys": kept}


def _importance_keys(base, model, start: int, stop: int, shape, keys: np.ndarray) -> np.ndarray:
    """The keys (``float_keys``) of the importances of rows ``start:stop`` (float32, flat)
    into the head of ``keys``; those keys. The importance is torch's, row by row."""
    import torch

    from della_cli.methods import selection as reference

    rows_shape = (stop - start, *shape[1:]) if len(shape) > 1 else shape
    importance = reference.arcee_fusion_importance(
        torch.from_numpy(base).reshape(rows_shape), torch.from_numpy(model).reshape(rows_shape)
    ).reshape(-1)
    chunk_keys = keys[: importance.numel()]
    if not catalog_kernels.float_keys(importance.numpy(), chunk_keys):
        raise catalog_select.nan_score()
    return chunk_keys


def _block_keys(
    pair,
    shape,
    keys: np.ndarray,
    helpers: Executor | None,
    helper_count: int,
    tops: list[np.ndarray] | None = None,
):
    """The importance keys of one block (reference, model) into ``keys``, its rows split in
    whole chunks between the calling thread and the helpers: torch's operations let go of
    the GIL, and each row's importance is the same whichever thread makes it (at ~1.1B the
    importance, about 3.6 ns an entry on one thread, was most of the merge). With ``tops``
    (one histogram a thread, the calling thread's first), each thread also counts the top
    radix digits of the keys it made, while they are in cache: a pass of its own over the
    kept keys had taken the merging thread alone ~1 s at ~1.1B."""
    row_length, parts = _row_parts(pair[0], IMPORTANCE_ELEMENTS, helpers, helper_count)

    def fill(first: int, last: int, top: np.ndarray | None) -> None:
        part = [x[first:last] for x in pair] if len(parts) > 1 else pair
        position = first * row_length
        for start, stop, base, models in chunks(part, None, False, IMPORTANCE_ELEMENTS):
            made = _importance_keys(base, models[0], start, stop, shape, keys[position:])
            if top is not None:
                catalog_kernels.top_digits(made, top)
            position += made.size

    histograms = tops or [None] * len(parts)
    calls = [partial(fill, a, b, top) for (a, b), top in zip(parts, histograms, strict=False)]
    run_shared(helpers, calls)


def _row_parts(
    reference: np.ndarray, elements: int, helpers: Executor | None, helper_count: int
) -> tuple[int, list[tuple[int, int]]]:
    """(row length, row ranges) of a block split in whole chunks of about ``elements``
    entries between the calling thread and ``helper_count`` helpers: one range for all where
    there are no helpers or the block is one row."""
    rows = reference.shape[0] if reference.ndim > 1 else 1
    row_length = reference.size // max(rows, 1)
    if helpers is None or helper_count <= 0 or reference.ndim <= 1:
        return row_length, [(0, rows)]
    step = max(1, elements // max(row_length, 1))
    chunk_count = -(-rows // step)
    share = -(-chunk_count // (helper_count + 1)) * step  # whole chunks each
    return row_length, [(a, min(a + share, rows)) for a in range(0, rows, share)]


def arcee_fusion_apply(
    state: dict,
    loaded: Sequence[np.ndarray],
    first: int,
    out: np.ndarray,
    helpers: Executor | None = None,
    helper_count: int = 0,
):
    """One block of arcee_fusion into ``out`` from its tensor's kept keys (the block
    starts at flat entry ``first``); the input flags. Its rows are split in whole chunks
    between the calling thread and ``helper_count`` of ``helpers`` where given: the merging
    thread was busy throughout an arcee_fusion merge at ~1.1B, its helper under half."""
    threshold = np.array([float(state["threshold"])], dtype=np.float32) + np.float32(0.0)
    pivot = np.empty(1, dtype=np.uint32)
    keep_none = not catalog_kernels.float_keys(threshold, pivot)  # a NaN threshold
    row_length, parts = _row_parts(loaded[0], streamed.CPU_CHUNK_ELEMENTS, helpers, helper_count)

    def fuse(first_row: int, last_row: int) -> np.ndarray:
        part = [x[first_row:last_row] for x in loaded] if len(parts) > 1 else loaded
        rows_out = out[first_row:last_row] if len(parts) > 1 else out
        flags = np.zeros(len(loaded), dtype=np.bool_)
        offset = first + first_row * row_length
        for start, stop, base, deltas in chunks(part, flags):
            keys = state["keys"][offset + start * row_length : offset + stop * row_length]
            target = output_rows(rows_out, start, stop)
            catalog_kernels.arcee_fuse(deltas, base, keys, pivot[0], keep_none, target)
        return flags

    return np.logical_or.reduce(run_shared(helpers, [partial(fuse, a, b) for a, b in parts]))
