"""Methods that choose entries (ALGORITHMS.md, sections S7-S10).

- sce: select the task-vector entries of largest variance across models, elect signs by the
  sum, fuse with per-model weights ∝ the mean square of each masked task vector (FuseChat,
  Wan et al. 2024, arXiv:2408.07990).
- ram / ramplus_tl: entries changed by one model take its change, entries changed by several
  the mean of their changes; ramplus_tl boosts a model's unique changes by its overlap ratio
  (Reinforced Agent Merging, arXiv:2601.13572).
- arcee_fusion: keep a model's change where its importance |Δ|·KL(row) is an outlier above
  median + 1.5·IQR of the tensor's importances (arcee.ai, "Arcee Fusion").

Per-entry scores (variance, importance) are recomputed in each pass from the inputs, and the
whole-tensor selections come from ``order_statistics`` (exact, ties by position). Inputs are
widened to float32 (float64 when one is float64); results come back in that dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch

from della_cli.methods.block_sums import whole_sum, widen
from della_cli.methods.counts import fraction_count
from della_cli.methods.order_statistics import order_statistics, top_rank_mask


def task_vectors(models: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """δᵢ = θᵢ − θ₀ in the compute dtype."""
    *models, base = widen([*models, base])
    return [m - base for m in models]


# ---------------------------------------------------------------- sce

# None: keep every entry; "none": keep no entry; else (selected value, ties to skip).
Selection = None | Literal["none"] | tuple[torch.Tensor, int]


def sce_scores(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-entry population variance of the task vectors across models, ``(*shape)``.

    The bits of ``torch.var(torch.stack(deltas), dim=0, unbiased=False)``, which mergekit
    computes, so that the selection at the k-th variance is the same: torch's CPU kernel runs
    Welford's update per entry in float64 and rounds once, which these elementwise float64
    steps repeat (checked equal on random inputs in the tests). torch's own reduction over
    the stacked models' dim 0 is not vectorized: 140 ns an entry for three models here,
    against 20 for these steps."""
    dtype = deltas[0].dtype
    mean = m2 = torch.zeros(deltas[0].shape, dtype=torch.float64, device=deltas[0].device)
    for count, delta in enumerate(deltas, start=1):
        value = delta.double()
        step = value - mean
        mean = mean + step / count
        m2 = m2 + step * (value - mean)
    return (m2 / len(deltas)).to(dtype)


def sce_keep_count(select_topk: float, nonzero: int) -> int:
    """k = ⌊select_topk · (number of entries of nonzero variance)⌋ on the decimal written."""
    return fraction_count(select_topk, nonzero)


def sce_selection(
    deltas_blocks: Callable[[], Iterable[Sequence[torch.Tensor]]], select_topk: float
) -> Selection:
    """From a callable yielding the task-vector blocks (each a list of n tensors), the
    selection state ``(value, ties_to_skip)`` for ``top_rank_mask``, or None to keep every
    entry (select_topk ≥ 1) or ``"none"`` to keep no entry. Passes: the radix passes of
    ``order_statistics``, whose first also counts the nonzero variances and N."""
    if select_topk >= 1:
        return None
    if select_topk <= 0:
        return "none"

    def rank(numel: int, nonzero: int) -> list[int]:
        k = sce_keep_count(select_topk, nonzero)
        return [numel - k] if k > 0 else []

    found, counts = order_statistics(lambda: (sce_scores(b) for b in deltas_blocks()), rank)
    if not found:
        return "none"
    value, below = found[0]
    return value, rank(*counts)[0] - below


def sce_block_mask(
    selection: Selection, deltas: Sequence[torch.Tensor], ties_before: int
) -> tuple[torch.Tensor, int]:
    """Keep mask ``(*shape)`` of one block and the number of ties it holds."""
    scores = sce_scores(deltas)
    if selection is None:
        return torch.ones_like(scores, dtype=torch.bool), 0
    if isinstance(selection, str):
        return torch.zeros_like(scores, dtype=torch.bool), 0
    value, skip = selection
    ties = int((scores == value).sum())
    return top_rank_mask(scores, value, skip, ties_before), ties


def sce_statistics(deltas: Sequence[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Partial sums Σ (keep·δᵢ)² (n,) float64 of one block; they add over blocks."""
    return torch.stack([whole_sum((d * keep).square()) for d in deltas])


def sce_weights(square_sums: torch.Tensor, numel: int) -> torch.Tensor:
    """Model weights (n,): mean squares normalized to sum 1; uniform when all are 0."""
    mean_squares = square_sums / max(numel, 1)
    total = mean_squares.sum()
    if total == 0:
        return torch.full_like(mean_squares, 1.0 / len(mean_squares))
    return mean_squares / total


def sce_apply(
    weights: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    keep: torch.Tensor,
    base: torch.Tensor,
) -> torch.Tensor:
    """One block: elect the sign of Σ masked δ (+ where ≥ 0), average the agreeing masked δ
    with the model weights, add to the base; entries where no model agrees keep the base."""
    masked = torch.stack([d * keep for d in deltas])
    majority = torch.where(masked.sum(dim=0) >= 0, 1.0, -1.0).to(masked.dtype)
    agree = masked.sign() == majority
    w = weights.to(masked.dtype).reshape(-1, *([1] * (masked.dim() - 1)))
    erased = w * agree
    numerator = (masked * erased).sum(dim=0)
    denominator = erased.sum(dim=0)
    # 0 only where no model agrees (then 0/0 → 0); a NaN weight stays NaN
    none_agree = denominator == 0
    safe = torch.where(none_agree, torch.ones_like(denominator), denominator)
    fused = torch.where(none_agree, torch.zeros_like(numerator), numerator / safe)
    return widen([base])[0].to(fused.dtype) + fused


def sce(
    models: Sequence[torch.Tensor], base: torch.Tensor, select_topk: float = 1.0
) -> torch.Tensor:
    """SCE of n ≥ 1 models ``(*shape)`` around ``base`` ``(*shape)``; no model gives the base."""
    if not models:
        return widen([base])[0]
    deltas = task_vectors(models, base)
    selection = sce_selection(lambda: [deltas], select_topk)
    keep, _ = sce_block_mask(selection, deltas, 0)
    weights = sce_weights(sce_statistics(deltas, keep), base.numel())
    return sce_apply(weights, deltas, keep, base)


# ---------------------------------------------------------------- ram / ramplus_tl


def _contributions(
    deltas: Sequence[torch.Tensor], epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    contributes = torch.stack([d.abs() > epsilon for d in deltas])
    counts = contributes.sum(dim=0)
    return contributes, counts


def ram(models: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM ``(*shape)``: an entry changed (|δ| > ε) by one model takes that change, by several
    the mean of their changes, by none the base. Entry-local: one pass."""
    return ramplus_tl_apply(None, models, base, epsilon=epsilon)


def ramplus_tl_statistics(
    models: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float = 1e-5
) -> torch.Tensor:
    """Partial counts (n, 2) int64 of one block: per model, its contributing entries where
    several models contribute (shared) and where it alone does (unique)."""
    contributes, counts = _contributions(task_vectors(models, base), epsilon)
    shared = (contributes & (counts > 1)).flatten(1).sum(dim=1)
    unique = (contributes & (counts == 1)).flatten(1).sum(dim=1)
    return torch.stack([shared, unique], dim=1)


def ramplus_tl_lambdas(
    counts: torch.Tensor, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
) -> torch.Tensor:
    """λᵢ = 1 + r·clamp(ρᵢ, 0, α), ρᵢ = sharedᵢ / max(uniqueᵢ, ε) (n,) float64."""
    rho = counts[:, 0].double() / counts[:, 1].double().clamp(min=epsilon)
    return 1 + r * rho.clamp(min=0, max=alpha)


def ramplus_tl_apply(
    lambdas: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    base: torch.Tensor,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """One block: unique changes × λᵢ (1 for plain RAM, ``lambdas`` None), shared ones averaged.

    The counts are summed in the compute dtype (small integers, exact), and the masks each
    model's terms need are made once rather than per model: the same values as counting in
    int64, without its promotions (32 → 23 ns an entry for three models)."""
    deltas = task_vectors(models, base)
    dtype = deltas[0].dtype
    contributes = [delta.abs() > epsilon for delta in deltas]
    counts = contributes[0].to(dtype)
    for mask in contributes[1:]:
        counts = counts + mask
    alone, several, divisor = counts == 1, counts > 1, counts.clamp(min=1)
    merged = torch.zeros_like(deltas[0])
    for i, delta in enumerate(deltas):
        changed = delta * contributes[i]
        unique = changed * alone
        if lambdas is not None:
            unique = unique * lambdas[i].to(dtype)
        merged += unique + changed * several / divisor
    return widen([base])[0].to(dtype) + merged


def ramplus_tl(
    models: Sequence[torch.Tensor],
    base: torch.Tensor,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM+ (tensor-local) ``(*shape)`` of n models around ``base``."""
    if not models:
        return widen([base])[0]
    lambdas = ramplus_tl_lambdas(ramplus_tl_statistics(models, base, epsilon), r, alpha, epsilon)
    return ramplus_tl_apply(lambdas, models, base, epsilon)


# ---------------------------------------------------------------- arcee_fusion

QUANTILES = (0.25, 0.5, 0.75)


def arcee_fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|θ − θ₀| × KL(softmax(θ row) + 1e-8 ‖ softmax(θ₀ row) + 1e-8), rows along the last
    dimension (a 1-D tensor is one row): ``(*shape)``. Row-local, so any row block works."""
    base, other = widen([base, other])
    # in place on the fresh temporaries: the same float32 operations (p·log(p/q) as
    # log(p/q)·p, a commuted product), a third fewer allocations; the CPU backend makes
    # every importance with this (issue 17: 12-28% of its time per 64K-entry chunk)
    p = torch.softmax(other, dim=-1).add_(1e-8)
    q = torch.softmax(base, dim=-1).add_(1e-8)
    kl = torch.div(p, q).log_().mul_(p).sum(dim=-1, keepdim=True)
    return torch.sub(other, base).abs_().mul_(kl)


def quantile_ranks(numel: int) -> tuple[int, int, int]:
    """The ascending ranks ⌊q·(N−1)⌋ of the quartiles q = 0.25, 0.5, 0.75."""
    return ((numel - 1) // 4, (numel - 1) // 2, 3 * (numel - 1) // 4)


def arcee_fusion_threshold(
    importance_blocks: Callable[[], Iterable[torch.Tensor]],
) -> torch.Tensor:
    """median + 1.5·(q3 − q1) of all importances, exact: the three quartiles share the radix
    passes (two over the blocks for float32 importances)."""
    found, _ = order_statistics(importance_blocks, lambda numel, _: quantile_ranks(numel))
    (q1, _), (median, _), (q3, _) = found
    return median + 1.5 * (q3 - q1)


def arcee_fusion_apply(
    threshold: torch.Tensor, base: torch.Tensor, other: torch.Tensor
) -> torch.Tensor:
    """One block: θ₀ + (θ − θ₀)·[importance ≥ threshold]."""
    keep = arcee_fusion_importance(base, other) >= threshold
    base, other = widen([base, other])
    return base + (other - base) * keep


def arcee_fusion(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion ``(*shape)`` of one model into ``base``; an empty tensor gives the base."""
    if base.numel() == 0:
        return widen([base])[0]
    importance = arcee_fusion_importance(base, other)
    return arcee_fusion_apply(arcee_fusion_threshold(lambda: [importance]), base, other)


__all__ = [
    "QUANTILES",
    "arcee_fusion",
    "arcee_fusion_apply",
    "arcee_fusion_importance",
    "arcee_fusion_threshold",
    "quantile_ranks",
    "ram",
    "ramplus_tl",
    "ramplus_tl_apply",
    "ramplus_tl_lambdas",
    "ramplus_tl_statistics",
    "sce",
    "sce_apply",
    "sce_block_mask",
    "sce_keep_count",
    "sce_scores",
    "sce_selection",
    "sce_statistics",
    "sce_weights",
    "task_vectors",
]
