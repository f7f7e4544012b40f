"""Merges without sparsification or sign election (task arithmetic, linear), in one numba pass.

These methods are a weighted sum of the inputs: a handful of float32 operations per entry, so
they move far more bytes than they compute on. The kernel (``sum_kernel.sum_entries``) makes
one pass over the inputs and writes the output once, in pieces whose float32 sums stay in L1;
widening, rounding and the non-finite check are ``rules``'. ``merge_streamed`` runs it on
pieces read straight from the files (``io.streamed_sum``). It runs without the GIL, so a block
is split into spans that run in parallel threads.

The operations are the torch reference's (``merge.merge_tensor``), in its order and in float32,
so the bytes are the same (with one freedom IEEE 754 leaves: where two NaNs meet, which payload
a float32 result keeps; a bfloat16 NaN is always 0xFFFF):

    on deltas:  θ = θ₀ + λ · (Σ_t w_t (θ_t − θ₀)) / D      (λ = 1 skips its multiply,
    linear:     θ = (Σ_t w_t θ_t) / D                        which is exact)

with D = Σ_t w_t when normalizing (1 where it is 0), else 1, and the sum starting from +0.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial

import ml_dtypes
import numpy as np

from della_cli.backends.cpu import output_array, rules
from della_cli.backends.cpu.pointers import addresses
from della_cli.backends.cpu.shared_work import run_shared
from della_cli.backends.cpu.sum_kernel import sum_entries
from della_cli.io import streamed_sum
from della_cli.io.streamed_sum import FileSpan

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# Stored dtypes the kernel reads and writes, and their codes in ``kinds``.
KINDS = {BFLOAT16: 0, np.dtype(np.float32): 1}
# Entries per span a thread takes at least: shorter spans cost more in calls than they gain.
CHUNK = 1 << 18
_STORED = {"BF16": BFLOAT16, "F32": np.dtype(np.float32)}  # by safetensors code


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

    def call_arguments(self) -> tuple:
        """The arguments of ``sum_entries`` after the inputs and their kinds, up to ``out``."""
        divisor = self.divisor
        return (
            np.array(self.weights, dtype=np.float32),
            self.on_deltas,
            divisor is not None,
            np.float32(1.0 if divisor is None else divisor),
            np.float32(self.lambda_),
        )


def available() -> bool:
    """Whether the kernel can run (numba installed)."""
    return rules.available()


def kinds_of(dtypes: Sequence[np.dtype]) -> np.ndarray:
    """The kernel's codes of these input dtypes (bfloat16 or float32)."""
    return np.array([KINDS[np.dtype(dtype)] for dtype in dtypes], dtype=np.int64)


def kernel_output(out: np.ndarray) -> np.ndarray:
    """An output array as the kernel writes it: float32 values, or bfloat16 bits as uint16."""
    return out.view(np.uint16) if out.dtype == BFLOAT16 else out


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
    if len(experts) != len(spec.weights):
        raise ValueError("merge_block needs one weight per expert")
    inputs = [np.ascontiguousarray(array).reshape(-1) for array in (base, *experts)]
    if any(array.shape != inputs[0].shape for array in inputs):
        raise ValueError("the experts must have the base's shape")
    result = output_array(out, base.shape, out_dtype)
    block = _Block(
        inputs,
        kinds_of([array.dtype for array in inputs]),
        spec.call_arguments(),
        kernel_output(result.reshape(-1)),
    )
    size = inputs[0].shape[0]
    threads = 1 + (helper_count if helpers is not None else 0)
    parts = max(1, min(threads, -(-size // CHUNK)))
    bounds = [size * part // parts for part in range(parts + 1)]
    spans = list(itertools.pairwise(bounds))
    flags = run_shared(helpers, [partial(_merge_span, block, *span) for span in spans])
    return result, np.logical_or.reduce(flags)


def merge_streamed(
    out: np.ndarray,
    base: FileSpan | int,
    experts: Sequence[FileSpan],
    spec: WeightedSum,
    scratch: streamed_sum.Scratch,
) -> np.ndarray:
    """Merge the entries the spans start at into ``out`` (bfloat16 or float32, contiguous; its
    size sets how many entries are read), a piece of every input at a time as
    ``io.streamed_sum`` reads them. ``base``: a span, or the index of the expert whose entries
    are also the base (a linear merge's reference, read once). Returns, per input (base
    first), whether it held a NaN or an Inf."""
    if not out.flags.c_contiguous:
        raise ValueError("out must be contiguous")  # the kernel writes where it lies
    if len(experts) != len(spec.weights):
        raise ValueError("merge_streamed needs one weight per expert")
    read = list(experts) if isinstance(base, int) else [base, *experts]
    regions = scratch.regions(read)
    if isinstance(base, int):
        regions = [regions[base], *regions]
        base = experts[base]
    pointers = addresses(regions)
    kinds = kinds_of([_STORED[span.dtype] for span in (base, *experts)])
    arguments = spec.call_arguments()
    target = kernel_output(out.reshape(-1))
    flags = np.zeros(len(experts) + 1, dtype=np.bool_)
    for first, step in streamed_sum.pieces(read, regions[-len(read) :], target.shape[0]):
        sum_entries(pointers, kinds, *arguments, target[first : first + step], flags)
    return flags


@dataclass(frozen=True)
class _Block:
    """One call's flattened inputs (base first) and output, shared by the threads merging
    its spans."""

    inputs: list[np.ndarray]
    kinds: np.ndarray
    arguments: tuple
    out: np.ndarray


def _merge_span(block: _Block, start: int, stop: int) -> np.ndarray:
    """Entries ``start:stop`` into ``block.out``; the per-input non-finite flags."""
    flags = np.zeros(len(block.inputs), dtype=np.bool_)
    if stop > start:
        spans = [array[start:stop] for array in block.inputs]  # alive for the call
        sum_entries(addresses(spans), block.kinds, *block.arguments, block.out[start:stop], flags)
    return flags
