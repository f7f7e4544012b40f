"""Weighted sums (task arithmetic, linear) read straight from the input files.

The engine merges a weighted sum in chunks of about a million entries. Read the usual way,
each input's rows are first copied from the page cache into a buffer of their own (2 MiB of
bfloat16 per input), which is out of the caches by the time the kernel reads it back. The
compiled reader here (``_streamed_sum.c``, POSIX) instead reads 32K entries of every input at
a time into scratch memory that stays in L2 and merges them at once, with the same kernel
(``backends/cpu/weighted_sum_kernel.h``), so the bytes are those of
``backends.cpu.weighted_sum``.

Where it was not built (no C compiler, or Windows), ``AVAILABLE`` is False and the engine
reads rows into buffers as before.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from della_cli.errors import ModelError
from della_cli.io.dtypes import code_of

try:
    from della_cli.io import _streamed_sum as _compiled
except ImportError:  # no C compiler at install, or not POSIX
    _compiled = None

AVAILABLE = _compiled is not None
# The kernel's dtype codes, by safetensors dtype.
KINDS = {"BF16": 0, "F32": 1}
MAX_EXPERTS = 63  # the kernel's flags fit in 64 bits


@dataclass(frozen=True)
class FileSpan:
    """Where an input's entries start in a file, their dtype, and what an error names."""

    descriptor: int
    offset: int
    dtype: str  # safetensors code
    path: Path
    tensor: str


def supports(dtypes: Sequence[str], expert_count: int) -> bool:
    """Whether inputs and output of these dtypes, with that many experts, can be streamed."""
    return AVAILABLE and expert_count <= MAX_EXPERTS and all(d in KINDS for d in dtypes)


class Scratch:
    """Each thread's scratch memory for the reads, kept from chunk to chunk (new memory is
    faulted in and zeroed on first touch)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def buffer(self, inputs: int) -> np.ndarray:
        needed = _compiled.scratch_bytes(inputs)
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.nbytes < needed:
            buffer = self._local.buffer = np.empty(needed, dtype=np.uint8)
        return buffer


def merge(
    out: np.ndarray,
    base: FileSpan | int,
    experts: Sequence[FileSpan],
    weights: Sequence[float],
    on_deltas: bool,
    divisor: float | None,
    lambda_: float,
    scratch: Scratch,
) -> np.ndarray:
    """Merge the entries the spans start at into ``out`` (bfloat16 or float32, contiguous; its
    size sets how many entries are read). ``base``: a span, or the index of the expert whose
    entries are also the base (a linear merge's reference, read once). Returns, per input
    (base first), whether it held a NaN or an Inf; raises ModelError for a file that ends early.
    """
    if not out.flags.c_contiguous:
        raise ValueError("out must be contiguous")  # the kernel writes where it lies
    out_kind = KINDS[code_of(out)]
    inputs = len(experts) + (0 if isinstance(base, int) else 1)
    try:
        bits = _compiled.merge(
            out.reshape(-1).view(np.uint8),
            out_kind,
            base if isinstance(base, int) else _triple(base),
            tuple(_triple(span) for span in experts),
            tuple(float(weight) for weight in weights),
            on_deltas,
            divisor,
            lambda_,
            scratch.buffer(inputs),
        )
    except OSError as error:
        index = getattr(error, "input_index", None)
        if index is None:
            raise
        span = _span_of(index, base, experts)
        if error.errno == 0:
            raise ModelError(f"{span.path}: ended early while reading '{span.tensor}'") from None
        raise OSError(error.errno, error.strerror, str(span.path)) from None
    count = len(experts) + 1
    return np.array([bool(bits >> index & 1) for index in range(count)], dtype=np.bool_)


def _triple(span: FileSpan) -> tuple[int, int, int]:
    return span.descriptor, span.offset, KINDS[span.dtype]


def _span_of(index: int, base: FileSpan | int, experts: Sequence[FileSpan]) -> FileSpan:
    """The span of input ``index`` (0 the base, 1 + t expert t)."""
    if index > 0:
        return experts[index - 1]
    return experts[base] if isinstance(base, int) else base
