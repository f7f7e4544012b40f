"""The CPU kernels of the methods that merge by sums of products: slerp, nuslerp, multislerp,
karcher and model_stock (``methods.spherical_pairs``, ``methods.spherical_means``,
``methods.stock``).

Each of these methods reads Gram matrices of its vectors (dot products and squared norms,
over the whole tensor or per row), computes a few coefficients from them, then writes
Σ cᵢ·vᵢ (plus the base) entry by entry. The torch path widens every block to float32 for
each pass and runs a chain of elementwise ops; here two compiled passes do it over the inputs
as stored, rows in parallel:

- ``gram_rows``: per row, the inputs widened (``rules.widen_row``), the base subtracted where
  the vectors are task vectors, and each pair's products added as ``methods.row_sums``
  defines it (exact float64 products, added by halving), so the sums are the torch
  backend's bits; ``catalog`` folds the rows into the tensor's totals (``fold_rows``);
- ``combine_rows``: per row, the weighted sum of the vectors in the reference's float32
  operations and order, rounded once to the output dtype (``rules.store_row``), and the
  non-finite check of each input.

The coefficients come from ``coefficients`` (numpy, float64). The dispatch from a method and
its parameters to these kernels is ``catalog``.
"""

from __future__ import annotations

import numpy as np

from della_cli.backends.cpu import block, output_array, rules
from della_cli.backends.cpu.pointers import addresses, pointer_like

try:
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None

# How ``combine_rows`` writes a row from its vectors vᵢ (inputs, or inputs minus the base):
SUM = 0  # Σ cᵢ·vᵢ, the first term as is (slerp, nuslerp)
SUM_FROM_ZERO = 1  # 0 + Σ cᵢ·vᵢ (multislerp, karcher: the reference starts from zeros)
STOCK = 2  # c₀·((0 + Σ xᵢ) / n) + c₁·base (model_stock: c = (t, 1 − t))


def gram_rows(reference: np.ndarray, inputs: list[np.ndarray], subtract: bool) -> np.ndarray:
    """Gram matrices (rows, n, n) float64 of a (rows, L) block of ``inputs`` (of their task
    vectors, input − ``reference``, where ``subtract``), as ``methods.row_sums`` defines each
    sum. (The merge pass checks for NaN and Inf: the statistics pass would only repeat it.)"""
    views = [block.kernel_view(x) for x in inputs]
    base = block.kernel_view(reference)
    _check(base, views)
    rows = base.shape[0]
    gram = np.empty((rows, len(views), len(views)), dtype=np.float64)
    _gram_rows(base, addresses(views), subtract, gram)
    return gram


def fold_rows(total: np.ndarray | None, row_sums: np.ndarray) -> np.ndarray:
    """``total`` (zeros if None) plus each of ``row_sums`` (rows, *shape) in row order: the
    running sum of ``methods.row_sums.fold_rows`` (numpy's cumulative sum is sequential)."""
    start = np.zeros(row_sums.shape[1:]) if total is None else total
    if row_sums.shape[0] == 0:
        return start
    return np.concatenate([start[None], row_sums]).cumsum(axis=0)[-1]


def combine_rows(
    reference: np.ndarray,
    inputs: list[np.ndarray],
    coefficients: np.ndarray,
    *,
    mode: int,
    subtract: bool,
    add_reference: bool,
    out_dtype: np.dtype,
    out: np.ndarray | None = None,
    check_reference: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A (rows, L) block of Σ cᵢ·vᵢ in ``out_dtype`` (``mode``: ``SUM``, ``SUM_FROM_ZERO`` or
    ``STOCK``), vᵢ = inputᵢ − ``reference`` where ``subtract``, plus the reference where
    ``add_reference``; ``coefficients``: (1, k) for the whole tensor or (rows, k), float32.
    Returns the rows and, per input, whether it held a NaN or an Inf (the reference last,
    false where it is neither read nor ``check_reference``)."""
    views = [block.kernel_view(x) for x in inputs]
    base = block.kernel_view(reference)
    _check(base, views)
    rows, length = base.shape
    out = output_array(out, (rows, length), out_dtype)
    flags = np.zeros((rows, len(views) + 1), dtype=np.bool_)
    read_reference = subtract or add_reference or mode == STOCK or check_reference
    _combine_rows(
        base,
        addresses(views),
        np.ascontiguousarray(coefficients, dtype=np.float32),
        mode,
        subtract,
        add_reference,
        read_reference,
        block.kernel_view(out),
        flags,
    )
    return out, flags.any(axis=0)


def supports(dtype: np.dtype) -> bool:
    return block.supports(dtype)


def _check(base: np.ndarray, views: list[np.ndarray]) -> None:
    if base.ndim != 2 or any(v.shape != base.shape or v.dtype != base.dtype for v in views):
        raise ValueError("the inputs must be (rows, length) blocks of one shape and dtype")


if numba is not None:

    @numba.njit(cache=True, inline="always")
    def _product(x, y, i):
        return np.float64(x[i]) * np.float64(y[i])

    @numba.njit(cache=True, inline="always")
    def _first_level(x, y, k, half, pairs):
        """Value k after the first halving of the products: paired with k + half, or alone."""
        if k < pairs:
            return _product(x, y, k) + _product(x, y, k + half)
        return _product(x, y, k)

    @numba.njit(cache=True, inline="always")
    def _levels(n):
        """The halving's sizes: the first level's half and its paired count, the second's, and
        how many leading values have all four terms of the first two levels paired."""
        half1 = (n + 1) // 2
        pairs1 = n - half1
        half2 = (half1 + 1) // 2
        pairs2 = half1 - half2
        both = max(0, min(pairs2, pairs1 - half2))
        return half1, pairs1, half2, pairs2, both

    @numba.njit(cache=True, inline="always")
    def _quarters(x, half1, half2, both):
        """The four slices of ``x`` that the first two levels add at each leading value:
        indexed by i alone, the loops over them vectorize (with the offsets added in the loop
        they ran four times slower)."""
        return (
            x[:both],
            x[half1 : half1 + both],
            x[half2 : half2 + both],
            x[half2 + half1 : half2 + half1 + both],
        )

    @numba.njit(cache=True)
    def _finish_tree(x, y, scratch, n):
        """The rest of Σ x·y once ``scratch`` holds its ``both`` leading values of the second
        level (``_levels``): the other values of that level, then the halving to one."""
        if n == 0:
            return 0.0
        half1, pairs1, half2, pairs2, both = _levels(n)
        for i in range(both, half2):
            value = _first_level(x, y, i, half1, pairs1)
            if i < pairs2:
                value = value + _first_level(x, y, i + half2, half1, pairs1)
            scratch[i] = value
        length = half2
        while length > 1:
            half = (length + 1) // 2
            for i in range(length - half):
                scratch[i] += scratch[i + half]
            length = half
        return scratch[0]

    @numba.njit(cache=True)
    def _tree_dot(x, y, scratch):
        """Σ x·y of two float32 rows as ``row_sums.row_dots`` adds it: exact float64
        products, then halving. The first two levels are computed together from the products
        (measured three times faster than one: the short upper levels cost as much as the
        first, whose values they had to store and reload), each value in the same order."""
        n = x.shape[0]
        half1, _, half2, _, both = _levels(n)
        x0, x1, x2, x3 = _quarters(x, half1, half2, both)
        y0, y1, y2, y3 = _quarters(y, half1, half2, both)
        for i in range(both):
            low = _product(x0, y0, i) + _product(x1, y1, i)
            scratch[i] = low + (_product(x2, y2, i) + _product(x3, y3, i))
        return _finish_tree(x, y, scratch, n)

    @numba.njit(cache=True, inline="always")
    def _two_levels(a0, a1, a2, a3, b0, b1, b2, b3):
        """A value of the second level from the four terms' widened entries."""
        return (a0 * b0 + a1 * b1) + (a2 * b2 + a3 * b3)

    @numba.njit(cache=True)
    def _pair_dots(vectors, scratch, gram, row):
        """Every pair's Σ x·y of a row's vectors into ``gram[row]``, each as ``_tree_dot``
        adds it. For two or three vectors the first two levels of all pairs are made in one
        loop that widens each entry once (three vectors' six sums: 1.5 -> 1.1 ns an entry,
        cached, one thread); more vectors go pair by pair."""
        count, n = vectors.shape
        half1, _, half2, _, both = _levels(n)
        if count == 2 or count == 3:
            a0, a1, a2, a3 = _quarters(vectors[0], half1, half2, both)
            b0, b1, b2, b3 = _quarters(vectors[1], half1, half2, both)
            c0, c1, c2, c3 = _quarters(vectors[count - 1], half1, half2, both)
            for i in range(both):
                xa0, xa1 = np.float64(a0[i]), np.float64(a1[i])
                xa2, xa3 = np.float64(a2[i]), np.float64(a3[i])
                xb0, xb1 = np.float64(b0[i]), np.float64(b1[i])
                xb2, xb3 = np.float64(b2[i]), np.float64(b3[i])
                scratch[0, i] = _two_levels(xa0, xa1, xa2, xa3, xa0, xa1, xa2, xa3)
                scratch[1, i] = _two_levels(xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3)
                scratch[2, i] = _two_levels(xb0, xb1, xb2, xb3, xb0, xb1, xb2, xb3)
                if count == 3:
                    xc0, xc1 = np.float64(c0[i]), np.float64(c1[i])
                    xc2, xc3 = np.float64(c2[i]), np.float64(c3[i])
                    scratch[3, i] = _two_levels(xa0, xa1, xa2, xa3, xc0, xc1, xc2, xc3)
                    scratch[4, i] = _two_levels(xb0, xb1, xb2, xb3, xc0, xc1, xc2, xc3)
                    scratch[5, i] = _two_levels(xc0, xc1, xc2, xc3, xc0, xc1, xc2, xc3)
        for a in range(count):
            for b in range(a, count):
                if count == 2 or count == 3:  # the pair's slot: triangular, as filled above
                    value = _finish_tree(vectors[a], vectors[b], scratch[b * (b + 1) // 2 + a], n)
                else:
                    value = _tree_dot(vectors[a], vectors[b], scratch[0])
                gram[row, a, b] = value
                gram[row, b, a] = value

    # nogil: the engine's reader and writer threads go on while a block is computed
    @numba.njit(parallel=True, cache=True, nogil=True)
    def _gram_rows(base, inputs, subtract, gram):
        rows, n = base.shape
        count = len(inputs)
        for row in numba.prange(rows):
            vectors = np.empty((count, n), dtype=np.float32)
            reference = np.empty(n, dtype=np.float32)
            if subtract:
                rules.widen_row(base[row], reference)
            for t in range(count):
                source = numba.carray(pointer_like(inputs[t], base), (rows, n))
                vector = vectors[t]
                rules.widen_row(source[row], vector)
                if subtract:
                    for i in range(n):
                        vector[i] = vector[i] - reference[i]
            # the second level's values of each of up to six pairs (n / 4 rounded up)
            scratch = np.empty((6, max((n + 3) // 4, 1)), dtype=np.float64)
            _pair_dots(vectors, scratch, gram, row)

    @numba.njit(cache=True, inline="always")
    def _add_widened(source, result):
        """result += the stored row, widened; its largest ``rules.magnitude``."""
        largest = np.uint32(0)
        for i in range(source.shape[0]):
            value = rules.widen(source[i])
            largest = max(largest, rules.magnitude(value))
            result[i] = result[i] + value
        return largest

    @numba.njit(cache=True, inline="always")
    def _add_weighted(source, reference, weight, result, subtract, first):
        """result = (``first``) or += weight · v, v the stored row widened, less the reference
        where ``subtract``: each entry widened, checked and weighed in one loop (through a
        float32 row, a row took six loops). The branches stay outside the loops, which then
        vectorize. Returns the row's largest ``rules.magnitude`` (before the subtraction)."""
        largest = np.uint32(0)
        n = source.shape[0]
        if subtract and first:
            for i in range(n):
                value = rules.widen(source[i])
                largest = max(largest, rules.magnitude(value))
                result[i] = weight * (value - reference[i])
        elif subtract:
            for i in range(n):
                value = rules.widen(source[i])
                largest = max(largest, rules.magnitude(value))
                result[i] = result[i] + weight * (value - reference[i])
        elif first:
            for i in range(n):
                value = rules.widen(source[i])
                largest = max(largest, rules.magnitude(value))
                result[i] = weight * value
        else:
            for i in range(n):
                value = rules.widen(source[i])
                largest = max(largest, rules.magnitude(value))
                result[i] = result[i] + weight * value
        return largest

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _combine_rows(
        base, inputs, coefficients, mode, subtract, add_reference, read_reference, out, flags
    ):
        rows, n = base.shape
        count = len(inputs)
        per_row = coefficients.shape[0] > 1
        for row in numba.prange(rows):
            c = coefficients[row] if per_row else coefficients[0]
            reference = np.empty(n, dtype=np.float32)
            if read_reference:
                rules.widen_row(base[row], reference)
                flags[row, count] = rules.has_nonfinite(reference)
            result = np.zeros(n, dtype=np.float32)
            for t in range(count):
                source = numba.carray(pointer_like(inputs[t], base), (rows, n))[row]
                if mode == STOCK:
                    largest = _add_widened(source, result)
                else:
                    first = t == 0 and mode == SUM
                    largest = _add_weighted(source, reference, c[t], result, subtract, first)
                flags[row, t] = rules.nonfinite(largest)
            if mode == STOCK:
                size = np.float32(count)
                for i in range(n):
                    result[i] = c[0] * (result[i] / size) + c[1] * reference[i]
            elif add_reference:
                for i in range(n):
                    result[i] = result[i] + reference[i]
            rules.store_row(result, out[row])
