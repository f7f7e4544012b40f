"""Combinations of n tensors read from their Gram matrix (ALGORITHMS.md, sections S3-S4).

- multislerp: barycentric interpolation of n directions (goddard.blog, "multislerp").
- karcher: the Riemannian (Karcher) mean of n directions on the unit sphere (Karcher 1977).

Both are Σ cᵢ xᵢ with coefficients computed from the n × n Gram matrix of the inputs (of their
task vectors around a base): a statistics pass over the row blocks (``gram_statistics``, float64
sums that add up over blocks, ``block_sums``), the coefficients, then a merge pass
(``combine``). Results are in the compute dtype (``block_sums.compute_dtype``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from della_cli.methods.block_sums import angle_of, widen
from della_cli.methods.row_sums import as_rows, fold_rows, row_dots

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
            theta = angle_of(dots[i])
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


__all__ = [
    "combine",
    "gram_rows",
    "gram_statistics",
    "karcher",
    "karcher_coefficients",
    "multislerp",
    "multislerp_coefficients",
]
