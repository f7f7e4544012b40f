"""Merges without sparsification or sign election (task arithmetic, linear).

These methods are a weighted sum of the inputs: a handful of float32 operations per entry. Two
implementations give the same bytes (the tests compare them with each other and with torch):

- the compiled kernel (``_weighted_sum.c``, built at install where a C compiler is present):
  one pass over the inputs, without numba's start-up (about a second);
- numpy's loops, in cache-sized chunks: the fallback where the kernel was not built. On the
  2-core reference machine they are 3-4 times slower (3 ns/entry with 3 experts, against
  0.8 for the kernel), which makes a merge compute-bound there.

Both release the GIL, so a block is split into spans that run in parallel threads.

The operations are the torch reference's (``merge.merge_tensor``), in its order and in float32,
so the bytes are the same (with one freedom IEEE 754 leaves: where two NaNs meet, which payload
a float32 result keeps; numpy and torch differ there too, and a bfloat16 NaN is always 0xFFFF):

    on deltas:  θ = θ₀ + λ · (Σ_t w_t (θ_t − θ₀)) / D      (λ = 1 and w_t = 1 skip their
    linear:     θ = (Σ_t w_t θ_t) / D                        multiplies, which are exact)

with D = Σ_t w_t when normalizing (1 where it is 0), else 1, and the sum starting from +0.
Non-finite values propagate through every one of these operations, so a chunk whose result is
finite had finite inputs; only a chunk whose result is not is checked input by input.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import ml_dtypes
import numpy as np

try:
    from della_cli.methods import _weighted_sum as _compiled
except ImportError:  # installed without a C compiler: numpy's loops, same bytes
    _compiled = None

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# Stored dtypes read and written here (others take the torch path).
SUPPORTED = (BFLOAT16, np.dtype(np.float32))
# Entries per chunk: three float32 buffers of 1 MiB per thread stay in the L2/L3 caches, and
# each numpy call is long enough to release the GIL to the other threads (measured on the
# 2-core reference machine, 4M-entry bfloat16 blocks with 3 experts, 2 threads: 16K entries
# per chunk 6.1 ns/entry, 64K 2.7, 256K 1.2).
CHUNK = 1 << 18
# The bits torch's vectorized conversion gives every NaN it rounds to bfloat16.
BFLOAT16_NAN_BITS = 0xFFFF
# Whether the compiled kernel is installed (``merge_block`` uses it unless told not to).
COMPILED = _compiled is not None
# The kernel's dtype codes (it sees bfloat16 as its bits) and its limit (flags in 64 bits).
_KINDS = {BFLOAT16: 0, np.dtype(np.float32): 1}
KERNEL_MAX_EXPERTS = 63


class Scratch:
    """Each thread's chunk buffers for numpy's loops, kept from block to block: new memory is
    costly (its pages are faulted in and zeroed), and a merge calls ``merge_block`` once per
    block. (The compiled kernel needs none.)"""

    def __init__(self) -> None:
        self._local = threading.local()

    def buffers(self) -> list[np.ndarray]:
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = [np.empty(CHUNK, dtype=np.float32) for _ in range(3)]
        return buffers


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


def supports(dtype: np.dtype) -> bool:
    return dtype in SUPPORTED


def merge_block(
    base: np.ndarray,
    experts: Sequence[np.ndarray],
    spec: WeightedSum,
    out_dtype: np.dtype,
    helpers: Executor | None = None,
    helper_count: int = 0,
    out: np.ndarray | None = None,
    scratch: Scratch | None = None,
    compiled: bool = COMPILED,
) -> tuple[np.ndarray, np.ndarray]:
    """Merge same-shaped ``base`` and ``experts`` (bfloat16 or float32 each).

    Returns the result in ``out_dtype`` and, per input (base first), whether it held a NaN or
    an Inf. With ``helpers`` (a thread pool), the block is split into spans, one merged by
    the calling thread and one by each of the ``helper_count`` helper threads. ``out``: where
    to put the result (``base``'s shape, ``out_dtype``), else a new array; ``scratch``: chunk
    buffers to reuse, else new ones (numpy only); ``compiled``: whether to use the kernel.
    """
    if compiled and not COMPILED:
        raise RuntimeError("the compiled weighted-sum kernel is not installed")
    if len(experts) != len(spec.weights):
        raise ValueError("merge_block needs one weight per expert")
    block = _Block(
        base.reshape(-1),
        [expert.reshape(-1) for expert in experts],
        spec,
        output_array(out, base.shape, out_dtype).reshape(-1),
        scratch or Scratch(),
        compiled and len(experts) <= KERNEL_MAX_EXPERTS,
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


def output_array(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``out`` checked against the shape and dtype it must have, or a new array of them."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous {dtype} array of shape {shape}")
    return out


@dataclass(frozen=True)
class _Block:
    """One call's flattened inputs and output, shared by the threads merging its spans."""

    base: np.ndarray
    experts: list[np.ndarray]
    spec: WeightedSum
    out: np.ndarray
    scratch: Scratch
    compiled: bool


def _merge_span(block: _Block, start: int, stop: int) -> np.ndarray:
    """Entries ``start:stop``, chunk by chunk, into ``block.out``; the per-input non-finite
    flags. (Overflow and NaN are results here, reported through the flags, not warnings.)"""
    if block.compiled:
        return _compiled_span(block, start, stop)
    flags = np.zeros(len(block.experts) + 1, dtype=np.bool_)
    buffers = block.scratch.buffers()
    with np.errstate(all="ignore"):
        for first in range(start, stop, CHUNK):
            chunk = slice(first, min(first + CHUNK, stop))
            flags |= _merge_and_store(block, chunk, buffers)
    return flags


def _compiled_span(block: _Block, start: int, stop: int) -> np.ndarray:
    """Entries ``start:stop`` by the compiled kernel, which returns the flags as bits."""
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


def _merge_and_store(block: _Block, chunk: slice, buffers: list[np.ndarray]) -> np.ndarray:
    """Merge one chunk into ``block.out``; which inputs held NaN or Inf there (only searched
    where the result shows one, or for linear, whose result does not contain the base)."""
    base, experts = block.base[chunk], [expert[chunk] for expert in block.experts]
    result = _merge_chunk(base, experts, block.spec, buffers)
    nonfinite = np.zeros(len(experts) + 1, dtype=np.bool_)
    if not block.spec.on_deltas and not _finite_bits(base):
        nonfinite = _nonfinite_inputs(base, experts)
    result_finite = np.isfinite(result.sum()) or np.isfinite(result).all()
    if not result_finite:
        nonfinite |= _nonfinite_inputs(base, experts)
    _store(result, block.out[chunk], nan_present=not result_finite)
    return nonfinite


def _merge_chunk(
    base: np.ndarray, experts: list[np.ndarray], spec: WeightedSum, buffers: list[np.ndarray]
) -> np.ndarray:
    size = base.shape[0]
    total, term, widened_base = (buffer[:size] for buffer in buffers)
    total.fill(0.0)
    if spec.on_deltas:
        np.copyto(widened_base, base, casting="safe")
    for expert, weight in zip(experts, spec.weights, strict=True):
        if spec.on_deltas:
            np.subtract(expert, widened_base, out=term)
            if weight != 1.0:
                np.multiply(term, np.float32(weight), out=term)
        else:  # widened first: a scalar must not decide the loop's dtype (numpy < 2)
            np.copyto(term, expert, casting="safe")
            np.multiply(term, np.float32(weight), out=term)
        np.add(total, term, out=total)
    divisor = spec.divisor
    if divisor is not None:
        np.divide(total, divisor, out=total)
    if spec.on_deltas:
        if spec.lambda_ != 1.0:
            np.multiply(total, np.float32(spec.lambda_), out=total)
        np.add(widened_base, total, out=total)
    return total


def _store(result: np.ndarray, target: np.ndarray, nan_present: bool) -> None:
    """Round ``result`` into ``target``'s dtype; bfloat16 NaNs get torch's bits."""
    np.copyto(target, result, casting="same_kind")
    if nan_present and target.dtype == BFLOAT16:
        target.view(np.uint16)[np.isnan(result)] = BFLOAT16_NAN_BITS


def _finite_bits(values: np.ndarray) -> bool:
    """Whether every entry is finite (exact, without widening: the exponent bits)."""
    if values.dtype == BFLOAT16:
        return bool((values.view(np.uint16) & 0x7FFF).max(initial=0) < 0x7F80)
    return bool(np.isfinite(values).all())


def _nonfinite_inputs(base: np.ndarray, experts: list[np.ndarray]) -> np.ndarray:
    return np.array([not _finite_bits(values) for values in (base, *experts)], dtype=np.bool_)
