"""Buffer placement for page-cache copies, and the pool that recycles block buffers."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from della_cli.io.buffers import (
    ALIGNMENT,
    PAGE_BYTES,
    BufferPool,
    placed,
    read_offset,
    write_offset,
)


@pytest.mark.parametrize(
    ("file_offset", "read_at", "write_at"),
    [(0, 0, 0), (8, 0, 64), (64, 64, 64), (100, 64, 128), (4090, 4032, 0), (8192 + 16, 0, 64)],
)
def test_buffers_sit_just_before_the_copy_source_in_their_page(file_offset, read_at, write_at):
    """Reads copy file -> buffer, writes buffer -> file: the destination ends up 0 to 63 bytes
    before the source modulo a page, never the 1-32 bytes after it that copy slowly."""
    assert read_offset(file_offset) == read_at
    assert write_offset(file_offset) == write_at
    read_lag = (read_offset(file_offset) - file_offset) % PAGE_BYTES  # destination - source
    write_lag = (file_offset - write_offset(file_offset)) % PAGE_BYTES
    for lag in (read_lag, write_lag):
        assert lag == 0 or lag > PAGE_BYTES - ALIGNMENT


@pytest.mark.parametrize("page_offset", [0, 64, 1024, 4032])
def test_placed_buffers_have_the_asked_address_modulo_a_page(page_offset):
    buffer = placed(10_000, page_offset)
    assert buffer.nbytes == 10_000 and buffer.dtype == np.uint8
    assert buffer.ctypes.data % PAGE_BYTES == page_offset


def test_the_pool_recycles_a_given_buffer_at_a_new_placement():
    pool = BufferPool(capacity=1 << 16)
    first = pool.take(1000, 64)
    first[:] = 7
    address = first.ctypes.data
    pool.give(first.view(np.uint16).reshape(20, 25))  # any view of it
    second = pool.take(4000, 128)
    assert second.ctypes.data % PAGE_BYTES == 128
    assert abs(second.ctypes.data - address) < PAGE_BYTES  # the same memory, moved in place
    third = pool.take(4000, 0)  # the only free buffer is in use: a new one
    assert abs(third.ctypes.data - second.ctypes.data) >= (1 << 16)


def test_the_pool_ignores_foreign_arrays_and_double_gives():
    pool = BufferPool(capacity=1 << 12)
    pool.give(np.zeros(1 << 12, dtype=np.uint8))  # not the pool's
    taken = pool.take(100, 0)
    pool.give(taken)
    pool.give(taken)  # given twice: still one free buffer
    one, two = pool.take(100, 0), pool.take(100, 0)
    assert abs(one.ctypes.data - two.ctypes.data) >= 1 << 12


def test_requests_beyond_the_capacity_get_their_own_buffer():
    pool = BufferPool(capacity=1 << 10)
    big = pool.take(1 << 12, 64)
    assert big.nbytes == 1 << 12 and big.ctypes.data % PAGE_BYTES == 64
    pool.give(big)  # not the pool's: not recycled
    small = pool.take(100, 64)
    raw = big
    while isinstance(raw.base, np.ndarray):
        raw = raw.base
    assert not np.shares_memory(small, raw)  # none of big's allocation serves the pool


def test_the_pool_is_safe_across_threads():
    pool = BufferPool(capacity=1 << 12)
    seen: list[int] = []
    lock = threading.Lock()

    def worker():
        for _ in range(200):
            buffer = pool.take(256, 64)
            buffer[:] = 1
            with lock:
                seen.append(buffer.ctypes.data)
            pool.give(buffer)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 800
    assert len({address // PAGE_BYTES for address in seen}) <= 8  # at most a few buffers made
