"""The TIES and breadcrumbs selections of a small tensor, every expert's in one call.

A mixture-of-experts checkpoint holds tens of thousands of tensors of a few thousand entries
(a 96x64 expert matrix); there the streamed selection of ``select`` spent its time on fixed
costs, not on the entries: two compiled calls per expert, four radix passes that each
recompute |δ| from the inputs into fresh histograms. Here one compiled call takes every
expert of the tensor, makes each one's uint32 |δ| keys once (``select._keys``), finds the pivot
of each end of its window by an 8-bit radix over the keys held in memory, keeping only the
candidates that share the prefix found so far, and marks its mask. The keys, the digit choice,
the window test and the tie-break by position are ``select``'s (``top_digit``, ``in_window``,
``mark_ties``), so the masks are the same; the keys of one expert and their candidates (8
bytes an entry, reused from expert to expert) are all the memory added (the engine calls it
for small tensors only: ``CpuJobs.SMALL_SELECTION_BELOW``).
"""

from __future__ import annotations

import numpy as np

from della_cli.backends.cpu import block, select
from della_cli.backends.cpu.pointers import addresses, pointer_like

try:
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None

_DIGIT_BITS = 8
_LANES = 4  # interleaved histograms


def window_keep_masks(
    experts: list[np.ndarray], base: np.ndarray, windows: list[tuple[int, int]]
) -> np.ndarray:
    """Keep masks, (experts, *shape), of the entries of each ``expert - base`` whose stable
    ascending |δ| rank r over the whole tensor lies in the expert's window, ``low <= r < high``
    (``select.window_keep_mask`` of each expert). The experts share the base's shape and
    dtype."""
    reference = block.kernel_view(base).reshape(-1)
    views = [block.kernel_view(expert).reshape(-1) for expert in experts]
    if any(view.shape != reference.shape or view.dtype != reference.dtype for view in views):
        raise ValueError("the experts must have the base's shape and dtype")
    keep = np.empty((len(views), reference.size), dtype=np.bool_)
    lows = np.array([low for low, _ in windows], dtype=np.int64)
    highs = np.array([high for _, high in windows], dtype=np.int64)
    _select_experts(addresses(views), reference, lows, highs, keep)
    return keep.reshape((len(views), *base.shape))


if numba is not None:

    @numba.njit(cache=True)
    def _select_experts(experts, base, lows, highs, keep):
        """Each expert's (addresses of arrays like ``base``) keep mask into ``keep``'s row."""
        n = base.shape[0]
        keys = np.empty(n, dtype=np.uint32)
        candidates = np.empty(n, dtype=np.uint32)
        counts = np.empty(_LANES << _DIGIT_BITS, dtype=np.int64)
        scratch_expert, scratch_base, _ = select._scratch()
        for t in range(experts.shape[0]):
            row = keep[t]
            low, high = lows[t], highs[t]
            if low >= high:
                row[:] = False
                continue
            if low <= 0 and high >= n:
                row[:] = True
                continue
            expert = numba.carray(pointer_like(experts[t], base), (n,))
            for start in range(0, n, select._CHUNK):
                stop = min(start + select._CHUNK, n)
                select._keys(expert, base, start, stop, scratch_expert, scratch_base, keys[start:])
            wanted, active = select.window_ends(n, low, high)
            pivots, wanted = _pivots(keys, wanted, active, candidates, counts)
            for j in range(n):
                row[j] = select.in_window(keys[j], pivots, active)
            for end in range(2):
                if active[end]:
                    select.mark_ties(keys, 0, n, pivots[end], wanted[end], end == 0, row)

    @numba.njit(cache=True)
    def _pivots(keys, wanted, active, candidates, counts):
        """The key at each active end of the window (the ``wanted[end]``-th largest of
        ``keys``) and how many keys equal to it are among the ``wanted[end]`` largest
        (counted by position from the end), by 8-bit digits from the top; after each digit
        only the keys under the prefix so far stay candidates. The first digit's histogram,
        over every key, serves both ends."""
        pivots = np.zeros(2, dtype=np.uint32)
        wanted = wanted.copy()
        first_shift = 32 - _DIGIT_BITS
        _histogram(keys, keys.shape[0], first_shift, counts)
        top = counts[: 1 << _DIGIT_BITS].copy()
        for end in range(2):
            if not active[end]:
                continue
            digit, wanted[end] = select.top_digit(top, wanted[end])
            prefix = np.uint32(digit) << np.uint32(first_shift)
            size = _compact(keys, keys.shape[0], first_shift, digit, candidates)
            for shift in range(first_shift - _DIGIT_BITS, -_DIGIT_BITS, -_DIGIT_BITS):
                _histogram(candidates, size, shift, counts)
                digit, wanted[end] = select.top_digit(counts[: 1 << _DIGIT_BITS], wanted[end])
                prefix |= np.uint32(digit) << np.uint32(shift)
                if shift > 0:
                    size = _compact(candidates, size, shift, digit, candidates)
            pivots[end] = prefix
        return pivots, wanted

    @numba.njit(cache=True)
    def _histogram(source, size, shift, counts):
        """The digits at ``shift`` of ``source[:size]`` counted into ``counts[:buckets]``,
        in ``_LANES`` interleaved copies summed at the end, so that consecutive keys of one
        digit (a few digits hold most keys of a tensor's |δ|) do not wait on each other."""
        buckets = 1 << _DIGIT_BITS
        digit_mask = np.uint32(buckets - 1)
        counts[:] = 0
        for i in range(size):
            digit = (source[i] >> np.uint32(shift)) & digit_mask
            counts[(i & (_LANES - 1)) * buckets + digit] += 1
        for lane in range(1, _LANES):
            for digit in range(buckets):
                counts[digit] += counts[lane * buckets + digit]

    @numba.njit(cache=True)
    def _compact(source, size, shift, digit, candidates):
        """The keys of ``source[:size]`` whose digit at ``shift`` is ``digit``, moved to the
        front of ``candidates`` (``source`` may be ``candidates``), without a branch on the
        keys (half of them mispredicted); returns how many."""
        digit_mask = np.uint32((1 << _DIGIT_BITS) - 1)
        kept = 0
        for i in range(size):
            key = source[i]
            candidates[kept] = key
            kept += ((key >> np.uint32(shift)) & digit_mask) == digit
        return kept
