"""Exact order statistics of a float32 score over a whole tensor, on uint32 keys: the CPU
backend's counterpart of ``methods.order_statistics`` for ``cpu/sce`` and ``cpu/arcee_fusion``
(``catalog``).

A score's bits map to a key with the values' order (``catalog_kernels._key``). A large tensor
takes two 16-bit radix passes, each making the keys afresh from the inputs (``key_chunks``), so
memory stays a chunk of keys; a tensor under ``streamed.KEYS_KEPT_BELOW`` entries keeps its keys
from the first pass and is selected by partition. Either way: the key at each rank and how
many ties before it to skip, as the torch selection gives them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from della_cli.backends.cpu import catalog_kernels
from della_cli.methods import streamed

_ALL = np.zeros(1, dtype=np.uint32)  # the prefix of the first digit: every key
KeyChunks = Callable[[], Iterable[tuple[np.ndarray, int]]]


def order_statistics(
    key_chunks: KeyChunks,
    numel: int,
    ranks_for: Callable[[int, int], Sequence[int]],
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """``methods.order_statistics.order_statistics`` on uint32 keys: ([(key, ties to skip)
    per rank], (numel, nonzero)); ``key_chunks()`` yields (keys, nonzero among them) afresh.
    A small tensor's keys are kept from the first pass and selected in memory."""
    if numel < streamed.KEYS_KEPT_BELOW:
        kept, nonzero = kept_keys(key_chunks)
        return select_kept(kept, ranks_for(kept.size, nonzero)), (kept.size, nonzero)
    buckets = 1 << 16
    counts = np.zeros((1, buckets), dtype=np.int64)
    total = nonzero = 0
    for keys, found in key_chunks():
        total += keys.size
        nonzero += found
        catalog_kernels.histogram(keys, _ALL, 32, 16, buckets - 1, counts)
    ranks = list(ranks_for(total, nonzero))
    if not ranks:
        return [], (total, nonzero)
    states = [list(_digit(counts[0], rank)) for rank in ranks]  # [prefix, rank within it]
    prefixes = sorted({prefix for prefix, _ in states})
    counts = np.zeros((len(prefixes), buckets), dtype=np.int64)
    for keys, _ in key_chunks():
        catalog_kernels.histogram(
            keys, np.array(prefixes, dtype=np.uint32), 16, 0, buckets - 1, counts
        )
    for state in states:
        digit, state[1] = _digit(counts[prefixes.index(state[0])], state[1])
        state[0] = (state[0] << 16) | digit
    return [(prefix, remaining) for prefix, remaining in states], (total, nonzero)


def kept_keys(key_chunks: KeyChunks) -> tuple[np.ndarray, int]:
    """Every key of a tensor in position order, and how many are of nonzero scores."""
    parts, nonzero = [], 0
    for keys, found in key_chunks():
        parts.append(keys.copy())
        nonzero += found
    return (np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)), nonzero


def select_kept(keys: np.ndarray, ranks: Sequence[int]) -> list[tuple[int, int]]:
    """(key, ties to skip) of each ascending rank among ``keys``, by partition (a 6K-entry
    tensor: a radix selection's passes cost more than its merge)."""
    ranks = list(ranks)
    if not ranks:
        return []
    if max(ranks) >= keys.size:
        raise ValueError(f"Rank {max(ranks)} is out of range for {keys.size} scores.")
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
