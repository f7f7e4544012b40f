"""The CPU backend's rules of the math, each written once, in numba (ALGORITHMS.md).

Every kernel of the CPU backend (``block``: a whole merge of a block of rows; ``select``: the
whole-tensor selections of TIES and breadcrumbs; ``weighted_sum``: task arithmetic and linear)
is built from these functions, which numba inlines into them:

- widen: a stored bfloat16, float16 or float32 value into float32 (``widen``; a row,
  ``widen_row``);
- round: a float32 row into the output dtype, to nearest even, NaN as torch writes it
  (``store_row``);
- non-finite check: whether a float32 row holds a NaN or an Inf (``has_nonfinite``, from the
  row's largest magnitude, ``largest_magnitude``);
- draw: ``methods.randomness.uniform_from_key`` for a row of flat indices (``row_draws``);
- rank: the stable ascending magnitude rank within a row (``stable_ranks``, and
  ``short_ranks`` for rows of up to 128 entries);
- random drop: DARE's and MAGPRUNE's keep decision and rescale (``random_drop``);
- elect and fuse: sign election, the (disjoint) mean, lambda and the base (``fuse_row``).

The torch functions of ``methods`` are the reference: the float32 operations here are theirs, in
their order, so the bytes are the same (``tests/unit/test_backends.py`` and
``test_weighted_sum.py`` compare them). The rounding and the non-finite check are branch-free,
so their loops vectorize: with a branch per entry, the block kernel took 11-13 ms instead of
4-8 ms on a task-arithmetic block of 4M entries (``bench/RESULTS.md``).
"""

from __future__ import annotations

import numpy as np

from della_cli.backends.cpu import prepare_numba

prepare_numba()  # before numba reads its configuration, and before any kernel is decorated

try:
    import numba
    from numba.core import types
    from numba.extending import overload

    from della_cli.backends.cpu.bits import (
        bits_of_float,
        float_of_bits,
        float_to_half_bits,
        half_to_float_bits,
    )
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None

_MASK32 = 0xFFFFFFFF
# float32 bits: the magnitude (all but the sign), and the magnitude of an Inf.
_MAGNITUDE = np.uint32(0x7FFFFFFF)
_INFINITY = np.uint32(0x7F800000)
# The row sort's digits: three of 11 bits cover a 31-bit magnitude key.
_DIGIT_BITS = 11
_DIGITS = 3
_BUCKETS = 1 << _DIGIT_BITS
_DIGIT_MASK = _BUCKETS - 1
_SHORT_ROW = 128  # rows up to this many entries are ranked by counting instead


def available() -> bool:
    """Whether numba is installed (without it, the plan gives every job the torch backend)."""
    return numba is not None


if numba is not None:

    def widen(value):
        """A stored value (bfloat16 bits, float16 bits as ``bits.HALF_BITS``, or a float32) as a
        float32."""

    @overload(widen, inline="always")
    def _widen_impl(value):
        if value == types.uint16:  # bfloat16 bits: the top half of a float32
            return lambda value: float_of_bits(np.uint32(np.uint32(value) << np.uint32(16)))
        if value == types.int16:  # float16 bits
            return lambda value: float_of_bits(half_to_float_bits(value))
        return lambda value: np.float32(value)

    def widen_row(source, target):
        """Copy a row of stored values into a float32 buffer."""

    @overload(widen_row, inline="always")
    def _widen_row_impl(source, target):
        def widen_each(source, target):
            for i in range(source.shape[0]):
                target[i] = widen(source[i])

        return widen_each

    def store_row(values, target):
        """Write a float32 row into the output row, rounded to its dtype."""

    @overload(store_row, inline="always")
    def _store_row_impl(values, target):
        if target.dtype == types.uint16:  # round to nearest even, as torch; NaN as torch's

            def store_bfloat16(values, target):
                # Branch-free, so the loop vectorizes: round every entry, then turn the
                # NaNs' bits to all ones (a NaN's rounding may carry into any bits).
                bits = values.view(np.uint32)
                for i in range(values.shape[0]):
                    x = bits[i]
                    bias = ((x >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
                    rounded = np.uint32(x + bias) >> np.uint32(16)
                    nan = np.uint32(1) if (x & _MAGNITUDE) > _INFINITY else np.uint32(0)
                    target[i] = np.uint16(rounded | (np.uint32(0) - nan))

            return store_bfloat16

        if target.dtype == types.int16:  # float16 bits (``HALF_BITS``)

            def store_float16(values, target):
                bits = values.view(np.uint32)
                for i in range(values.shape[0]):
                    target[i] = np.int16(float_to_half_bits(bits[i]))

            return store_float16

        def store_float32(values, target):
            for i in range(values.shape[0]):
                target[i] = values[i]

        return store_float32

    @numba.njit(cache=True, inline="always")
    def largest_magnitude(values):
        """The largest magnitude of a float32 row, as its bits (a NaN's are above an Inf's,
        ``_INFINITY``): a maximum without a branch or an early exit, so the loop vectorizes."""
        bits = values.view(np.uint32)
        largest = np.uint32(0)
        for i in range(values.shape[0]):
            largest = max(largest, np.uint32(bits[i] & _MAGNITUDE))
        return largest

    @numba.njit(cache=True, inline="always")
    def has_nonfinite(values):
        """Whether a float32 row holds a NaN or an Inf (all ones in its exponent)."""
        return nonfinite(largest_magnitude(values))

    @numba.njit(cache=True, inline="always")
    def magnitude(value):
        """A float32's magnitude as its bits, for a loop that keeps the largest as it goes
        (``largest_magnitude`` of one entry; ``nonfinite`` tells of the largest)."""
        return np.uint32(bits_of_float(value) & _MAGNITUDE)

    @numba.njit(cache=True, inline="always")
    def nonfinite(largest):
        """Whether the largest ``magnitude`` of a row is that of a NaN or an Inf."""
        return largest >= _INFINITY

    @numba.njit(cache=True)
    def fuse_row(vectors, reference, weights, consensus, normalize, total_weight, lam, on_deltas):
        """Elect, fuse, scale and add one row (``merge.merge_tensor`` after the sparsifier):
        expert by expert over the whole row, so each loop is branch-free and vectorizes; every
        entry still sums its experts in list order, as the reference does, so the bits agree."""
        count, n = vectors.shape
        numerator = np.zeros(n, dtype=np.float32)
        if consensus:
            total = np.zeros(n, dtype=np.float32)
            for t in range(count):
                for i in range(n):
                    total[i] += vectors[t, i]
            denominator = np.zeros(n, dtype=np.float32)
            for t in range(count):
                weight = weights[t]
                for i in range(n):
                    value = vectors[t, i]
                    # an exact zero total elects +, NaN elects -; zeros never agree
                    agrees = (value > 0) if total[i] >= 0 else (value < 0)
                    agree = np.float32(1.0) if agrees else np.float32(0.0)
                    numerator[i] += value * agree
                    denominator[i] += weight * agree
            if normalize:
                for i in range(n):
                    d = denominator[i]
                    numerator[i] /= d if d != 0 else np.float32(1.0)
        else:
            for t in range(count):
                for i in range(n):
                    numerator[i] += vectors[t, i]
            if normalize:
                divisor = total_weight if total_weight != 0 else np.float32(1.0)
                for i in range(n):
                    numerator[i] /= divisor
        if on_deltas:
            for i in range(n):
                numerator[i] = reference[i] + numerator[i] * lam
        return numerator

    @numba.njit(cache=True)
    def short_ranks(keys, ranks):
        """``stable_ranks`` of a row of at most ``_SHORT_ROW`` keys. A short row (a small
        expert's 64 entries) spent 2 us clearing and summing the radix sort's 6,144 counts,
        three times the rest of its merge; counting, for each key, the smaller keys and the
        equal ones before it is branch-free, vectorizes and needs no buffers."""
        n = keys.shape[0]
        for i in range(n):
            key = keys[i]
            rank = 0
            for j in range(n):
                rank += keys[j] < key
            for j in range(i):
                rank += keys[j] == key
            ranks[i] = rank

    @numba.njit(cache=True)
    def stable_ranks(keys, ranks, keys_a, keys_b, index_a, index_b, counts):
        """Ascending rank of each 31-bit key, equal keys in position order: an LSD radix sort
        over three 11-bit digits whose histograms come from one counting pass; keys travel
        with their positions so each pass reads sequentially, and a digit that is the same
        for every key is skipped. (Three 11-bit passes measured faster than four 8-bit ones:
        the bucket tables still fit in L1, and each pass moves every key once.)"""
        n = keys.shape[0]
        counts[:, :] = 0
        for i in range(n):
            key = keys[i]
            counts[0, key & _DIGIT_MASK] += 1
            counts[1, (key >> _DIGIT_BITS) & _DIGIT_MASK] += 1
            counts[2, key >> (2 * _DIGIT_BITS)] += 1
        source_keys, source_index = keys, index_a
        target_keys, target_index = keys_a, index_b
        for i in range(n):
            index_a[i] = i
        for digit in range(_DIGITS):
            shift = _DIGIT_BITS * digit
            if counts[digit, (keys[0] >> shift) & _DIGIT_MASK] == n:
                continue  # this digit orders nothing
            total = 0
            for bucket in range(_BUCKETS):
                count = counts[digit, bucket]
                counts[digit, bucket] = total
                total += count
            for i in range(n):
                key = source_keys[i]
                bucket = (key >> shift) & _DIGIT_MASK
                slot = counts[digit, bucket]
                counts[digit, bucket] = slot + 1
                target_keys[slot] = key
                target_index[slot] = source_index[i]
            spare_keys = keys_b if target_keys is keys_a else keys_a
            source_keys, source_index, target_keys, target_index = (
                target_keys,
                target_index,
                spare_keys,
                source_index,
            )
        for j in range(n):
            ranks[source_index[j]] = j

    @numba.njit(cache=True, inline="always")
    def avalanche32(x):
        x = np.uint32(x ^ (x >> np.uint32(16)))
        x = np.uint32(x * np.uint32(0x7FEB352D))
        x = np.uint32(x ^ (x >> np.uint32(15)))
        x = np.uint32(x * np.uint32(0x846CA68B))
        return np.uint32(x ^ (x >> np.uint32(16)))

    @numba.njit(cache=True)
    def row_draws(first, n, key):
        """``randomness.uniform_from_key`` at flat indices ``first`` .. ``first + n - 1``, in
        32-bit lanes. The index's high word is the same across a row unless its low word wraps,
        so its term is hoisted and the loop vectorizes; a row that wraps takes the plain loop."""
        multiplier, offset, round_key = key[0], key[1], key[2]
        golden = np.uint32(0x9E3779B9)
        draws = np.empty(n, dtype=np.float32)
        scale = np.float32(2.0**-24)
        if (first & _MASK32) + n <= _MASK32 + 1:
            low = np.uint32(first & _MASK32)
            high_term = np.uint32(np.uint32(first >> 32) * golden)
            for i in range(n):
                x = np.uint32(np.uint32(np.uint32(low + np.uint32(i)) * multiplier) + offset)
                x = avalanche32(np.uint32(avalanche32(np.uint32(x + high_term)) ^ round_key))
                draws[i] = np.float32(x >> np.uint32(8)) * scale
        else:
            for i in range(n):
                index = first + i
                x = np.uint32(np.uint32(np.uint32(index & _MASK32) * multiplier) + offset)
                x = np.uint32(x + np.uint32(np.uint32(index >> 32) * golden))
                x = avalanche32(np.uint32(avalanche32(x) ^ round_key))
                draws[i] = np.float32(x >> np.uint32(8)) * scale
        return draws

    @numba.njit(cache=True)
    def random_drop(values, ranked, density, low_prob, two_epsilon, key, first, rescale):
        """DARE (constant ``density``) or MAGPRUNE (probability from the stable magnitude
        rank) on one row of float32 task-vector entries, in place, with the draws of
        ``randomness.uniform_from_key`` from flat index ``first``: the torch path's bytes."""
        n = values.shape[0]
        draws = row_draws(first, n, key)
        if not ranked:
            for i in range(n):
                kept = np.float32(1.0) if draws[i] < density else np.float32(0.0)
                values[i] = ((values[i] / density) if rescale else values[i]) * kept
            return
        ranks = np.empty(n, dtype=np.int64)
        keys = values.view(np.uint32) & np.uint32(0x7FFFFFFF)  # |δ| sorts as its bits
        if n <= _SHORT_ROW:
            short_ranks(keys, ranks)
        else:
            stable_ranks(
                keys,
                ranks,
                np.empty(n, dtype=np.uint32),
                np.empty(n, dtype=np.uint32),
                np.empty(n, dtype=np.int32),
                np.empty(n, dtype=np.int32),
                np.empty((_DIGITS, _BUCKETS), dtype=np.int32),
            )
        denominator = np.float32(max(n - 1, 1))
        for i in range(n):
            keep_prob = (np.float32(ranks[i]) / denominator) * two_epsilon + low_prob
            kept = np.float32(1.0) if draws[i] < keep_prob else np.float32(0.0)
            values[i] = ((values[i] / keep_prob) if rescale else values[i]) * kept
