"""Compiled CPU kernel for the random drops (MAGPRUNE, DARE): rank, keep probability, draw,
drop and rescale in one pass.

The torch functions in ``sparsify.py`` and ``randomness.py`` are the reference; this kernel
computes exactly the same float32 bits (the tests compare them byte for byte) but fuses the
steps per row, so a row is read once and stays in cache. Torch needs about a dozen passes over
memory for the same work plus a comparison sort per row; here each row is ranked by a stable LSD
radix sort (four 8-bit digits of the magnitude's bit pattern, a digit that is the same across
the row skipped), and rows run in parallel. On the 2-core reference machine this makes the
MAGPRUNE step several times faster than the torch path (see bench/RESULTS.md).

numba is optional: without it (or off the CPU) the torch path runs, giving the same bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from della_cli.io.dtypes import from_torch, to_torch

if TYPE_CHECKING:
    import torch

try:
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None

_MASK32 = 0xFFFFFFFF
# The row sort's digits: three of 11 bits cover a 31-bit magnitude key.
_DIGIT_BITS = 11
_DIGITS = 3
_BUCKETS = 1 << _DIGIT_BITS
_DIGIT_MASK = _BUCKETS - 1


def available() -> bool:
    return numba is not None


if numba is not None:

    @numba.njit(cache=True)
    def _stable_ranks(keys, ranks, keys_a, keys_b, index_a, index_b, counts):
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
    def _avalanche32(x):
        x = np.uint32(x ^ (x >> np.uint32(16)))
        x = np.uint32(x * np.uint32(0x7FEB352D))
        x = np.uint32(x ^ (x >> np.uint32(15)))
        x = np.uint32(x * np.uint32(0x846CA68B))
        return np.uint32(x ^ (x >> np.uint32(16)))

    @numba.njit(cache=True)
    def _row_draws(first, n, key):
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
                x = _avalanche32(np.uint32(_avalanche32(np.uint32(x + high_term)) ^ round_key))
                draws[i] = np.float32(x >> np.uint32(8)) * scale
        else:
            for i in range(n):
                index = first + i
                x = np.uint32(np.uint32(np.uint32(index & _MASK32) * multiplier) + offset)
                x = np.uint32(x + np.uint32(np.uint32(index >> 32) * golden))
                x = _avalanche32(np.uint32(_avalanche32(x) ^ round_key))
                draws[i] = np.float32(x >> np.uint32(8)) * scale
        return draws

    @numba.njit(cache=True)
    def random_drop(values, ranked, density, low_prob, two_epsilon, key, first, rescale):
        """DARE (constant ``density``) or MAGPRUNE (probability from the stable magnitude
        rank) on one row of float32 task-vector entries, in place, with the draws of
        ``randomness.uniform_from_key`` from flat index ``first``: the torch path's bytes."""
        n = values.shape[0]
        draws = _row_draws(first, n, key)
        if not ranked:
            for i in range(n):
                kept = np.float32(1.0) if draws[i] < density else np.float32(0.0)
                values[i] = ((values[i] / density) if rescale else values[i]) * kept
            return
        ranks = np.empty(n, dtype=np.int64)
        keys = values.view(np.uint32) & np.uint32(0x7FFFFFFF)  # |δ| sorts as its bits
        _stable_ranks(
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

    @numba.njit(parallel=True, cache=True)
    def _sparsify_rows(delta, out, ranked, density, low_prob, two_epsilon, key, start, rescale):
        rows, n = delta.shape
        for row in numba.prange(rows):
            out[row, :] = delta[row]
            random_drop(
                out[row], ranked, density, low_prob, two_epsilon, key, start + row * n, rescale
            )

    @numba.njit(parallel=True, cache=True)
    def _rank_at_least(values, min_rank, keep, chunks):
        """keep[i] = (stable ascending rank of |values[i]| >= min_rank), by radix selection:
        four 8-bit digits narrow down the magnitude at rank ``min_rank`` (the pivot); larger
        magnitudes are kept, and of those equal to the pivot the last ones by position."""
        n = values.shape[0]
        bits = values.view(np.uint32)
        wanted = n - min_rank  # entries to keep, counted from the top
        prefix = np.uint32(0)
        prefix_mask = np.uint32(0)
        for shift in range(24, -8, -8):
            partial = np.zeros((chunks, 256), dtype=np.int64)
            for chunk in numba.prange(chunks):
                for i in range(chunk * n // chunks, (chunk + 1) * n // chunks):
                    key = bits[i] & np.uint32(0x7FFFFFFF)
                    if (key & prefix_mask) == prefix:
                        partial[chunk, (key >> shift) & 255] += 1
            counts = partial.sum(axis=0)
            digit = 255
            while counts[digit] < wanted:
                wanted -= counts[digit]
                digit -= 1
            prefix |= np.uint32(digit) << np.uint32(shift)
            prefix_mask |= np.uint32(255) << np.uint32(shift)
        for i in numba.prange(n):
            keep[i] = (bits[i] & np.uint32(0x7FFFFFFF)) > prefix
        # ``wanted`` entries equal to the pivot are kept too: the last ones by position.
        i = n - 1
        while wanted > 0:
            if (bits[i] & np.uint32(0x7FFFFFFF)) == prefix:
                keep[i] = True
                wanted -= 1
            i -= 1

    @numba.njit(parallel=True, cache=True)
    def _fuse_into_base(base, vectors, weights, consensus, normalize, total_weight, lam, out):
        """Elect, fuse, scale and add to the base in one pass, in the reference's float32
        operation order (sums over experts in list order)."""
        count = len(vectors)
        for j in numba.prange(base.shape[0]):
            numerator = np.float32(0.0)
            if consensus:
                total = np.float32(0.0)
                for t in range(count):
                    total += vectors[t][j]
                positive = total >= 0  # an exact zero elects +; NaN elects -
                denominator = np.float32(0.0)
                for t in range(count):
                    value = vectors[t][j]
                    agrees = (value > 0) if positive else (value < 0)  # zeros never agree
                    agree = np.float32(1.0) if agrees else np.float32(0.0)
                    numerator += value * agree
                    denominator += weights[t] * agree
                if normalize:
                    numerator /= denominator if denominator != 0 else np.float32(1.0)
            else:
                for t in range(count):
                    numerator += vectors[t][j]
                if normalize:
                    numerator /= total_weight
            out[j] = base[j] + numerator * lam

    @numba.njit(parallel=True, cache=True)
    def _widen_bfloat16(bits, out):
        for i in numba.prange(bits.shape[0]):
            out[i] = np.uint32(bits[i]) << np.uint32(16)

    @numba.njit(parallel=True, cache=True)
    def _bfloat16_delta_magnitude(expert_bits, base_bits, out):
        """|float32(expert) - float32(base)| from bfloat16 bit patterns, in chunks so the
        widened values live only in small per-thread buffers."""
        n = expert_bits.shape[0]
        chunk = 4096
        for first in numba.prange((n + chunk - 1) // chunk):
            start = first * chunk
            stop = min(start + chunk, n)
            expert = np.empty(stop - start, dtype=np.uint32)
            base = np.empty(stop - start, dtype=np.uint32)
            for j in range(stop - start):
                expert[j] = np.uint32(expert_bits[start + j]) << np.uint32(16)
                base[j] = np.uint32(base_bits[start + j]) << np.uint32(16)
            expert_values = expert.view(np.float32)
            base_values = base.view(np.float32)
            for j in range(stop - start):
                out[start + j] = abs(expert_values[j] - base_values[j])


def fuse_into_base(
    base: torch.Tensor,
    weighted: list[torch.Tensor],
    weights: list[float],
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """θ₀ + λ·Δ for float32 CPU tensors of one shape: the kernel form of ``merge.fuse``
    followed by the final scale and add, with the same float32 bits."""
    flat = [from_torch(v).reshape(-1) for v in weighted]
    out = np.empty(base.numel(), dtype=np.float32)
    total_weight = np.float32(sum(weights))
    _fuse_into_base(
        from_torch(base).reshape(-1),
        tuple(flat),
        np.array(weights, dtype=np.float32),
        consensus,
        normalize,
        total_weight if total_weight != 0 else np.float32(1.0),
        np.float32(lambda_),
        out,
    )
    return to_torch(out).reshape(base.shape)


def bfloat16_to_float32(tensor: torch.Tensor) -> torch.Tensor:
    """bfloat16 is the top half of a float32, so widening is a 16-bit shift of the bits: exact,
    NaN payloads included, and in parallel (torch's conversion runs on one thread here)."""
    bits = from_torch(tensor).reshape(-1).view(np.uint16)
    out = np.empty(bits.shape[0], dtype=np.uint32)
    _widen_bfloat16(bits, out)
    return to_torch(out.view(np.float32)).reshape(tensor.shape)


def bfloat16_delta_magnitude(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|δ| in float32 for bfloat16 inputs of one shape, without widening either input first:
    the same bits as ``(expert.float() - base.float()).abs()`` in a third of the memory."""

    def bits(tensor: torch.Tensor) -> np.ndarray:
        return from_torch(tensor).reshape(-1).view(np.uint16)

    out = np.empty(expert.numel(), dtype=np.float32)
    _bfloat16_delta_magnitude(bits(expert), bits(base), out)
    return to_torch(out).reshape(expert.shape)


def rank_at_least_mask(magnitude: torch.Tensor, min_rank: int) -> torch.Tensor:
    """The kernel form of ``sparsify.rank_at_least_mask`` for float32 CPU tensors with
    0 < min_rank < numel: a radix selection in five linear passes instead of a quickselect,
    a cumulative sum and several comparisons over the tensor."""
    values = from_torch(magnitude).reshape(-1)
    keep = np.empty(values.shape, dtype=np.bool_)
    _rank_at_least(values, min_rank, keep, numba.get_num_threads())
    return to_torch(keep).reshape(magnitude.shape)


def random_sparsify(
    delta_rows: torch.Tensor,
    density: float,
    epsilon: float | None,
    key_words: tuple[int, int, int],
    start: int,
    rescale: bool,
) -> torch.Tensor:
    """Random drop of a (rows, n) float32 CPU tensor: MAGPRUNE's rank-based keep probability
    when ``epsilon`` is given (rows of more than one entry), else DARE's constant ``density``.
    The draws are those of ``uniform_from_key`` for a key with these ``key_words`` from flat
    index ``start``; survivors are divided by their keep probability when ``rescale``."""
    values = from_torch(delta_rows)
    out = np.empty_like(values)
    ranked = epsilon is not None
    _sparsify_rows(
        values,
        out,
        ranked,
        np.float32(density),
        np.float32(density - epsilon if ranked else density),
        np.float32(2.0 * epsilon if ranked else 0.0),
        np.array([w & _MASK32 for w in key_words], dtype=np.uint32),
        start,
        rescale,
    )
    return to_torch(out)
