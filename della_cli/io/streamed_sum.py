"""The reads of ``cpu/streamed_sum``: a weighted sum's inputs read straight from their files,
a piece of every input at a time.

The engine merges a weighted sum (task arithmetic, linear) in chunks of about a million
entries. Read the usual way, each input's rows are first copied from the page cache into a
buffer of their own (2 MiB of bfloat16 per input), which is out of the caches by the time the
kernel reads it back. Here each input's next ``STEP`` entries are read into a scratch region of
the thread's that stays in L2, and the caller merges them at once
(``backends.cpu.weighted_sum.merge_streamed``). The reads are positioned (``os.preadv``: the
descriptors' offsets never move, so threads share them) and release the GIL.

Regions are placed like ``io.buffers`` places its buffers: at the page offset of the file
offset they are read from, rounded down to 64 bytes, where the copy from the page cache is
fastest. Without positioned reads (Windows), ``AVAILABLE`` is False and the engine reads rows
into buffers instead (``cpu/chunked_sum``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from della_cli.errors import ModelError
from della_cli.io.buffers import PAGE_BYTES, read_offset

AVAILABLE = hasattr(os, "preadv")
# The dtypes read, by safetensors code, and their sizes.
ITEMSIZES = {"BF16": 2, "F32": 4}
# Entries read per input at a time: 128 KiB of bfloat16, so that a base and three experts stay
# in L2 with the pieces being merged, and the calls per chunk are few.
STEP = 65536


@dataclass(frozen=True)
class FileSpan:
    """Where an input's entries start in a file, their dtype, and what an error names."""

    descriptor: int
    offset: int
    dtype: str  # safetensors code
    path: Path
    tensor: str


class Scratch:
    """Each thread's scratch regions for the reads, kept from chunk to chunk (new memory is
    faulted in and zeroed on first touch)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def regions(self, spans: Sequence[FileSpan]) -> list[np.ndarray]:
        """A region (uint8) of ``STEP`` entries for each span, placed for its file offset."""
        memory = getattr(self._local, "memory", None)
        if memory is None or len(memory) < len(spans):
            size = STEP * max(ITEMSIZES.values()) + PAGE_BYTES
            memory = self._local.memory = [np.empty(size, dtype=np.uint8) for _ in spans]
        regions = []
        for raw, span in zip(memory, spans, strict=False):
            start = (read_offset(span.offset) - raw.ctypes.data) % PAGE_BYTES
            regions.append(raw[start : start + STEP * ITEMSIZES[span.dtype]])
        return regions


def pieces(
    spans: Sequence[FileSpan], regions: Sequence[np.ndarray], entries: int
) -> Iterator[tuple[int, int]]:
    """Read ``entries`` entries of each span, ``STEP`` at a time, into its region; yield
    (first entry, entries read) after each step, for the caller to merge before the next.
    A file that ends early is a ModelError, a failed read an OSError, each naming the file."""
    places = [memoryview(region) for region in regions]
    for first in range(0, entries, STEP):
        step = min(STEP, entries - first)
        for span, place in zip(spans, places, strict=True):
            size = ITEMSIZES[span.dtype]
            _read_fully(span, place[: step * size], span.offset + first * size)
        yield first, step


def _read_fully(span: FileSpan, place: memoryview, offset: int) -> None:
    """Fill ``place`` with the bytes of ``span``'s file from ``offset``."""
    done, count = 0, len(place)
    while done < count:
        try:
            got = os.preadv(span.descriptor, [place[done:]], offset + done)
        except OSError as error:
            raise OSError(error.errno, error.strerror, str(span.path)) from None
        if got == 0:
            raise ModelError(f"{span.path}: ended early while reading '{span.tensor}'")
        done += got
