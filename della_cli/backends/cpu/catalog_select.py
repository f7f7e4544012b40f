"""Exact order statistics of a float32 score over a whole tensor, on uint32 keys: the CPU
backend's counterpart of ``methods.order_statistics`` for ``cpu/sce`` and ``cpu/arcee_fusion``
(``catalog``).

A score's bits map to a key with the values' order (``catalog_kernels._key``). A large tensor
takes two 16-bit radix passes, each making the keys afresh from the inputs (``key_chunks``), so
memory stays a chunk of keys; a tensor under ``streamed.KEYS_KEPT_BELOW`` entries (one block)
keeps its keys from the first pass (16 MiB at most) and is selected over them, by partition
when small. Either way: the key at each rank and how
many ties before it to skip, as the torch selection gives them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from functools import partial

import numpy as np

from della_cli.backends.cpu import catalog_kernels
from della_cli.backends.cpu.shared_work import run_shared
from della_cli.methods import streamed

_BUCKETS = 1 << 16  # a 16-bit radix digit
PARTITION_BELOW = 1 << 18  # kept keys fewer than this are selected by partition
KeyChunks = Callable[[], Iterable[tuple[np.ndarray, int]]]


def order_statistics(
    key_chunks: KeyChunks,
    numel: int,
    ranks_for: Callable[[int, int], Sequence[int]],
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """``methods.order_statistics.order_statistics`` on uint32 keys: ([(key, ties to skip)
    per rank], (numel, nonzero)); ``key_chunks()`` yields (keys, nonzero among them) afresh.
    A tensor under ``streamed.KEYS_KEPT_BELOW`` entries has its keys kept from the first pass
    and selected in memory."""
    if numel < streamed.KEYS_KEPT_BELOW:
        kept, nonzero = kept_keys(key_chunks, numel)
        return select_kept(kept, ranks_for(kept.size, nonzero)), (kept.size, nonzero)
    top = np.zeros(_BUCKETS, dtype=np.int64)
    total = nonzero = 0
    for keys, found in key_chunks():
        total += keys.size
        nonzero += found
        catalog_kernels.top_digits(keys, top)
    ranks = list(ranks_for(total, nonzero))

    def pieces() -> Iterable[list[np.ndarray]]:
        return ([keys] for keys, _ in key_chunks())

    return _low_digits(top, ranks, pieces), (total, nonzero)


def _low_digits(
    top: np.ndarray,
    ranks: Sequence[int],
    sources: Callable[[], Iterable[list[np.ndarray]]],
    helpers: Executor | None = None,
) -> list[tuple[int, int]]:
    """From the histogram of the keys' top digits, a second pass over ``sources()`` (lists
    of key arrays, the first counted by the calling thread, the others by ``helpers``, each
    into counts of its own: the kernel lets go of the GIL) for the low digits under each
    rank's prefix: (key, ties to skip) per rank."""
    if not ranks:
        return []
    states = [list(_digit(top, rank)) for rank in ranks]  # [prefix, rank within it]
    prefixes = sorted({prefix for prefix, _ in states})
    slots = np.full(_BUCKETS, -1, dtype=np.int32)
    slots[prefixes] = np.arange(len(prefixes), dtype=np.int32)
    counts = np.zeros((len(prefixes), _BUCKETS), dtype=np.int64)
    for pieces in sources():
        owns = [counts] + [np.zeros_like(counts) for _ in pieces[1:]]
        calls = [
            partial(catalog_kernels.low_digits, piece, slots, own)
            for piece, own in zip(pieces, owns, strict=True)
        ]
        run_shared(helpers, calls)
        for own in owns[1:]:
            counts += own
    for state in states:
        digit, state[1] = _digit(counts[slots[state[0]]], state[1])
        state[0] = (state[0] << 16) | digit
    return [(prefix, remaining) for prefix, remaining in states]


def kept_keys(key_chunks: KeyChunks, numel: int) -> tuple[np.ndarray, int]:
    """Every key of a tensor of ``numel`` entries in position order, and how many are of
    nonzero scores."""
    kept = np.empty(numel, dtype=np.uint32)
    position = nonzero = 0
    for keys, found in key_chunks():
        kept[position : position + keys.size] = keys
        position += keys.size
        nonzero += found
    return kept[:position], nonzero


def digit_counts() -> np.ndarray:
    """A histogram of one 16-bit radix digit, empty."""
    return np.zeros(_BUCKETS, dtype=np.int64)


def select_kept(
    keys: np.ndarray,
    ranks: Sequence[int],
    top: np.ndarray | None = None,
    helpers: Executor | None = None,
    helper_count: int = 0,
) -> list[tuple[int, int]]:
    """(key, ties to skip) of each ascending rank among the kept ``keys``: by partition under
    ``PARTITION_BELOW`` keys (a 6K-entry tensor: a radix selection's histograms cost more
    than its merge), else by the two radix digits, over memory: ``top``, the histogram of
    the keys' top digits where counted already, the low digits' pass shared with
    ``helper_count`` of ``helpers``."""
    ranks = list(ranks)
    if not ranks:
        return []
    if max(ranks) >= keys.size:
        raise ValueError(f"Rank {max(ranks)} is out of range for {keys.size} scores.")
    if keys.size >= PARTITION_BELOW:
        if top is None:
            top = digit_counts()
            catalog_kernels.top_digits(keys, top)
        parts = helper_count + 1 if helpers is not None else 1
        share = -(-keys.size // parts)
        slices = [keys[start : start + share] for start in range(0, keys.size, share)]
        return _low_digits(top, ranks, lambda: [slices], helpers)
    ordered = np.partition(keys, ranks)
    found = []
    for rank in ranks:
        key = ordered[rank]
        found.append((int(key), rank - int(np.count_nonzero(keys < key))))
    return found


def _digit(histogram: np.ndarray, rank: int) -> tuple[int, int]:
    cumulative = np.cumsum(histogram)
    if rank >= int(cumulative[-1]):
        raise ValueError(f"Rank {rank} is out of range for {int(cumulative[-1])} scores.")
    digit = int(np.searchsorted(cumulative, rank, side="right"))
    return digit, rank - (int(cumulative[digit - 1]) if digit > 0 else 0)


def key_value(key: int) -> np.float32:
    """The float32 whose key is ``key``."""
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def nan_score() -> ValueError:
    return ValueError("A score is NaN; an order statistic of NaN is undefined.")
