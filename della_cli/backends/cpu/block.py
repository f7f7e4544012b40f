"""The whole merge of a block of rows in one compiled pass over the inputs as stored.

The torch path (``merge.merge_tensor``) widens every input to float32, then makes a dozen passes
over memory: task vectors, ranks, draws, drops, weights, sign election, disjoint mean, lambda,
the base, and the cast to the output dtype, each a full-size temporary. Here each row goes
through all of it while it is in cache: bfloat16 (or float32) inputs are widened into small
per-row buffers, every expert's row is sparsified and weighted, then elected, fused, scaled,
added to the base and rounded to the output dtype, rows in parallel. The float32 operations are
the reference's, in its order, so the bytes are the same (the tests compare them), and the
non-finite check the engine needs comes out of the same pass.

Per expert, ``mode`` says how its task vector is sparsified: kept whole, DARE's random drop,
MAGPRUNE's rank-based drop, or a given keep mask (TIES and breadcrumbs, selected beforehand
over the whole tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from della_cli.backends.cpu import output_array, rules
from della_cli.backends.cpu.pointers import addresses, pointer_like

try:
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None

KEEP_ALL, RANDOM, MAGPRUNE, MASK = 0, 1, 2, 3
_MASK32 = 0xFFFFFFFF
# The dtypes the pass reads and writes, and how numba sees them: bfloat16 as its bits.
_KERNEL_VIEWS = {np.dtype(ml_dtypes.bfloat16): np.uint16, np.dtype(np.float32): np.float32}


@dataclass(frozen=True)
class ExpertPlan:
    """How one expert's rows are sparsified and weighted in the fused pass."""

    mode: int
    density: float = 1.0
    epsilon: float = 0.0
    weight: float = 1.0
    key_words: tuple[int, int, int] = (0, 0, 0)  # the expert's draw key (random modes)


def supports(dtype: np.dtype) -> bool:
    """Inputs and outputs the compiled pass handles: bfloat16 and float32 (and only where
    the compiled kernels are on at all)."""
    return rules.available() and dtype in _KERNEL_VIEWS


def kernel_view(array: np.ndarray) -> np.ndarray:
    """An array as the kernels take it: float32 values, or bfloat16 bits as uint16."""
    return np.ascontiguousarray(array).view(_KERNEL_VIEWS[array.dtype])


def merge_block(
    base: np.ndarray,
    experts: list[np.ndarray],
    plans: list[ExpertPlan],
    masks: list[np.ndarray] | None,
    *,
    start: int,
    rescale: bool,
    on_deltas: bool,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    out_dtype: np.dtype,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge a (rows, n) block whose first element has flat index ``start`` in its tensor.

    Returns the merged rows in ``out_dtype`` (in ``out`` if given, else a new array) and, per
    input (base first), whether it held a NaN or Inf. ``rescale`` divides random-drop survivors
    by their keep probability; without ``on_deltas`` (``linear``) the models themselves are
    averaged and the base only checked.
    """
    rows, n = base.shape
    # The experts and masks go in as addresses (``pointers``), kept alive by ``views`` and
    # ``mask_views`` for the call.
    views = [kernel_view(expert) for expert in experts]
    if any(view.shape != base.shape or view.dtype != kernel_view(base).dtype for view in views):
        raise ValueError("the experts must have the base's shape and dtype")
    mask_views = [np.ascontiguousarray(m, dtype=np.bool_) for m in masks] if masks else []
    if any(mask.shape != base.shape for mask in mask_views):
        raise ValueError("the masks must have the base's shape")
    if not mask_views and any(plan.mode == MASK for plan in plans):
        raise ValueError("an expert selected by a mask needs its mask")
    out = output_array(out, (rows, n), out_dtype)
    nonfinite = np.zeros((rows, len(experts) + 1), dtype=np.bool_)
    _merge_rows(
        kernel_view(base),
        addresses(views),
        addresses(mask_views) if mask_views else np.zeros(len(views), dtype=np.uint64),
        np.array([p.mode for p in plans], dtype=np.int64),
        np.array([p.density for p in plans], dtype=np.float32),
        np.array([p.density - p.epsilon for p in plans], dtype=np.float32),
        np.array([2.0 * p.epsilon for p in plans], dtype=np.float32),
        np.array([p.weight for p in plans], dtype=np.float32),
        np.array([p.weight != 1.0 for p in plans], dtype=np.bool_),
        np.array([[w & _MASK32 for w in p.key_words] for p in plans], dtype=np.uint32),
        start,
        rescale,
        on_deltas,
        consensus,
        normalize,
        np.float32(sum(p.weight for p in plans)),
        np.float32(lambda_),
        kernel_view(out),
        nonfinite,
    )
    return out, nonfinite.any(axis=0)


if numba is not None:

    @numba.njit(parallel=True, cache=True)
    def _merge_rows(
        base,
        experts,
        masks,
        modes,
        densities,
        low_probs,
        two_epsilons,
        weights,
        weighted,
        keys,
        start,
        rescale,
        on_deltas,
        consensus,
        normalize,
        total_weight,
        lam,
        out,
        nonfinite,
    ):
        rows, n = base.shape
        count = len(experts)  # addresses of (rows, n) arrays of base's dtype
        for row in numba.prange(rows):
            reference = np.empty(n, dtype=np.float32)
            rules.widen_row(base[row], reference)
            nonfinite[row, 0] = rules.has_nonfinite(reference)
            vectors = np.empty((count, n), dtype=np.float32)
            for t in range(count):
                vector = vectors[t]
                expert = numba.carray(pointer_like(experts[t], base), (rows, n))
                rules.widen_row(expert[row], vector)
                nonfinite[row, t + 1] = rules.has_nonfinite(vector)
                if on_deltas:
                    for i in range(n):
                        vector[i] = vector[i] - reference[i]
                mode = modes[t]
                if RANDOM <= mode <= MAGPRUNE:  # the random drops
                    rules.random_drop(
                        vector,
                        mode == MAGPRUNE,
                        densities[t],
                        low_probs[t],
                        two_epsilons[t],
                        keys[t],
                        start + row * n,
                        rescale,
                    )
                elif mode == MASK:
                    keep = numba.carray(pointer_like(masks[t], nonfinite), (rows, n))[row]
                    for i in range(n):
                        vector[i] = vector[i] * (np.float32(1.0) if keep[i] else np.float32(0.0))
                if weighted[t]:
                    for i in range(n):
                        vector[i] = vector[i] * weights[t]
            result = rules.fuse_row(
                vectors, reference, weights, consensus, normalize, total_weight, lam, on_deltas
            )
            rules.store_row(result, out[row])
