"""Merges without sparsification or sign election (task arithmetic, linear), by the C kernel.

These methods are a weighted sum of the inputs: a handful of float32 operations per entry, so
they move far more bytes than they compute on. The kernel (``weighted_sum_kernel.h``, built at
install where a C compiler is present) makes one pass over the inputs without numba's start-up;
``io.streamed_sum`` runs the same kernel on pieces read straight from the files. Where it was
not built, the plan gives these jobs the numba block kernel instead (``block``, every expert
kept whole), which gives the same bytes. A call releases the GIL, so a block is split into
spans that run in parallel threads.

The operations are the torch reference's (``merge.merge_tensor``), in its order and in float32,
so the bytes are the same (with one freedom IEEE 754 leaves: where two NaNs meet, which payload
a float32 result keeps; a bfloat16 NaN is always 0xFFFF):

    on deltas:  θ = θ₀ + λ · (Σ_t w_t (θ_t − θ₀)) / D      (λ = 1 and w_t = 1 skip their
    linear:     θ = (Σ_t w_t θ_t) / D                        multiplies, which are exact)

with D = Σ_t w_t when normalizing (1 where it is 0), else 1, and the sum starting from +0.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from della_cli.backends.cpu import output_array

try:
    from della_cli.backends.cpu import _weighted_sum as _compiled
except ImportError:  # installed without a C compiler: the numba block kernel, same bytes
    _compiled = None

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# Stored dtypes the kernel reads and writes.
SUPPORTED = (BFLOAT16, np.dtype(np.float32))
# Entries per span a thread takes at least: shorter spans cost more in calls than they gain.
CHUNK = 1 << 18
# Whether the compiled kernel is installed.
COMPILED = _compiled is not None
# The kernel's dtype codes (it sees bfloat16 as its bits) and its limit (flags in 64 bits).
_KINDS = {BFLOAT16: 0, np.dtype(np.float32): 1}
KERNEL_MAX_EXPERTS = 63


@dataclass(frozen=True)
class WeightedSum:
    """What to compute: per-expert weights and the global parameters that apply."""

    weights: tuple[float, ...]
    on_deltas: bool
    normalize: bool
    lambda_: float

    @property
    def divisor(self) -> np.float32 | None:
        """D as float32 holds it (None: no division)."""
        if not self.normalize:
            return None
        total = np.float32(sum(self.weights))
        return total if total != 0 else np.float32(1.0)


def supports(dtypes: Sequence[np.dtype], expert_count: int) -> bool:
    """Whether the kernel is installed and takes inputs and output of these dtypes."""
    return (
        COMPILED
        and expert_count <= KERNEL_MAX_EXPERTS
        and all(np.dtype(dtype) in SUPPORTED for dtype in dtypes)
    )


def merge_block(
    base: np.ndarray,
    experts: Sequence[np.ndarray],
    spec: WeightedSum,
    out_dtype: np.dtype,
    helpers: Executor | None = None,
    helper_count: int = 0,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge same-shaped ``base`` and ``experts`` (bfloat16 or float32 each).

    Returns the result in ``out_dtype`` and, per input (base first), whether it held a NaN or
    an Inf. With ``helpers`` (a thread pool), the block is split into spans, one merged by
    the calling thread and one by each of the ``helper_count`` helper threads. ``out``: where
    to put the result (``base``'s shape, ``out_dtype``), else a new array.
    """
    if not COMPILED:
        raise RuntimeError("the compiled weighted-sum kernel is not installed")
    if len(experts) != len(spec.weights):
        raise ValueError("merge_block needs one weight per expert")
    block = _Block(
        base.reshape(-1),
        [expert.reshape(-1) for expert in experts],
        spec,
        output_array(out, base.shape, out_dtype).reshape(-1),
    )
    size = block.base.shape[0]
    threads = 1 + (helper_count if helpers is not None else 0)
    parts = max(1, min(threads, -(-size // CHUNK)))
    bounds = [size * part // parts for part in range(parts + 1)]
    spans = list(itertools.pairwise(bounds))
    others = [helpers.submit(_merge_span, block, *span) for span in spans[1:]]
    flags = [_merge_span(block, *spans[0])]
    flags += [future.result() for future in others]
    return block.out.reshape(base.shape), np.logical_or.reduce(flags)


@dataclass(frozen=True)
class _Block:
    """One call's flattened inputs and output, shared by the threads merging its spans."""

    base: np.ndarray
    experts: list[np.ndarray]
    spec: WeightedSum
    out: np.ndarray


def _merge_span(block: _Block, start: int, stop: int) -> np.ndarray:
    """Entries ``start:stop`` into ``block.out``; the per-input non-finite flags (the kernel
    returns them as bits)."""
    spec = block.spec
    bits = _compiled.merge(
        _kernel_operand(block.out[start:stop]),
        _kernel_operand(block.base[start:stop]),
        tuple(_kernel_operand(expert[start:stop]) for expert in block.experts),
        spec.weights,
        spec.on_deltas,
        None if spec.divisor is None else float(spec.divisor),
        spec.lambda_,
    )
    count = len(block.experts) + 1
    return np.array([bool(bits >> index & 1) for index in range(count)], dtype=np.bool_)


def _kernel_operand(values: np.ndarray) -> tuple[np.ndarray, int]:
    kind = _KINDS[values.dtype]
    return (values.view(np.uint16) if values.dtype == BFLOAT16 else values), kind
