"""Dot products and norms of large tensors, defined so that every backend gets the same bits.

slerp, nuslerp, multislerp, karcher and model_stock read sums of products Σ xᵢyᵢ over a whole
tensor (or over each row). A float sum depends on the order of its additions, and each backend
would otherwise choose its own (torch's vectorized reductions, the CPU backend's compiled
loops), so the statistics, and the coefficients computed from them, would differ in their
last bits. Here the order is part of the definition, the same for any block split:

- a product is exact: both factors are float32 (the compute dtype) widened to float64, whose
  53-bit mantissa holds the 48 bits of the product;
- a row's products are added by halving (``row_dots``): with L values and h = ⌈L/2⌉, value i
  gets value i + h added for i < L − h, and the first h values remain, until one is left. Each
  level is an elementwise add, which every backend computes alike, and the error grows with
  log₂ L, not L;
- row sums are added to a running total one row after another, in row order (``fold_rows``),
  so a tensor read in blocks, or a block in row chunks, gives the same total as the tensor
  read whole.

The CPU backend computes the same (``backends.cpu.spherical``); the tests compare the bits.
"""

from __future__ import annotations

import math

import torch


def row_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σⱼ x[r, j]·y[r, j] per row r of two (rows, L) tensors: (rows,) in float64."""
    products = x.to(torch.float64) * y.to(torch.float64)
    length = products.shape[1]
    if length == 0:
        return torch.zeros(products.shape[0], dtype=torch.float64, device=x.device)
    while length > 1:
        half = (length + 1) // 2
        products[:, : length - half] += products[:, half:length]
        length = half
    return products[:, 0].clone()


def fold_rows(total: torch.Tensor, row_sums: torch.Tensor) -> torch.Tensor:
    """``total`` (any shape, float64) plus each of ``row_sums`` (rows, *total.shape) in turn,
    in row order: a running sum, on the CPU (a sequential cumulative sum there)."""
    total = total.to("cpu")
    if row_sums.shape[0] == 0:
        return total
    stacked = torch.cat([total.unsqueeze(0), row_sums.to("cpu", torch.float64)])
    return stacked.cumsum(dim=0)[-1]


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as (rows, L): slices along dim 0; a 1-D or 0-D tensor is one row."""
    if tensor.dim() <= 1:
        return tensor.reshape(1, tensor.numel())
    return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))


__all__ = ["as_rows", "fold_rows", "row_dots"]
