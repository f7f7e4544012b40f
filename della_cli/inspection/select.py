"""Exact whole-tensor magnitude cuts, found from blocks of rows (a streaming radix selection).

TIES keeps the entries of a task vector whose stable ascending |δ| rank over the whole tensor
is at least ``low``; breadcrumbs those in ``[low, high)`` (``methods.counts``). A merge selects
from the whole tensor at once (``backends.cpu.select``); inspect finds the same cuts from two
histogram passes over row blocks instead, so it never holds more than a block: non-negative
float32 numbers order like their bit patterns, so the value at a rank is found 16 bits at a
time, and equal magnitudes rank by position (the later ones rank higher), as in the merge, so
the masks agree to the entry. One expert's cuts share the first pass's histogram.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_DIGIT_BITS = 16
_HIGH_BUCKETS = 1 << 15  # keys have their sign bit cleared: 31 bits, 15 above the low digit
_LOW_BUCKETS = 1 << _DIGIT_BITS
_LARGEST = (1 << 31) - 1


@dataclass
class RankCut:
    """Entries of stable ascending magnitude rank ≥ some rank: those with a key above
    ``pivot``, and of the entries whose key is ``pivot``, all but the first ``skip`` by
    position. ``seen`` counts the equal entries met so far: blocks come in position order."""

    pivot: int
    skip: int = 0
    seen: int = 0

    def mask(self, keys, arrays):
        """The cut on the next block of keys (flat, in position order)."""
        above = keys > self.pivot
        equal = arrays.nonzero(keys == self.pivot)
        count = int(equal.shape[0])
        first = max(0, self.skip - self.seen)
        if first < count:
            above[equal[first:]] = True
        self.seen += count
        return above


class ExpertCuts:
    """The cuts at several ascending ranks of one expert's ``numel`` keys: ``add_high`` every
    block, then ``add_low`` every block, then ``cuts()``. Ranks ≤ 0 and ≥ ``numel`` (keep all,
    keep none) need no pass, nor does a tensor of density 1."""

    def __init__(self, numel: int, ranks: list[int]):
        self.numel, self.ranks = numel, ranks
        self.high = np.zeros(_HIGH_BUCKETS, dtype=np.int64)
        self.low: dict[int, np.ndarray] = {}  # high digit -> histogram of the low digits
        # per rank that needs the passes: its high digit and how many keys it wants there
        self.digits: list[tuple[int, int] | None] = []

    @property
    def needs_passes(self) -> bool:
        return any(0 < rank < self.numel for rank in self.ranks)

    def add_high(self, keys, arrays) -> None:
        self.high += arrays.bincount(keys >> _DIGIT_BITS, _HIGH_BUCKETS)

    def add_low(self, keys, arrays) -> None:
        if not self.digits:
            self.digits = [
                _top_bucket(self.high, self.numel - rank) if 0 < rank < self.numel else None
                for rank in self.ranks
            ]
            self.low = {
                found[0]: np.zeros(_LOW_BUCKETS, dtype=np.int64) for found in self.digits if found
            }
        high = keys >> _DIGIT_BITS
        for digit, histogram in self.low.items():
            inside = keys[high == digit] & (_LOW_BUCKETS - 1)
            histogram += arrays.bincount(inside, _LOW_BUCKETS)

    def cuts(self) -> list[RankCut]:
        result = []
        for index, rank in enumerate(self.ranks):
            if rank <= 0:
                result.append(RankCut(pivot=-1))
            elif rank >= self.numel:
                result.append(RankCut(pivot=_LARGEST, skip=self.numel + 1))
            else:
                digit, wanted = self.digits[index]  # type: ignore[misc]
                low_digit, wanted = _top_bucket(self.low[digit], wanted)
                equal = int(self.low[digit][low_digit])
                pivot = (digit << _DIGIT_BITS) | low_digit
                result.append(RankCut(pivot=pivot, skip=equal - wanted))
        return result


def _top_bucket(counts: np.ndarray, wanted: int) -> tuple[int, int]:
    """The bucket holding the ``wanted``-th largest key (1 ≤ ``wanted`` ≤ the count), and how
    many of its keys are wanted."""
    from_top = np.cumsum(counts[::-1])
    position = int(np.searchsorted(from_top, wanted))
    above = int(from_top[position - 1]) if position > 0 else 0
    return counts.size - 1 - position, wanted - above
