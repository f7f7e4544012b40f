"""The generalized merge pipeline for one tensor (ALGORITHMS.md, "The generalized pipeline").

    δ_t = θ_t − θ₀                      task vector of expert t
    δ̂_t = sparsify(δ_t)                 method-specific drop, with its own rescale
    u_t = w_t · δ̂_t                     weight
    s   = sign(Σ_t u_t), +1 at 0        elect (methods with sign consensus)
    a_t = [sign(u_t) == s]              agreement; exact zeros never agree
    N = Σ a_t u_t,  D = Σ a_t w_t       fuse (a_t = 1 without consensus)
    Δ = N / D (D := 1 where 0) if normalize, else N
    θ = θ₀ + λ · Δ

Experts are accumulated one at a time in a fixed order, so the result does not depend on how a
backend would reduce a stacked tensor, and only the weighted task vectors that sign election
needs are kept alive. This is the torch backend and the reference of the CPU backend
(``backends.cpu``), which must give the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from della_cli.methods.parameters import ExpertParams, GlobalParams
from della_cli.methods.randomness import Draws
from della_cli.methods.registry import MethodSpec, Sparsifier
from della_cli.methods.sparsify import (
    apply_keep_mask,
    magnitude_keep_mask,
    magprune_keep_prob,
    outlier_keep_mask,
    random_keep_mask,
)

UniformDraws = Callable[[int], "torch.Tensor | Draws"]
"""Given an expert's position in the list, its uniform draws in [0, 1) (a tensor of the
tensor's shape, or the ``Draws`` key that generates them)."""


def sparsify_delta(
    sparsifier: Sparsifier,
    delta: torch.Tensor,
    params: ExpertParams,
    global_params: GlobalParams,
    uniform: Callable[[], torch.Tensor | Draws] | None = None,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparsify one task vector. ``uniform`` gives the draws (a tensor of them, or a ``Draws``
    key); ``keep_mask`` replaces the method's own choice (for tests)."""
    density = params.density
    if sparsifier is Sparsifier.NONE or density is None or density >= 1.0:
        return delta  # d = 1 keeps everything: no rescale, no randomness
    if sparsifier is Sparsifier.MAGNITUDE:
        keep = keep_mask if keep_mask is not None else magnitude_keep_mask(delta, density)
        return delta * keep
    if sparsifier is Sparsifier.MAGNITUDE_OUTLIERS:
        gamma = params.gamma if params.gamma is not None else 0.0
        keep = keep_mask if keep_mask is not None else outlier_keep_mask(delta, density, gamma)
        return delta * keep
    drawn = None
    if keep_mask is None:
        if uniform is None:
            raise ValueError(f"the {sparsifier.value} sparsifier needs uniform draws")
        drawn = uniform()
    epsilon = params.epsilon or 0.0
    if sparsifier is Sparsifier.RANDOM:
        keep_prob: torch.Tensor | float = density
    else:
        keep_prob = magprune_keep_prob(delta, density, epsilon).to(delta.dtype)
    if keep_mask is None:
        draws = drawn.uniform(delta.shape, delta.device) if isinstance(drawn, Draws) else drawn
        keep_mask = random_keep_mask(draws, keep_prob)
    return apply_keep_mask(delta, keep_mask, keep_prob, global_params.rescale)


def elect_signs(weighted_sum: torch.Tensor) -> torch.Tensor:
    """s = sign(Σ u_t) with s = +1 where the sum is exactly zero."""
    one = torch.ones((), dtype=weighted_sum.dtype, device=weighted_sum.device)
    return torch.where(weighted_sum >= 0, one, -one)


def fuse(
    weighted: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool,
    signs: torch.Tensor | None = None,
) -> torch.Tensor:
    """N / D (or N) over the weighted task vectors; with ``signs``, only agreeing entries count."""
    numerator = torch.zeros_like(weighted[0])
    if signs is None:
        for vector in weighted:
            numerator.add_(vector)
        if not normalize:
            return numerator
        # D as the compute dtype holds it: a sum of weights too small for float32 is 0 there,
        # and dividing by it would turn zeros into NaN.
        total_weight = torch.tensor(sum(weights), dtype=numerator.dtype, device=numerator.device)
        # Divided by a device tensor: CUDA turns division by a host scalar into a multiply by
        # its reciprocal, which would differ from the CPU in the last bit.
        return numerator.div_(total_weight if total_weight != 0 else 1.0)
    denominator = torch.zeros_like(weighted[0])
    for vector, weight in zip(weighted, weights, strict=True):
        # 1.0 where the entry agrees with the elected sign, else 0.0; the products with it
        # are exact, so one fused multiply-add gives the same bits on every backend.
        agree = (torch.sign(vector) == signs).to(vector.dtype)
        numerator.addcmul_(vector, agree)
        denominator.add_(agree, alpha=weight)
    if not normalize:
        return numerator
    return numerator.div_(denominator.masked_fill_(denominator == 0, 1.0))


def merge_tensor(
    spec: MethodSpec,
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    params: Sequence[ExpertParams],
    global_params: GlobalParams,
    uniform: UniformDraws | None = None,
    keep_masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merge one tensor. Shapes: ``base`` and each of ``models`` (*shape), same floating dtype,
    which is the compute dtype of the result.

    For ``linear`` the models themselves are averaged and ``base`` is ignored; every other
    method works on task vectors against ``base``.
    """
    if not models:
        raise ValueError("merge_tensor needs at least one model")
    weights = [p.weight for p in params]
    if not spec.on_deltas:
        scaled = [model * weight for model, weight in zip(models, weights, strict=True)]
        return fuse(scaled, weights, global_params.normalize)
    if base is None:
        raise ValueError(f"{spec.name} merges task vectors and needs a base tensor")
    weighted = []
    for index, (model, expert) in enumerate(zip(models, params, strict=True)):
        draws = (lambda i=index: uniform(i)) if uniform is not None else None
        mask = keep_masks[index] if keep_masks is not None else None
        sparse = sparsify_delta(spec.sparsifier, model - base, expert, global_params, draws, mask)
        weighted.append(sparse if expert.weight == 1.0 else sparse.mul_(expert.weight))
    signs = None
    if spec.sign_consensus:
        total = torch.zeros_like(weighted[0])
        for vector in weighted:
            total.add_(vector)
        signs = elect_signs(total)
    merged_delta = fuse(weighted, weights, global_params.normalize, signs)
    return base + merged_delta.mul_(global_params.lambda_)
