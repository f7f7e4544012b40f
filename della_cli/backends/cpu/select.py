"""The TIES and breadcrumbs selections, made from the two inputs as stored.

Both keep the entries of a task vector whose stable ascending magnitude rank over the whole
tensor lies in a window ``[low, high)``: TIES the top ``k`` (``high`` = N), breadcrumbs the ``k``
below the ``⌊γN⌋`` largest. The torch reference (``sparsify.rank_at_least_mask``) selects
from a float32 |δ| made beforehand; here |δ| is recomputed in small chunks from the expert and
the base (bfloat16 or float32) inside each pass of a radix selection, so the full-size float32
|δ| of the largest tensor (the embedding, often) is never held, and both ends of a breadcrumbs
window come out of the same passes. Equal magnitudes rank by position, as in the reference, so
the masks are the same.
"""

from __future__ import annotations

import numpy as np

from della_cli.backends.cpu import block, rules

try:
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None

_CHUNK = 4096
# The radix selection takes 16 bits of the 31-bit key a pass on large tensors: two passes over
# the inputs, where 8-bit digits take four; each pass recomputes |δ|, which is what the
# selection costs there. On a small tensor the 65,536-bucket histograms cost more than the
# passes (clearing and summing 1 MiB of counts a pass: a 96x64 expert matrix of a
# mixture-of-experts model took 1.4 ms to select), so below ``_SMALL`` entries the digits are
# 8 bits (256 buckets). Either way the pivots are the same.
_WIDE_DIGIT_BITS = 16
_NARROW_DIGIT_BITS = 8
_SMALL = 1 << 18


def window_keep_mask(expert: np.ndarray, base: np.ndarray, low: int, high: int) -> np.ndarray:
    """Keep mask of the entries of ``expert - base`` whose stable ascending |δ| rank r over the
    whole tensor has ``low <= r < high`` (0 <= low <= high <= N), shaped like the inputs."""
    numel = expert.size
    keep = np.empty(numel, dtype=np.bool_)
    if low >= high:
        keep[:] = False
    elif low <= 0 and high >= numel:
        keep[:] = True
    else:
        e = block.kernel_view(expert).reshape(-1)
        b = block.kernel_view(base).reshape(-1)
        wanted, active = window_ends(numel, low, high)
        threads = numba.get_num_threads()
        chunks = max(1, min(threads * 4, numel // _CHUNK))
        # one histogram per thread's share: 1 MiB each to clear and sum per pass
        shares = max(1, min(threads, numel // _CHUNK))
        digit_bits = _NARROW_DIGIT_BITS if numel < _SMALL else _WIDE_DIGIT_BITS
        pivots, wanted = _pivots(e, b, wanted, active, shares, digit_bits)
        _mark(e, b, pivots, wanted, active, keep, chunks)
    return keep.reshape(expert.shape)


def supports(expert: np.ndarray, base: np.ndarray) -> bool:
    return (
        rules.available()
        and expert.dtype == base.dtype
        and expert.shape == base.shape
        and block.supports(expert.dtype)
    )


if numba is not None:

    @numba.njit(cache=True)
    def _scratch():
        """Per-thread buffers for ``_keys``: the widened inputs and the keys of one chunk."""
        return (
            np.empty(_CHUNK, dtype=np.float32),
            np.empty(_CHUNK, dtype=np.float32),
            np.empty(_CHUNK, dtype=np.uint32),
        )

    @numba.njit(cache=True)
    def _keys(expert, base, start, stop, scratch_expert, scratch_base, keys):
        """|float32(expert) - float32(base)| bit patterns (sign cleared) of ``start:stop``."""
        count = stop - start
        rules.widen_row(expert[start:stop], scratch_expert[:count])
        rules.widen_row(base[start:stop], scratch_base[:count])
        for j in range(count):
            scratch_expert[j] = abs(scratch_expert[j] - scratch_base[j])
        bits = scratch_expert.view(np.uint32)
        for j in range(count):
            keys[j] = bits[j] & np.uint32(0x7FFFFFFF)

    @numba.njit(cache=True)
    def window_ends(numel, low, high):
        """For the window ``[low, high)`` of ranks, the entries to keep counted from the
        top for "rank >= low" and "rank >= high", and whether each end bounds anything."""
        wanted = np.empty(2, dtype=np.int64)
        wanted[0] = numel - max(low, 0)
        wanted[1] = numel - min(high, numel)
        active = np.empty(2, dtype=np.bool_)
        active[0] = low > 0
        active[1] = high < numel
        return wanted, active

    @numba.njit(cache=True)
    def top_digit(counts, wanted):
        """The digit, from the top of the histogram ``counts``, whose bucket holds the
        ``wanted``-th largest key, and how many of that bucket's keys are still wanted."""
        digit = counts.shape[0] - 1
        while counts[digit] < wanted:
            wanted -= counts[digit]
            digit -= 1
        return digit, wanted

    @numba.njit(cache=True)
    def in_window(key, pivots, active):
        """Whether a key lies above the low pivot and not above the high one (an inactive
        end bounds nothing); the keys equal to a pivot are settled by ``mark_ties``."""
        above_low = key > pivots[0] if active[0] else True
        above_high = key > pivots[1] if active[1] else False
        return above_low and not above_high

    @numba.njit(cache=True)
    def mark_ties(keys, start, stop, pivot, remaining, inside, keep):
        """Of the entries ``start:stop`` (``keys`` indexed from ``start``) equal to a pivot,
        the last ``remaining`` by position are the ones ranked at or above it: set their
        ``keep`` to ``inside`` (in the window's low end, or out at its high end); returns how
        many are still to set, in earlier entries. Ties rank by position, as in the torch
        reference's stable sort."""
        for j in range(stop - start - 1, -1, -1):
            if remaining <= 0:
                break
            if keys[j] == pivot:
                keep[start + j] = inside
                remaining -= 1
        return remaining

    @numba.njit(cache=True)
    def _count_chunk(
        expert, base, first, last, shift, digit_mask, prefix, prefix_mask, active, counts
    ):
        """Add to ``counts`` (2, buckets) the digits at ``shift`` of the keys of entries
        ``first:last`` that match each selection's prefix so far."""
        scratch_expert, scratch_base, keys = _scratch()
        for start in range(first, last, _CHUNK):
            stop = min(start + _CHUNK, last)
            _keys(expert, base, start, stop, scratch_expert, scratch_base, keys)
            for j in range(stop - start):
                key = keys[j]
                digit = (key >> np.uint32(shift)) & digit_mask
                for selection in range(2):
                    if active[selection] and (key & prefix_mask) == prefix[selection]:
                        counts[selection, digit] += 1

    @numba.njit(parallel=True, cache=True)
    def _count_in_parallel(
        expert, base, chunks, shift, digit_mask, prefix, prefix_mask, active, partial
    ):
        """``_count_chunk`` over ``chunks`` shares of the tensor, one ``partial`` row each."""
        n = expert.shape[0]
        for chunk in numba.prange(chunks):
            first, last = chunk * n // chunks, (chunk + 1) * n // chunks
            _count_chunk(
                expert,
                base,
                first,
                last,
                shift,
                digit_mask,
                prefix,
                prefix_mask,
                active,
                partial[chunk],
            )

    @numba.njit(cache=True)
    def _pivots(expert, base, wanted, active, chunks, digit_bits):
        """Radix selection of the magnitude at each of the two ranks, ``digit_bits`` (8 or 16)
        a pass from the top: returns each pivot and how many entries equal to it are still to
        be kept. Only the counting runs in parallel (``_count_in_parallel``), and a tensor of
        one chunk is counted on the calling thread: in a parallel function numba runs every
        array operation (each pass's zeroed counts, their sum) on the thread pool too, and
        waking it a dozen times cost a small tensor three times its selection."""
        n = expert.shape[0]
        wanted = wanted.copy()
        prefix = np.zeros(2, dtype=np.uint32)
        prefix_mask = np.uint32(0)
        buckets = 1 << digit_bits
        digit_mask = np.uint32(buckets - 1)
        for shift in range(32 - digit_bits, -digit_bits, -digit_bits):
            partial = np.zeros((chunks, 2, buckets), dtype=np.int64)
            if chunks == 1:
                _count_chunk(
                    expert, base, 0, n, shift, digit_mask, prefix, prefix_mask, active, partial[0]
                )
            else:
                _count_in_parallel(
                    expert, base, chunks, shift, digit_mask, prefix, prefix_mask, active, partial
                )
            counts = np.zeros((2, buckets), dtype=np.int64)
            for chunk in range(chunks):
                counts += partial[chunk]
            for selection in range(2):
                if not active[selection]:
                    continue
                digit, wanted[selection] = top_digit(counts[selection], wanted[selection])
                prefix[selection] |= np.uint32(digit) << np.uint32(shift)
            prefix_mask |= digit_mask << np.uint32(shift)
        return prefix, wanted

    @numba.njit(cache=True)
    def _mark_above(expert, base, first, last, pivots, active, keep):
        """keep = above the low pivot and not above the high one, for ``first:last``."""
        scratch_expert, scratch_base, keys = _scratch()
        for start in range(first, last, _CHUNK):
            stop = min(start + _CHUNK, last)
            _keys(expert, base, start, stop, scratch_expert, scratch_base, keys)
            for j in range(stop - start):
                keep[start + j] = in_window(keys[j], pivots, active)

    @numba.njit(parallel=True, cache=True)
    def _mark(expert, base, pivots, wanted, active, keep, chunks):
        """keep = (rank >= low) and not (rank >= high): entries above each pivot in parallel,
        then, of those equal to a pivot, the last ones by position, low first."""
        n = expert.shape[0]
        if chunks == 1:  # on the calling thread, as in ``_pivots``
            _mark_above(expert, base, 0, n, pivots, active, keep)
        else:
            for chunk in numba.prange(chunks):
                first, last = chunk * n // chunks, (chunk + 1) * n // chunks
                _mark_above(expert, base, first, last, pivots, active, keep)
        scratch_expert, scratch_base, keys = _scratch()
        for selection in range(2):
            remaining = wanted[selection] if active[selection] else 0
            stop = n
            while remaining > 0:
                start = max(0, stop - _CHUNK)
                _keys(expert, base, start, stop, scratch_expert, scratch_base, keys)
                remaining = mark_ties(
                    keys, start, stop, pivots[selection], remaining, selection == 0, keep
                )
                stop = start
