"""Interpolation methods on the sphere and entry by entry (ALGORITHMS.md, sections S1-S5).

- slerp: spherical linear interpolation of two whole tensors (Shoemake 1985, "Animating
  rotation with quaternion curves"), lerp where they are nearly (anti)parallel.
- nuslerp: slerp of two models, or of two task vectors around a base, over the whole tensor,
  its rows, or its columns, with t = w₂ / (w₁ + w₂).
- multislerp: barycentric interpolation of n directions (goddard.blog, "multislerp").
- karcher: the Riemannian (Karcher) mean of n directions on the unit sphere (Karcher 1977).
- nearswap: move the base toward the other model by at most t per entry.

Every method that needs whole-tensor statistics is split in two passes, so that a streaming
engine can run them over row blocks (slices along dim 0): ``*_statistics`` maps a block to
partial sums in float64 that add up over blocks (``sum(stats(b) for b in blocks)``), and
``*_apply`` merges one block from the summed statistics. The whole-tensor function composes
the two. Inputs are widened to float32 (float64 when an input is float64) and results are
returned in that compute dtype; the caller casts once to the output dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from della_cli.methods.row_sums import as_rows, fold_rows, row_dots

# nuslerp lerps vectors with cos Ω below −ANTIPARALLEL_COS, the bound slerp uses on both sides.
ANTIPARALLEL_COS = 0.9995

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
    theta = torch.acos(torch.where(linear, torch.zeros_like(cos), cos))
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
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
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


# ---------------------------------------------------------------- Gram matrices


def gram_rows(tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """Gram matrices G[r, i, j] = Σ xᵢxⱼ per row r (a slice along dim 0; a 1-D tensor is one
    row): (rows, n, n) float64 of the inputs (of their task vectors when ``base`` is given)."""
    vectors = widen([*tensors] if base is None else [*tensors, base])
    if base is not None:
        vectors = [v - vectors[-1] for v in vectors[:-1]]
    vectors = [as_rows(v) for v in vectors]
    n = len(vectors)
    gram = torch.zeros(vectors[0].shape[0], n, n, dtype=torch.float64, device=vectors[0].device)
    for i in range(n):
        for j in range(i, n):
            gram[:, i, j] = gram[:, j, i] = row_dots(vectors[i], vectors[j])
    return gram


def gram_statistics(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gram matrix G[i, j] = Σ xᵢxⱼ (n, n) in float64 of a block of the inputs (of their task
    vectors when ``base`` is given), its rows folded into ``total`` (the blocks before it)."""
    rows = gram_rows(tensors, base)
    start = torch.zeros(rows.shape[1:], dtype=torch.float64) if total is None else total
    return fold_rows(start, rows)


def combine(
    coefficients: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ cᵢ xᵢ of one block (of task vectors, plus the base, when ``base`` is given)."""
    vectors = widen([*tensors] if base is None else [*tensors, base])
    dtype = vectors[0].dtype
    if base is not None:
        *vectors, base_w = vectors
        vectors = [v - base_w for v in vectors]
    result = torch.zeros_like(vectors[0])
    for c, v in zip(coefficients.tolist(), vectors, strict=True):
        result += torch.tensor(c, dtype=dtype) * v
    return result + base_w if base is not None else result


# ---------------------------------------------------------------- multislerp


def multislerp_coefficients(
    gram: torch.Tensor, weights: Sequence[float], normalize_weights: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Coefficients c (n,) with result = Σ cᵢ xᵢ, from the Gram matrix of the n vectors.

    With uᵢ = xᵢ/(‖xᵢ‖ + eps) and m = Σ wᵢuᵢ, the direction is m/‖m‖ and the length Σ wᵢ‖xᵢ‖.
    The tangent-space step of the reference vanishes: Σ wᵢ(uᵢ − (uᵢ·m̂)m̂) = m − ‖m‖m̂ = 0.
    Where ‖m‖ < eps (the directions cancel) the result is the weighted sum Σ wᵢxᵢ."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    if normalize_weights:
        if w.sum() == 0:
            raise ValueError("multislerp weights sum to 0; they cannot be normalized.")
        w = w / w.sum()
    norms = gram.diagonal().clamp(min=0).sqrt()
    scaled = w / (norms + eps)  # m = Σ scaledᵢ xᵢ
    mean_norm = (scaled @ gram @ scaled).clamp(min=0).sqrt()
    if mean_norm < eps:
        return w
    return scaled / mean_norm * (w * norms).sum()


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Multislerp of n ≥ 1 models ``(*shape)``, around ``base`` if given; one model is itself."""
    if len(tensors) == 1:
        return widen(tensors)[0]
    gram = gram_statistics(tensors, base)
    coefficients = multislerp_coefficients(gram, weights, normalize_weights, eps)
    return combine(coefficients, tensors, base)


# ---------------------------------------------------------------- karcher


def karcher_coefficients(gram: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Coefficients c (n,) with result = Σ cᵢ xᵢ, from the Gram matrix of the n inputs.

    The Karcher mean of the unit vectors uᵢ = xᵢ/‖xᵢ‖ (uniform weights, inputs of norm ≤ tol
    left out) stays in their span, so the Riemannian gradient iteration runs on coefficients
    over the uᵢ, with u·v read from the Gram matrix: no pass over the tensors per iteration.
    The result is that mean scaled by the mean norm of all n inputs."""
    n = gram.shape[0]
    norms = gram.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(n) if norms[i] > tol]
    scale = norms.sum() / n
    coefficients = torch.zeros(n, dtype=torch.float64)
    if not valid:
        return coefficients
    idx = torch.tensor(valid)
    units = gram[idx][:, idx] / torch.outer(norms[idx], norms[idx])
    alpha = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)

    def norm(c: torch.Tensor) -> torch.Tensor:
        return (c @ units @ c).clamp(min=0).sqrt()

    mean = alpha.clone()
    mean_norm = norm(mean)
    mean = torch.eye(len(valid), dtype=torch.float64)[0] if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)
        tangent = torch.zeros_like(mean)
        for i in range(len(valid)):
            theta = torch.acos(dots[i])
            if theta < tol:
                continue
            step = -dots[i] * mean
            step[i] += 1.0
            tangent += alpha[i] * theta / torch.sin(theta) * step
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * tangent / tangent_norm
        unit_norm = norm(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    coefficients[idx] = mean / norms[idx] * scale
    return coefficients


def karcher(tensors: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Karcher mean of n ≥ 1 inputs ``(*shape)`` (every input, a base included, counts once)."""
    if len(tensors) == 1:
        return widen(tensors)[0]
    coefficients = karcher_coefficients(gram_statistics(tensors), max_iter, tol)
    return combine(coefficients, tensors)


# ---------------------------------------------------------------- nearswap


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """Per entry w = clamp(t / max(|base − other|, 1e-6), 0, 1), result w·other + (1−w)·base:
    entries closer than t take ``other``, the rest move toward it by t. One pass."""
    base, other = widen([base, other])
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return weight * other + (1 - weight) * base


__all__ = [
    "COLUMNS",
    "ROWS",
    "WHOLE",
    "combine",
    "compute_dtype",
    "gram_rows",
    "gram_statistics",
    "karcher",
    "karcher_coefficients",
    "multislerp",
    "multislerp_coefficients",
    "nearswap",
    "nuslerp",
    "nuslerp_apply",
    "nuslerp_layout",
    "nuslerp_statistics",
    "nuslerp_t",
    "pair_rows",
    "pair_sums",
    "slerp",
    "slerp_apply",
    "slerp_coefficients",
    "slerp_statistics",
    "whole_sum",
    "widen",
]
