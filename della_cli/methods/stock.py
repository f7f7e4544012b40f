"""Model Stock (Jang et al. 2024, arXiv:2403.19522; ALGORITHMS.md, section S6).

The fine-tuned models' task vectors δᵢ = θᵢ − θ₀ meet at an average angle; Model Stock moves
from the base toward the models' average by t = N·cos θ / (1 + (N − 1)·cos θ), where cos θ is
the mean pairwise cosine of the N ≥ 2 task vectors, over the whole tensor or, with
``filter_wise``, per row (one output filter; a 1-D tensor is one row).

Streaming: the whole-tensor cosine needs the Gram matrix of the task vectors (N(N+1)/2 sums),
accumulated over row blocks by ``gram_statistics``; the row-wise one needs no first pass, since
a row block holds whole rows. Sums of products are those of ``row_sums``. Inputs are widened
to float32 (float64 when one is float64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from della_cli.methods.block_sums import widen
from della_cli.methods.row_sums import row_dots
from della_cli.methods.spherical_means import gram_statistics


def row_gram(models: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Gram matrices of the task vectors per row (last dimension): (*rows, N, N) float64;
    a 1-D tensor is one row (shape (N, N))."""
    *models, base = widen([*models, base])
    length = base.shape[-1] if base.dim() else 1
    deltas = [(m - base).reshape(base.numel() // max(length, 1), length) for m in models]
    n = len(deltas)
    entries = [[row_dots(deltas[i], deltas[j]) for j in range(n)] for i in range(n)]
    gram = torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)
    return gram.reshape(*base.shape[:-1], n, n)


def model_stock_t(gram: torch.Tensor) -> torch.Tensor:
    """t (…) from Gram matrices (…, N, N): cosᵢⱼ = Gᵢⱼ / max(‖δᵢ‖‖δⱼ‖, 1e-6) clamped to
    [−1, 1], cos = the mean over pairs i < j, t = N·cos / (1 + (N−1)·cos), and t = 0 where
    that denominator is below 1e-6 in magnitude (keep the base)."""
    n = gram.shape[-1]
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 models besides the base, got {n}.")
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cosines = [
        (gram[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
        for i, j in pairs
    ]
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), n * cos / safe)


def model_stock_apply(
    t: torch.Tensor, models: Sequence[torch.Tensor], base: torch.Tensor, filter_wise: bool
) -> torch.Tensor:
    """One block: t·mean(models) + (1 − t)·base, t a scalar or one value per row."""
    *models, base = widen([*models, base])
    if filter_wise and base.dim() > 1:
        t = t.unsqueeze(-1)
    t = t.to(base.dtype)
    average = sum(models) / len(models)
    return t * average + (1 - t) * base


def model_stock(
    models: Sequence[torch.Tensor], base: torch.Tensor, filter_wise: bool = False
) -> torch.Tensor:
    """Model Stock of N ≥ 2 models ``(*shape)`` around ``base`` ``(*shape)``."""
    gram = row_gram(models, base) if filter_wise else gram_statistics(models, base)
    return model_stock_apply(model_stock_t(gram), models, base, filter_wise)


__all__ = ["model_stock", "model_stock_apply", "model_stock_t", "row_gram"]
