"""Buffers placed for fast copies between the page cache and the process.

Every read copies file bytes from the page cache into a buffer, and every write copies a buffer
into the page cache. On the 2-core reference machine (AMD EPYC) that copy runs at 1.3-2 GB/s
instead of 3-13 GB/s when the destination lies 1 to 32 bytes past the source modulo 4 KiB,
and an ordinary large allocation (glibc puts its data 16 bytes into a page) lands there for
every file offset within 16 bytes of a page boundary (``bench/floor.py`` quotes the figures).
So buffers are placed by the file offset they are read from or written to: the destination
then lies 0 to 63 bytes before the source (fast in every case measured), and the data is
64-byte aligned, as the compiled kernels and SIMD loops prefer.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

PAGE_BYTES = 4096
ALIGNMENT = 64


def read_offset(file_offset: int) -> int:
    """Where in a page to put a buffer read from ``file_offset``: the offset rounded down to
    64 bytes, so the destination is at most 63 bytes before the source."""
    return file_offset % PAGE_BYTES // ALIGNMENT * ALIGNMENT


def write_offset(file_offset: int) -> int:
    """Where in a page to put a buffer written at ``file_offset``: the offset rounded up to 64
    bytes, so the destination (the file) is at most 63 bytes before the source."""
    return -(-(file_offset % PAGE_BYTES) // ALIGNMENT) * ALIGNMENT % PAGE_BYTES


# The copy is slow where its destination lies 1 to this many bytes past its source, modulo a page.
SLOW_GAP = 32


def relay_offset(read_page_offset: int, write_file_offset: int) -> int:
    """Where in a page to put a buffer read into (at ``read_page_offset``, ``read_offset`` of
    the file offset read) and then written out as it is at ``write_file_offset``: the read's
    place, or 64 bytes before it where the write would find its destination 1 to
    ``SLOW_GAP`` bytes past the buffer. Both copies are then fast: the read's destination lies
    0 to 127 bytes before its source, and the write's anywhere but 1 to 32 bytes past."""
    gap = (write_file_offset - read_page_offset) % PAGE_BYTES
    if 1 <= gap <= SLOW_GAP:
        return (read_page_offset - ALIGNMENT) % PAGE_BYTES
    return read_page_offset


def placed(nbytes: int, page_offset: int) -> np.ndarray:
    """A new buffer of ``nbytes`` (uint8) whose address is ``page_offset`` modulo a page."""
    return _place(np.empty(nbytes + PAGE_BYTES, dtype=np.uint8), nbytes, page_offset)


def _place(raw: np.ndarray, nbytes: int, page_offset: int) -> np.ndarray:
    start = (page_offset - raw.ctypes.data) % PAGE_BYTES
    return raw[start : start + nbytes]


class BufferPool:
    """Placed buffers of up to ``capacity`` bytes, recycled between blocks.

    A new buffer costs more than the copy into it: its pages are faulted in and zeroed by the
    kernel on first touch (reading the ~250M model's inputs block by block took 0.64 s into
    new buffers and 0.29 s into reused ones). ``give`` takes back a buffer whose contents are
    no longer needed; the caller guarantees that no view of it is still in use. Thread-safe:
    the reader thread takes, the compute and writer threads give.
    """

    def __init__(self, capacity: int, max_free: int = 32):
        self.capacity = capacity
        self.max_free = max_free
        self._free: list[np.ndarray] = []
        # Buffers this pool made, by id, for as long as they live (an id is reused after).
        self._owned: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def take(self, nbytes: int, page_offset: int) -> np.ndarray:
        """A buffer of ``nbytes`` at ``page_offset`` in its page: recycled if one is free."""
        if nbytes > self.capacity:
            return placed(nbytes, page_offset)
        with self._lock:
            raw = self._free.pop() if self._free else None
            if raw is None:
                raw = np.empty(self.capacity + PAGE_BYTES, dtype=np.uint8)
                self._owned[id(raw)] = raw
        return _place(raw, nbytes, page_offset)

    def maps_well(self, file_offset: int) -> bool:
        """Whether rows read from ``file_offset`` may be mapped where they lie instead of
        read into one of these buffers (``io.mapped``): always, as a mapping is never copied
        out of; its pages go when its last view does."""
        return True

    def give(self, array: np.ndarray) -> None:
        """Take back the buffer under ``array`` (any view of a taken buffer); arrays that did
        not come from this pool (mapped rows among them) are ignored."""
        raw = array
        while isinstance(raw.base, np.ndarray):
            raw = raw.base
        with self._lock:
            owned = self._owned.get(id(raw)) is raw
            already_free = any(free is raw for free in self._free)
            if owned and not already_free and len(self._free) < self.max_free:
                self._free.append(raw)


class RelayPool:
    """A pool's buffers for rows that are written out as they were read (passthrough, which
    hands the read buffer to the writer instead of copying it), each placed for both of its
    copies (``relay_offset``); ``write_at``: the output file offset of the buffer's first
    byte."""

    def __init__(self, pool: BufferPool, write_at: int):
        self.pool = pool
        self.write_at = write_at

    def take(self, nbytes: int, page_offset: int) -> np.ndarray:
        return self.pool.take(nbytes, relay_offset(page_offset, self.write_at))

    def maps_well(self, file_offset: int) -> bool:
        """Whether rows read from ``file_offset`` may be mapped where they lie and written out
        from there: unless the write would find its destination 1 to ``SLOW_GAP`` bytes past
        them, modulo a page (a mapping sits at its file offset's place in a page)."""
        return not 1 <= (self.write_at - file_offset) % PAGE_BYTES <= SLOW_GAP

    def give(self, array: np.ndarray) -> None:
        self.pool.give(array)
