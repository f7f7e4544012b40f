"""The compute dtype and the sums of products the catalog methods' statistics are made of.

The interpolations (``spherical_pairs``, ``spherical_means``), model_stock (``stock``) and sce
(``selection``) widen their inputs to the compute dtype (float32, float64 when an input is
float64) and read sums of products over the whole tensor, its rows or its columns. Each sum is
made in the order ``row_sums`` defines, so that it is the same for any split of the tensor into
row blocks (``sum(stats(b) for b in blocks)``) and on every backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from della_cli.methods.row_sums import as_rows, fold_rows, row_dots

# The statistics are scalars per tensor, per row, or per column of the tensor.
WHOLE = "tensor"
ROWS = "rows"  # vectors along the last dimension; a 1-D tensor is one vector
COLUMNS = "columns"  # vectors along dim 0


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def widen(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs in the compute dtype (copies only where the dtype changes)."""
    dtype = compute_dtype(*tensors)
    return [t.to(dtype) for t in tensors]


def angle_of(cos: torch.Tensor) -> torch.Tensor:
    """``torch.acos``, a NaN passed on bit for bit: the vectorized acos of some CPUs (AVX-512)
    returns a NaN of the other sign, which reached the merged NaNs' bits, so the output of a
    NaN input differed between machines (``backends.cpu.coefficients.arccos`` does the same)."""
    return torch.where(torch.isnan(cos), cos, torch.acos(cos))


def whole_sum(values: torch.Tensor) -> torch.Tensor:
    """Σ values in float64 (a 0-dim tensor): each row (a slice along dim 0; a 1-D tensor is one
    row) summed in the compute dtype, then the row sums in float64 (sce's statistics)."""
    if values.dim() <= 1:
        return values.sum(dtype=torch.float64)
    rows = values.reshape(values.shape[0], math.prod(values.shape[1:]))
    return rows.sum(dim=1).sum(dtype=torch.float64)


def pair_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[Σx², Σy², Σxy] per row (a slice along dim 0; a 1-D tensor is one row): (rows, 3)
    float64, each a ``row_sums.row_dots``."""
    x, y = (as_rows(t) for t in widen([x, y]))
    return torch.stack([row_dots(x, x), row_dots(y, y), row_dots(x, y)], dim=-1)


def pair_sums(
    x: torch.Tensor, y: torch.Tensor, layout: str = WHOLE, total: torch.Tensor | None = None
) -> torch.Tensor:
    """[Σx², Σy², Σxy] in float64, stacked on the last axis: shape (3,) for ``WHOLE`` (the
    rows folded into ``total``, zeros if None, as ``row_sums.fold_rows`` says),
    ``(*x.shape[:-1], 3)`` for ``ROWS`` (block-local), ``(*x.shape[1:], 3)`` for ``COLUMNS``."""
    if layout == WHOLE:
        start = torch.zeros(3, dtype=torch.float64) if total is None else total
        return fold_rows(start, pair_rows(x, y))
    x, y = widen([x, y])
    if layout == ROWS:
        length = x.shape[-1] if x.dim() else 1
        vectors = [t.reshape(t.numel() // max(length, 1), length) for t in (x, y)]
        sums = torch.stack([row_dots(vectors[a], vectors[b]) for a, b in _PAIRS], dim=-1)
        return sums.reshape(*x.shape[:-1], 3)
    products = (x * x, y * y, x * y)
    return torch.stack([p.sum(dim=(0,), dtype=torch.float64) for p in products], dim=-1)


_PAIRS = ((0, 0), (1, 1), (0, 1))


__all__ = [
    "COLUMNS",
    "ROWS",
    "WHOLE",
    "angle_of",
    "compute_dtype",
    "pair_rows",
    "pair_sums",
    "whole_sum",
    "widen",
]
