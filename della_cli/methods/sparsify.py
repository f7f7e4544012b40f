"""Sparsifiers: which entries of a task vector survive, and how survivors are rescaled.

- magnitude (TIES, arXiv 2306.01708): keep the ⌊d·N⌋ largest |δ| of the whole tensor.
- random (DARE, arXiv 2311.03099): keep each entry with probability d.
- magprune (DELLA, arXiv 2406.11617): keep each entry with a probability that rises linearly
  with its magnitude rank in its row, from d − ε to d + ε, so the row mean stays d.
- magnitude_outliers (Model Breadcrumbs, arXiv 2312.06795): drop the largest ⌊γN⌋ and the
  smallest entries so that ⌊d·N⌋ remain.

Ranks are "stable ascending": rank 0 is the smallest magnitude and equal magnitudes are ranked by
position, which makes every tie-break deterministic and device-independent. All functions are
pure: random draws are passed in as uniform numbers in [0, 1).
"""

from __future__ import annotations

import torch

from della_cli.methods.counts import magnitude_rank_window
from della_cli.methods.parameters import Rescale


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """View ``tensor`` as (rows, n): rows run along the last dimension of a 2-D tensor, a 1-D
    tensor is one row, and a tensor of more dimensions is viewed as (shape[0], -1)."""
    if tensor.dim() <= 1:
        return tensor.reshape(1, -1)
    if tensor.dim() == 2:
        return tensor
    return tensor.reshape(tensor.shape[0], -1)


def stable_row_order(magnitude_rows: torch.Tensor) -> torch.Tensor:
    """Positions that sort each row of non-negative values ascending, equal values kept in
    position order: (rows, n) int64."""
    return torch.sort(magnitude_rows, dim=-1, stable=True).indices


def stable_row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Ascending rank (0..n-1) of each entry in its row, ties ranked by position: (rows, n) int64.

    One stable sort per row, then the positions are scattered back to give each entry its rank.
    """
    order = stable_row_order(rows)
    positions = torch.arange(rows.shape[-1], device=rows.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def magprune_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MAGPRUNE keep probability of each entry of ``delta`` (same shape, float32).

    k = (d − ε) + 2ε · q with q = rank / (n − 1) the entry's normalized magnitude rank in its row
    (q = 1/2 for a row of one), so k runs from d − ε to d + ε and averages exactly d per row.
    The n possible values are computed once, in sorted order, and scattered to their entries.
    """
    magnitude_rows = as_rows(delta.abs())
    n = magnitude_rows.shape[-1]
    if n == 1:
        q = torch.full_like(magnitude_rows, 0.5, dtype=torch.float32)
        return q.mul_(2.0 * epsilon).add_(density - epsilon).reshape(delta.shape)
    # The n values are made on the CPU and moved: CUDA divides by a host scalar as a multiply by
    # its reciprocal, which differs in the last bit and would make the keep set device-dependent.
    by_rank = torch.arange(n, dtype=torch.float32).div_(n - 1)
    by_rank = by_rank.mul_(2.0 * epsilon).add_(density - epsilon).to(delta.device)
    order = stable_row_order(magnitude_rows).to(delta.device)
    keep_prob = torch.empty(magnitude_rows.shape, dtype=torch.float32, device=delta.device)
    return keep_prob.scatter_(-1, order, by_rank.expand_as(order)).reshape(delta.shape)


def rank_at_least_mask(magnitude: torch.Tensor, min_rank: int) -> torch.Tensor:
    """Mask of the entries whose stable ascending rank over the whole tensor is ≥ ``min_rank``.

    Selection without a full sort: the value at rank ``min_rank`` is found with ``kthvalue``;
    larger values are in, and among values equal to it the later positions are in, which is what
    ranking equal magnitudes by position means.
    """
    flat = magnitude.reshape(-1)
    numel = flat.numel()
    if min_rank <= 0:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if min_rank >= numel:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    pivot = torch.kthvalue(flat, min_rank + 1).values
    below = int((flat < pivot).sum())
    equal = flat == pivot
    # Equal entries take ranks below, below+1, ... in position order.
    equal_rank = torch.cumsum(equal, dim=0, dtype=torch.int64).add_(below - 1)
    keep = (flat > pivot) | (equal & (equal_rank >= min_rank))
    return keep.reshape(magnitude.shape)


def magnitude_keep_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the k = ⌊d·N⌋ largest magnitudes of the whole tensor."""
    return top_magnitude_mask(delta.abs(), density)


def top_magnitude_mask(magnitude: torch.Tensor, density: float) -> torch.Tensor:
    """``magnitude_keep_mask`` given |δ| already (so a caller can take it in place)."""
    low, _ = magnitude_rank_window(magnitude.numel(), density, None)
    return rank_at_least_mask(magnitude, low)


def outlier_keep_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the ⌊γN⌋ largest and enough of the smallest to keep ⌊d·N⌋ entries."""
    return middle_magnitude_mask(delta.abs(), density, gamma)


def middle_magnitude_mask(magnitude: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """``outlier_keep_mask`` given |δ| already."""
    low, high = magnitude_rank_window(magnitude.numel(), density, gamma)
    keep = rank_at_least_mask(magnitude, low)
    if high < magnitude.numel():  # with no outliers to drop, the top entries stay
        keep &= ~rank_at_least_mask(magnitude, high)
    return keep


def random_keep_mask(uniform: torch.Tensor, keep_prob: torch.Tensor | float) -> torch.Tensor:
    """Keep an entry when its uniform draw falls below its keep probability."""
    return uniform < keep_prob


def apply_keep_mask(
    delta: torch.Tensor,
    keep: torch.Tensor,
    keep_prob: torch.Tensor | float | None,
    rescale: Rescale,
) -> torch.Tensor:
    """Zero the dropped entries of ``delta`` and rescale the survivors.

    ``Rescale.KEEP_PROB`` divides each survivor by its keep probability, so E[δ̂] = δ
    element-wise; ``Rescale.L1`` scales the whole tensor so its L1 norm equals the original's.
    """
    if rescale is Rescale.KEEP_PROB and keep_prob is not None:
        if not isinstance(keep_prob, torch.Tensor):
            # A device tensor, not a host scalar, so CUDA divides exactly as the CPU does.
            keep_prob = torch.tensor(keep_prob, dtype=delta.dtype, device=delta.device)
        return (delta / keep_prob).mul_(keep)  # multiplying by the mask beats a select
    kept = delta * keep
    if rescale is Rescale.L1:
        # float64 sums: the ratio must not depend on summation order or tensor size.
        kept_norm = float(kept.abs().sum(dtype=torch.float64))
        if kept_norm > 0:
            kept = kept.mul_(float(delta.abs().sum(dtype=torch.float64)) / kept_norm)
    return kept
