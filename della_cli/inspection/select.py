"""Exact whole-tensor magnitude cuts, found from blocks of rows (a streaming radix selection).

TIES keeps the entries of a task vector whose stable ascending |δ| rank over the whole tensor
is at least ``low``; breadcrumbs those in ``[low, high)`` (``methods.counts``). A merge selects
from the whole tensor at once (``methods.trim_select``); inspect finds the same cut from two
histogram passes over row blocks instead, so it never holds more than a block: non-negative
float32 numbers order like their bit patterns, so the value at a rank is found 16 bits at a
time, and equal magnitudes rank by position (the later ones rank higher), as in the merge, so
the masks agree to the entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DIGIT_BITS = 16
_HIGH_BUCKETS = 1 << 15  # keys have their sign bit cleared: 31 bits, 15 above the low digit
_LOW_BUCKETS = 1 << _DIGIT_BITS
_NONE = 1 << 31  # larger than every key: a cut that keeps nothing


def magnitude_keys(delta: torch.Tensor) -> torch.Tensor:
    """|δ| of a float32 tensor as int64 keys that order like the magnitudes."""
    return delta.abs().view(torch.int32).to(torch.int64)


@dataclass
class RankCut:
    """Entries of stable ascending magnitude rank ≥ ``rank``: those with a key above ``pivot``,
    and of the ``equal`` entries whose key is ``pivot``, all but the first ``skip`` by position.

    ``seen`` counts the equal entries met so far, so blocks must be passed in position order.
    """

    pivot: int
    skip: int = 0
    seen: int = 0

    def mask(self, keys: torch.Tensor) -> torch.Tensor:
        """The cut on the next block of keys (flat, in position order)."""
        above = keys > self.pivot
        if self.skip == 0:
            return above | (keys == self.pivot)
        equal = keys == self.pivot
        order = torch.cumsum(equal, dim=0).add_(self.seen - 1)
        self.seen += int(equal.sum())
        return above | (equal & (order >= self.skip))


class RankSelection:
    """Finds the cut at ascending rank ``rank`` of ``numel`` keys: ``add_high`` every block,
    then ``add_low`` every block, then ``cut()``. Ranks ≤ 0 and ≥ ``numel`` need no pass."""

    def __init__(self, numel: int, rank: int, device: torch.device):
        self.numel, self.rank = numel, rank
        self.wanted = numel - rank  # entries kept, counted from the top
        self.high = torch.zeros(_HIGH_BUCKETS, dtype=torch.int64, device=device)
        self.low = torch.zeros(_LOW_BUCKETS, dtype=torch.int64, device=device)
        self.digit = -1

    @property
    def needs_passes(self) -> bool:
        return 0 < self.rank < self.numel

    def add_high(self, keys: torch.Tensor) -> None:
        self.high += torch.bincount(keys >> _DIGIT_BITS, minlength=_HIGH_BUCKETS)

    def add_low(self, keys: torch.Tensor) -> None:
        if self.digit < 0:
            self.digit, self.wanted = _top_bucket(self.high, self.wanted)
        inside = keys[(keys >> _DIGIT_BITS) == self.digit] & (_LOW_BUCKETS - 1)
        self.low += torch.bincount(inside, minlength=_LOW_BUCKETS)

    def cut(self) -> RankCut:
        if self.rank <= 0:
            return RankCut(pivot=-1)
        if self.rank >= self.numel:
            return RankCut(pivot=_NONE)
        low_digit, wanted = _top_bucket(self.low, self.wanted)
        equal = int(self.low[low_digit])
        return RankCut(pivot=(self.digit << _DIGIT_BITS) | low_digit, skip=equal - wanted)


def _top_bucket(counts: torch.Tensor, wanted: int) -> tuple[int, int]:
    """The bucket holding the ``wanted``-th largest key, and how many of its keys are wanted."""
    from_top = torch.cumsum(counts.flip(0), dim=0)
    position = int(torch.searchsorted(from_top, torch.tensor([wanted], device=counts.device)))
    above = int(from_top[position - 1]) if position > 0 else 0
    return counts.numel() - 1 - position, wanted - above
