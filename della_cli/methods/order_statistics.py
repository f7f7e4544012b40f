"""Exact order statistics of a per-entry score over a whole tensor, read in blocks.

sce keeps the top-k entries by variance and arcee_fusion thresholds at quantiles of an
importance score; neither score is stored. A radix selection on the score's bit pattern finds
the value of a given ascending rank with one pass over the blocks per 16-bit digit (two for a
float32 score, four for float64), recomputing the score in each pass, so memory stays one
block plus a 65536-bucket histogram. This is the torch reference of the selection that
``backends/cpu/select.py`` runs compiled for TIES. Ties rank by position (stable ascending order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

_DIGIT_BITS = 16
_BUCKETS = 1 << _DIGIT_BITS


def _bits(dtype: torch.dtype) -> int:
    if dtype == torch.float64:
        return 64
    if dtype == torch.float32:
        return 32
    raise TypeError(f"Scores must be float32 or float64, got {dtype}.")


def sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of the float values (−0.0 taken as +0.0); NaN is refused."""
    if torch.isnan(scores).any():
        raise ValueError("A score is NaN; an order statistic of NaN is undefined.")
    scores = scores + 0.0  # −0.0 + 0.0 = +0.0: equal values get equal keys
    bits = _bits(scores.dtype)
    raw = scores.view(torch.int32 if bits == 32 else torch.int64).to(torch.int64)
    magnitude = raw & ((1 << (bits - 1)) - 1)
    return torch.where(raw >= 0, raw, -magnitude - 1)


def key_value(key: int, dtype: torch.dtype) -> torch.Tensor:
    """The float (0-dim tensor of ``dtype``) whose sortable key is ``key``."""
    bits = _bits(dtype)
    raw = key if key >= 0 else (-key - 1) | (1 << (bits - 1))
    if raw >= 1 << (bits - 1):
        raw -= 1 << bits  # two's complement of the signed integer view
    integer = torch.tensor(raw, dtype=torch.int32 if bits == 32 else torch.int64)
    return integer.view(dtype)


def order_statistic(
    score_blocks: Callable[[], Iterable[torch.Tensor]], rank: int
) -> tuple[torch.Tensor, int]:
    """The score of ascending rank ``rank`` (0-based) over all blocks, and how many scores are
    strictly below it. ``score_blocks()`` yields the score of each block afresh per pass."""
    found, _ = order_statistics(score_blocks, lambda numel, nonzero: [rank])
    if not found:
        raise ValueError("No scores: an order statistic of an empty tensor is undefined.")
    return found[0]


def order_statistics(
    score_blocks: Callable[[], Iterable[torch.Tensor]],
    ranks_for: Callable[[int, int], Sequence[int]],
) -> tuple[list[tuple[torch.Tensor, int]], tuple[int, int]]:
    """Several order statistics in the passes of one: ([(value, below) per rank], (numel,
    nonzero)), the ranks given by ``ranks_for(numel, nonzero)`` once the first pass has
    counted the scores (and those that are nonzero). The first pass histograms every score's
    top digit for all ranks at once; each later pass keeps, per rank, the scores that share
    its prefix so far (ranks with the same prefix share a histogram). So a float32 score
    takes two passes however many ranks are asked (arcee_fusion's three quartiles took six),
    and a selection that first counts its scores (sce) counts them in the first."""
    histogram = torch.zeros(_BUCKETS, dtype=torch.int64)
    numel = nonzero = 0
    dtype = None
    for block in score_blocks():
        dtype = block.dtype
        keys = sortable_keys(block).reshape(-1)
        numel += keys.numel()
        nonzero += int(torch.count_nonzero(keys))
        digits = (keys >> (_bits(dtype) - _DIGIT_BITS)) + (_BUCKETS >> 1)
        histogram += torch.bincount(digits, minlength=_BUCKETS).cpu()  # scores on any device
    ranks = list(ranks_for(numel, nonzero))
    if not ranks:
        return [], (numel, nonzero)
    if dtype is None:
        raise ValueError("No scores: an order statistic of an empty tensor is undefined.")
    # per rank: [prefix of its key so far, rank among the keys with that prefix]
    states = [[d - (_BUCKETS >> 1), r] for d, r in (_digit(histogram, rank) for rank in ranks)]
    for shift in range(_bits(dtype) - _DIGIT_BITS, 0, -_DIGIT_BITS):
        histograms = {prefix: torch.zeros(_BUCKETS, dtype=torch.int64) for prefix, _ in states}
        for block in score_blocks():
            keys = sortable_keys(block).reshape(-1)
            for prefix, counts in histograms.items():
                digits = (keys[(keys >> shift) == prefix] >> (shift - _DIGIT_BITS)) & (_BUCKETS - 1)
                counts += torch.bincount(digits, minlength=_BUCKETS).cpu()
        for state in states:
            digit, state[1] = _digit(histograms[state[0]], state[1])
            state[0] = (state[0] << _DIGIT_BITS) | digit
    return [
        (key_value(prefix, dtype), rank - remaining)
        for (prefix, remaining), rank in zip(states, ranks, strict=True)
    ], (numel, nonzero)


def _digit(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """The digit whose bucket holds the key of ascending rank ``rank`` among the histogram's,
    and that key's rank among the keys of the bucket."""
    cumulative = histogram.cumsum(0)
    if rank >= int(cumulative[-1]):
        raise ValueError(f"Rank {rank} is out of range for {int(cumulative[-1])} scores.")
    digit = int(torch.searchsorted(cumulative, rank, right=True))
    return digit, rank - (int(cumulative[digit - 1]) if digit > 0 else 0)


def top_rank_mask(
    scores: torch.Tensor, value: torch.Tensor, ties_to_skip: int, ties_before: int
) -> torch.Tensor:
    """Mask of one block's entries whose stable ascending rank is at least that of ``value``'s
    first kept tie: scores above ``value``, and the ties (scores equal to it) after the first
    ``ties_to_skip`` ties in position order; ``ties_before`` counts ties in earlier blocks."""
    flat = scores.reshape(-1)
    ties = flat == value
    tie_index = ties_before + torch.cumsum(ties.to(torch.int64), 0) - 1
    keep = (flat > value) | (ties & (tie_index >= ties_to_skip))
    return keep.reshape(scores.shape)


__all__ = ["key_value", "order_statistic", "order_statistics", "sortable_keys", "top_rank_mask"]
