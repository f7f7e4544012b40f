"""Interpolations of two tensors on the sphere (ALGORITHMS.md, sections S1-S2).

- slerp: spherical linear interpolation of two whole tensors (Shoemake 1985, "Animating
  rotation with quaternion curves"), lerp where they are nearly (anti)parallel.
- nuslerp: slerp of two models, or of two task vectors around a base, over the whole tensor,
  its rows, or its columns, with t = w₂ / (w₁ + w₂).

Both need whole-tensor statistics, so each is split in two passes that a streaming engine runs
over row blocks (slices along dim 0): ``*_statistics`` maps a block to partial sums in float64
that add up over blocks (``block_sums``), and ``*_apply`` merges one block from the summed
statistics. The whole-tensor function composes the two. Results are in the compute dtype
(``block_sums.compute_dtype``); the caller casts once to the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from della_cli.methods.block_sums import COLUMNS, ROWS, WHOLE, angle_of, pair_sums, widen

# nuslerp lerps vectors with cos Ω below −ANTIPARALLEL_COS, the bound slerp uses on both sides.
ANTIPARALLEL_COS = 0.9995


# ---------------------------------------------------------------- slerp


def slerp_statistics(
    base: torch.Tensor, other: torch.Tensor, total: torch.Tensor | None = None
) -> torch.Tensor:
    """Sums [Σb², Σo², Σbo] (3,) of a block of ``base`` and ``other`` (same shape), folded
    into ``total`` (the sums of the blocks before it)."""
    return pair_sums(base, other, WHOLE, total)


def slerp_coefficients(
    stats: torch.Tensor, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_base, c_other) in float64 from summed statistics (..., 3): the cosine of the two
    tensors, lerp coefficients where |cos| > ``dot_threshold``, else sin((1−t)θ)/sin θ and
    sin(tθ)/sin θ. A norm ≤ ``eps`` is taken as 1, so a zero tensor has cosine 0 (θ = π/2)."""
    norm_a = stats[..., 0].sqrt()
    norm_b = stats[..., 1].sqrt()
    norm_a = torch.where(norm_a > eps, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > eps, norm_b, torch.ones_like(norm_b))
    cos = (stats[..., 2] / (norm_a * norm_b)).clamp(-1.0, 1.0)
    linear = cos.abs() > dot_threshold
    theta = angle_of(torch.where(linear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(linear, torch.ones_like(theta), torch.sin(theta))
    coef_a = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    return coef_a, coef_b


def slerp_apply(
    stats: torch.Tensor, base: torch.Tensor, other: torch.Tensor, t: float
) -> torch.Tensor:
    """One block of the slerp result from the whole tensor's summed statistics (3,)."""
    base, other = widen([base, other])
    coef_a, coef_b = slerp_coefficients(stats, t)
    return coef_a.to(base.dtype) * base + coef_b.to(base.dtype) * other


def slerp(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """Slerp from ``base`` (t = 0) to ``other`` (t = 1), both of one shape ``(*shape)``."""
    return slerp_apply(slerp_statistics(base, other), base, other, t)


# ---------------------------------------------------------------- nuslerp


def nuslerp_layout(flatten: bool, row_wise: bool) -> str:
    """The vectors nuslerp interpolates: the whole tensor (``nuslerp_flatten``, the default),
    else rows (last dimension) or, with ``nuslerp_row_wise``, columns (dim 0)."""
    if flatten:
        return WHOLE
    return COLUMNS if row_wise else ROWS


def nuslerp_t(weights: Sequence[float]) -> float:
    """t = w₂ / (w₁ + w₂); 0.5 where |w₁ + w₂| < 1e-6."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp_statistics(
    first: torch.Tensor,
    second: torch.Tensor,
    base: torch.Tensor | None = None,
    layout: str = WHOLE,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sums [Σv₀², Σv₁², Σv₀v₁] of the two vectors (task vectors when ``base`` is given):
    (3,) folded into ``total``, or partial sums ``(*shape[1:], 3)`` for columns (added over
    blocks). Rows need no first pass."""
    v0, v1 = _task_pair(first, second, base)
    if layout == COLUMNS and total is not None:
        return total + pair_sums(v0, v1, layout)
    return pair_sums(v0, v1, layout, total)


def _task_pair(
    first: torch.Tensor, second: torch.Tensor, base: torch.Tensor | None
) -> list[torch.Tensor]:
    if base is None:
        return widen([first, second])
    first, second, base = widen([first, second, base])
    return first - base, second - base


def nuslerp_apply(
    stats: torch.Tensor | None,
    first: torch.Tensor,
    second: torch.Tensor,
    t: float,
    base: torch.Tensor | None = None,
    layout: str = WHOLE,
) -> torch.Tensor:
    """One block of the nuslerp result. ``stats`` is the summed statistics for ``WHOLE`` and
    ``COLUMNS``; for ``ROWS`` it is None and each row's sums come from the block itself."""
    v0, v1 = _task_pair(first, second, base)
    if layout == ROWS or stats is None:
        stats = pair_sums(v0, v1, ROWS)
    norm0 = stats[..., 0].sqrt().clamp(min=1e-7)
    norm1 = stats[..., 1].sqrt().clamp(min=1e-7)
    cos = (stats[..., 2] / (norm0 * norm1)).clamp(-1.0, 1.0)
    # mergekit lerps only exactly colinear vectors; near-antiparallel ones of unequal norms
    # would be scaled by up to 1/sin Ω, so they are lerped as in slerp (ALGORITHMS.md S2).
    colinear = ((1 - cos.square()) <= 1e-16) | (cos < -ANTIPARALLEL_COS)
    theta = angle_of(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    coef0 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    coef1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    if layout == ROWS and v0.dim() > 1:
        coef0, coef1 = coef0.unsqueeze(-1), coef1.unsqueeze(-1)
    merged = coef0.to(v0.dtype) * v0 + coef1.to(v0.dtype) * v1
    if base is not None:
        merged = merged + base.to(merged.dtype)
    return merged


def nuslerp(
    first: torch.Tensor,
    second: torch.Tensor,
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    flatten: bool = True,
    row_wise: bool = False,
) -> torch.Tensor:
    """Nuslerp of two models ``(*shape)`` with weights (w₁, w₂), around ``base`` if given."""
    layout = nuslerp_layout(flatten, row_wise)
    stats = None if layout == ROWS else nuslerp_statistics(first, second, base, layout)
    return nuslerp_apply(stats, first, second, nuslerp_t(weights), base, layout)


__all__ = [
    "ANTIPARALLEL_COS",
    "nuslerp",
    "nuslerp_apply",
    "nuslerp_layout",
    "nuslerp_statistics",
    "nuslerp_t",
    "slerp",
    "slerp_apply",
    "slerp_coefficients",
    "slerp_statistics",
]
