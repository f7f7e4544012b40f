"""nearswap on the CPU backend (``cpu/nearswap``): one compiled pass over the inputs as stored.

The torch reference (``methods.nearswap``) widens both inputs to float32 and runs six
whole-chunk operations, each allocating its result: |θ₀ − θ₁|, its clamp at 1e-6, t divided
by it (torch's ``t / x`` is ``x.reciprocal() * t``), the clamp to [0, 1], then w·θ₁ + (1 − w)·θ₀.
Here every entry goes through the same float32 operations in the same order, in cache-sized
pieces widened by ``rules.widen_row``, rounded once to the output dtype by ``rules.store_row``,
with the non-finite check of each input (``rules.has_nonfinite``) in the same pass. The
clamps keep a NaN as torch's do, so NaN and Inf inputs give the reference's bytes too.

nearswap is entry by entry, so a block is one flat run of entries, split into spans that run
in parallel threads (a block of one span on the calling thread). Unlike the other kernels it
reads and writes float16 too (as its bits, ``bits.HALF_BITS``): one rule each way and nothing
else to it.
"""

from __future__ import annotations

import numpy as np

from della_cli.backends.cpu import block, output_array, rules
from della_cli.backends.cpu.bits import HALF_BITS

try:
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None

# Entries a thread merges at a time: both inputs' float32 pieces and the result (48 KiB)
# stay in the core's L1/L2 cache.
PIECE = 4096
# Entries of a span, the unit of the threads' work: large enough that waking a thread costs
# little beside it.
SPAN = 1 << 18
# How the kernel sees each dtype it reads and writes: bfloat16 and float16 as their bits.
VIEWS = {**block._KERNEL_VIEWS, np.dtype(np.float16): HALF_BITS}
# The reference's floor under |θ₀ − θ₁| (mergekit's), as the float32 torch clamps with.
FLOOR = np.float32(1e-6)


def nearswap_block(
    base: np.ndarray,
    other: np.ndarray,
    t: float,
    out_dtype: np.dtype,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """nearswap of a block of ``base`` and ``other`` (one shape and dtype, bfloat16, float16 or
    float32, as stored) in ``out_dtype`` (one of those), in ``out`` if given. Returns the merged
    entries in the blocks' shape and, per input (base first), whether it held a NaN or an Inf."""
    if base.shape != other.shape or base.dtype != other.dtype:
        raise ValueError("nearswap's inputs must be blocks of one shape and dtype")
    out = output_array(out, base.shape, np.dtype(out_dtype))
    first, second = (_view(x) for x in (base, other))
    target = _view(out)
    spans = max(1, -(-first.shape[0] // SPAN))
    flags = np.zeros((spans, 2), dtype=np.bool_)
    if spans == 1:
        _nearswap_span(first, second, np.float32(t), 0, first.shape[0], target, flags[0])
    else:
        _nearswap_spans(first, second, np.float32(t), spans, target, flags)
    return out, flags.any(axis=0)


def _view(array: np.ndarray) -> np.ndarray:
    """The entries of an array as the kernel takes them, flat."""
    return np.ascontiguousarray(array).view(VIEWS[array.dtype]).reshape(-1)


if numba is not None:

    @numba.njit(cache=True, inline="always")
    def _nearswap_entry(base, other, t):
        """One entry, as the reference computes it (the clamps leave a NaN a NaN)."""
        distance = abs(base - other)
        if distance < FLOOR:
            distance = FLOOR
        weight = (np.float32(1.0) / distance) * t
        if weight < np.float32(0.0):
            weight = np.float32(0.0)
        if weight > np.float32(1.0):
            weight = np.float32(1.0)
        return weight * other + (np.float32(1.0) - weight) * base

    # nogil: the engine's reader and writer threads go on while a block is computed
    @numba.njit(cache=True, nogil=True)
    def _nearswap_span(base, other, t, first, last, out, flags):
        """Entries ``first`` .. ``last`` − 1 into ``out``; ``flags`` [base, other] set where
        that input holds a NaN or an Inf."""
        size = min(PIECE, max(last - first, 0))
        widened_base = np.empty(size, dtype=np.float32)
        widened_other = np.empty(size, dtype=np.float32)
        merged = np.empty(size, dtype=np.float32)
        for start in range(first, last, PIECE):
            stop = min(start + PIECE, last)
            n = stop - start
            b, o, m = widened_base[:n], widened_other[:n], merged[:n]
            rules.widen_row(base[start:stop], b)
            rules.widen_row(other[start:stop], o)
            flags[0] |= rules.has_nonfinite(b)
            flags[1] |= rules.has_nonfinite(o)
            for i in range(n):
                m[i] = _nearswap_entry(b[i], o[i], t)
            rules.store_row(m, out[start:stop])

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _nearswap_spans(base, other, t, spans, out, flags):
        """``_nearswap_span`` over ``spans`` shares of the entries, one ``flags`` row each."""
        n = base.shape[0]
        for span in numba.prange(spans):
            first, last = span * n // spans, (span + 1) * n // spans
            _nearswap_span(base, other, t, first, last, out, flags[span])
