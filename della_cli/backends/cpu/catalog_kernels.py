"""numba kernels of the catalog methods that select or count entries: sce, ram and ramplus_tl
(``cpu/<method>``), and the whole-tensor order statistics of sce and arcee_fusion.

Each works on one row chunk of a block: the inputs widened to float32 by ``rules.widen_row``
(``widen``), the task vectors made in place (``subtract_base``), then a fused loop per entry
where the torch reference (``methods.selection``) runs a chain of whole-chunk operations, each
allocating its result. The float32 and float64 operations are the reference's, in its order,
so the bytes are the same (``tests/unit/test_selection_kernels.py`` compares them).

Order statistics: a score's float32 bits map to a uint32 ``key`` with the values' order
(``-0.0`` as ``+0.0``), histogrammed 16 bits at a time under each rank's prefix (``top_digits``,
``low_digits``) as ``methods.order_statistics`` does with int64 keys; the rank arithmetic is in
``backends.cpu.catalog_select``.
"""

from __future__ import annotations

import numpy as np

from della_cli.backends.cpu import rules

try:
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None


if numba is not None:
    # nogil (widen, float_keys): arcee_fusion's importance keys are made on two threads
    @numba.njit(cache=True, nogil=True)
    def widen(source, target):
        """A stored row (bfloat16 bits or float32) into ``target`` (float32); whether it holds
        a NaN or an Inf."""
        rules.widen_row(source, target)
        return rules.has_nonfinite(target)

    @numba.njit(cache=True)
    def store(values, target):
        """A float32 row into the output row, rounded to its dtype."""
        rules.store_row(values, target)

    @numba.njit(cache=True)
    def subtract_base(models, base):
        """δᵢ = θᵢ − θ₀ in place, float32 (``selection.task_vectors``)."""
        count, n = models.shape
        for i in range(count):
            for j in range(n):
                models[i, j] = models[i, j] - base[j]

    @numba.njit(cache=True, inline="always")
    def _key(bits):
        """The uint32 key of a float32's bits with the order of the values (not of −0.0:
        the callers give +0.0 for it)."""
        if bits & np.uint32(0x80000000):
            return np.uint32(~bits)
        return np.uint32(bits | np.uint32(0x80000000))

    @numba.njit(cache=True, nogil=True)
    def float_keys(values, keys):
        """Keys of a float32 row (arcee_fusion's importances); False where a value is NaN.
        Without a branch out of the loop, which vectorizes: 20x faster (issue 17)."""
        bits = values.view(np.uint32)
        nan = False
        for j in range(values.shape[0]):
            value = values[j]
            nan |= value != value
            keys[j] = _key(bits[j] if value != 0 else np.uint32(0))  # −0.0 as +0.0
        return not nan

    @numba.njit(cache=True)
    def sce_keys(deltas, keys):
        """Keys of the per-entry population variance of the task vectors across models, as
        ``selection.sce_scores``: Welford's float64 steps in model order, rounded once to
        float32 (model by model over the chunk, so the loops vectorize). Returns (entries of
        nonzero variance, whether a variance is NaN)."""
        count, n = deltas.shape
        mean = np.zeros(n, dtype=np.float64)
        m2 = np.zeros(n, dtype=np.float64)
        for i in range(count):
            seen = np.float64(i + 1)
            if i & (i + 1) == 0:  # a power of two: × its inverse is ÷, exactly, and faster
                inverse = np.float64(1.0) / seen
                for j in range(n):
                    value = np.float64(deltas[i, j])
                    step = value - mean[j]
                    mean[j] = mean[j] + step * inverse
                    m2[j] = m2[j] + step * (value - mean[j])
                continue
            for j in range(n):
                value = np.float64(deltas[i, j])
                step = value - mean[j]
                mean[j] = mean[j] + step / seen
                m2[j] = m2[j] + step * (value - mean[j])
        scores = keys.view(np.float32)
        nonzero = 0
        nan = False
        for j in range(n):
            score = np.float32(m2[j] / np.float64(count))
            nan |= score != score
            nonzero += score != 0
            scores[j] = score + np.float32(0.0)  # −0.0 as +0.0
        for j in range(n):
            keys[j] = _key(keys[j])
        return nonzero, nan

    # nogil (top_digits, low_digits): arcee_fusion counts digits on two threads
    @numba.njit(cache=True, nogil=True)
    def top_digits(keys, counts):
        """Add to ``counts`` (65,536) the top 16 bits of each key: the first radix digit."""
        for j in range(keys.shape[0]):
            counts[keys[j] >> np.uint32(16)] += 1

    @numba.njit(cache=True, nogil=True)
    def low_digits(keys, slots, counts):
        """Add to ``counts[slots[top]]`` the low 16 bits of each key whose top 16 bits have a
        slot (``slots[top]`` ≥ 0: a prefix a rank is in); one lookup a key, however many
        ranks share the pass."""
        for j in range(keys.shape[0]):
            key = keys[j]
            slot = slots[key >> np.uint32(16)]
            if slot >= 0:
                counts[slot, key & np.uint32(0xFFFF)] += 1

    @numba.njit(cache=True)
    def top_rank_keep(keys, pivot, skip, ties_before, keep):
        """``order_statistics.top_rank_mask`` on keys: keep the keys above ``pivot`` and the
        ties after the first ``skip`` in position order (``ties_before`` in earlier chunks);
        returns the ties seen here."""
        ties = 0
        for j in range(keys.shape[0]):
            key = keys[j]
            if key == pivot:
                keep[j] = ties_before + ties >= skip
                ties += 1
            else:
                keep[j] = key > pivot
        return ties

    @numba.njit(cache=True)
    def masked_squares(deltas, keep, squares):
        """(keep·δᵢ)² in float32 (``selection.sce_statistics`` before its sums)."""
        count, n = deltas.shape
        for i in range(count):
            for j in range(n):
                kept = np.float32(1.0) if keep[j] else np.float32(0.0)
                value = deltas[i, j] * kept
                squares[i, j] = value * value

    @numba.njit(cache=True)
    def sce_fuse(deltas, keep, weights, base, out):
        """``selection.sce_apply`` on one chunk: elect the sign of Σ masked δ (+ where ≥ 0),
        the weighted mean of the agreeing masked δ (0 where none agrees), plus the base; sums
        in model order, model by model over the chunk (so the loops vectorize)."""
        count, n = deltas.shape
        kept = np.empty(n, dtype=np.float32)
        total = np.zeros(n, dtype=np.float32)
        numerator = np.zeros(n, dtype=np.float32)
        denominator = np.zeros(n, dtype=np.float32)
        for j in range(n):
            kept[j] = np.float32(1.0) if keep[j] else np.float32(0.0)
        for i in range(count):
            for j in range(n):
                total[j] += deltas[i, j] * kept[j]
        for i in range(count):
            weight = weights[i]
            for j in range(n):
                masked = deltas[i, j] * kept[j]
                # sign(masked) == ±1 as elected: a NaN total elects −, zeros never agree
                agrees = (masked > 0) if total[j] >= 0 else (masked < 0)
                erased = weight * (np.float32(1.0) if agrees else np.float32(0.0))
                numerator[j] += masked * erased
                denominator[j] += erased
        for j in range(n):
            d = denominator[j]
            fused = np.float32(0.0) if d == 0 else numerator[j] / d
            numerator[j] = base[j] + fused
        rules.store_row(numerator, out)

    @numba.njit(cache=True)
    def _contributing(deltas, epsilon, contributing):
        """How many models change each entry (|δ| > ε), into ``contributing`` (n,), float32:
        a loop per model, so that it vectorizes."""
        count, n = deltas.shape
        contributing[:] = np.float32(0.0)
        for i in range(count):
            row = deltas[i]
            for j in range(n):
                contributing[j] += np.float32(1.0 if abs(row[j]) > epsilon else 0.0)

    @numba.njit(cache=True)
    def ram_counts(deltas, epsilon, counts):
        """``selection.ramplus_tl_statistics`` added into ``counts`` (n, 2): per model, its
        contributing entries (|δ| > ε) that others share, and those it alone has."""
        count, n = deltas.shape
        contributing = np.empty(n, dtype=np.float32)
        _contributing(deltas, epsilon, contributing)
        for i in range(count):
            row = deltas[i]
            shared = 0
            alone = 0
            for j in range(n):
                changed = 1 if abs(row[j]) > epsilon else 0
                several = 1 if contributing[j] > np.float32(1.0) else 0
                shared += changed * several
                alone += changed * (1 - several)
            counts[i, 0] += shared
            counts[i, 1] += alone

    @numba.njit(cache=True)
    def ram_fuse(deltas, base, epsilon, lambdas, boosted, out):
        """``selection.ramplus_tl_apply`` on one chunk: a change one model alone makes, × its
        λ where ``boosted`` (ramplus_tl); changes several make, averaged; plus the base. Per
        entry the float32 steps of the reference in its order (the models' terms added from
        zero in model order, then the base); the loops run model by model so they vectorize."""
        count, n = deltas.shape
        contributing = np.empty(n, dtype=np.float32)
        _contributing(deltas, epsilon, contributing)
        total = np.zeros(n, dtype=np.float32)
        for i in range(count):
            row = deltas[i]
            factor = lambdas[i]
            for j in range(n):
                delta = row[j]
                many = contributing[j]
                changed = delta * (np.float32(1.0) if abs(delta) > epsilon else np.float32(0.0))
                alone = np.float32(1.0) if many == np.float32(1.0) else np.float32(0.0)
                several = np.float32(1.0) if many > np.float32(1.0) else np.float32(0.0)
                divisor = max(many, np.float32(1.0))
                unique = changed * alone
                if boosted:
                    unique = unique * factor
                total[j] += unique + changed * several / divisor
        for j in range(n):
            total[j] = base[j] + total[j]
        rules.store_row(total, out)

    @numba.njit(cache=True, nogil=True)  # blocks split between threads
    def arcee_fuse(deltas, base, keys, pivot, keep_none, out):
        """``selection.arcee_fusion_apply`` on one chunk from its importances' kept keys:
        θ₀ + δ·[importance ≥ threshold], the threshold's key ``pivot`` (none kept where the
        threshold is NaN)."""
        n = base.shape[0]
        merged = np.empty(n, dtype=np.float32)
        for j in range(n):
            kept = np.float32(0.0) if keep_none or keys[j] < pivot else np.float32(1.0)
            merged[j] = base[j] + deltas[0, j] * kept
        rules.store_row(merged, out)
