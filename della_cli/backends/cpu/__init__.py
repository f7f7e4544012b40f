"""The CPU backend: numba kernels over the inputs as stored (``rules``, ``block``, ``select``)
and the C weighted-sum kernel (``weighted_sum``). See docs/BACKENDS.md.

Importing this package imports numpy only: numba is loaded by the modules that need it, and
task arithmetic and linear merges never do.
"""

from __future__ import annotations

import numpy as np


def output_array(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``out`` checked against the shape and dtype it must have, or a new array of them."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous {dtype} array of shape {shape}")
    return out
