"""Process time per entry of the CPU backend's Gram pass (``spherical.gram_rows``) and of its
first half alone: widening the rows from bf16 and subtracting the base, without the dot
products. One thread, a 744 × 5632 bf16 block (an MLP matrix's block at ~1.1B) of a base and
three experts, as model_stock reads it. ``PYTHONPATH=. python bench/gram_parts.py``.
"""

from __future__ import annotations

import time

import ml_dtypes
import numba
import numpy as np
from della_cli.backends.cpu import block, rules
from della_cli.backends.cpu.pointers import addresses, pointer_like
from della_cli.backends.cpu.spherical import _tree_dot

ROWS, LENGTH, REPEATS = 744, 5632, 3


@numba.njit(parallel=True, nogil=True)
def gram_or_widen(base, inputs, gram, dots):
    """``spherical._gram_rows`` with task vectors, or only its widening where not ``dots``."""
    rows, n = base.shape
    count = len(inputs)
    for row in numba.prange(rows):
        vectors = np.empty((count, n), dtype=np.float32)
        reference = np.empty(n, dtype=np.float32)
        rules.widen_row(base[row], reference)
        for t in range(count):
            source = numba.carray(pointer_like(inputs[t], base), (rows, n))
            vector = vectors[t]
            rules.widen_row(source[row], vector)
            for i in range(n):
                vector[i] = vector[i] - reference[i]
        scratch = np.empty(max(n, 1), dtype=np.float64)
        if dots:
            for a in range(count):
                for b in range(a, count):
                    gram[row, a, b] = _tree_dot(vectors[a], vectors[b], scratch)
        else:  # keep the widened rows alive
            gram[row, 0, 0] = vectors[0, 0] + vectors[count - 1, n - 1]


def main() -> None:
    rng = np.random.default_rng(0)
    base = (0.02 * rng.standard_normal((ROWS, LENGTH))).astype(ml_dtypes.bfloat16)
    experts = [
        (base.astype(np.float32) + 0.001 * rng.standard_normal((ROWS, LENGTH))).astype(
            ml_dtypes.bfloat16
        )
        for _ in range(3)
    ]
    views = addresses([block.kernel_view(x) for x in experts])
    reference = block.kernel_view(base)
    gram = np.zeros((ROWS, 3, 3))
    numba.set_num_threads(1)
    for dots in (False, True):
        gram_or_widen(reference, views, gram, dots)  # compile, warm
        start = time.process_time()
        for _ in range(REPEATS):
            gram_or_widen(reference, views, gram, dots)
        per_entry = (time.process_time() - start) / REPEATS / (ROWS * LENGTH) * 1e9
        what = "widen and subtract, then the dot products" if dots else "widen and subtract"
        print(f"{what}: {per_entry:.2f} ns an entry")


if __name__ == "__main__":
    main()
