"""Statistics of the random sparsifiers under the real draws (``uniform_from_key``).

All draws are seeded, so these tests are deterministic; the tolerances are several binomial
standard deviations, so a correct implementation passes for any seed and a biased one fails.
"""

from __future__ import annotations

import math

import pytest
import torch

from della_cli.methods import (
    METHODS,
    ExpertParams,
    GlobalParams,
    Sparsifier,
    merge_tensor,
    sparsify_delta,
)
from della_cli.methods.randomness import derive_key, uniform_from_key
from della_cli.methods.sparsify import as_rows, magprune_keep_prob, stable_row_ranks

SHAPE = (256, 1024)
NUMEL = SHAPE[0] * SHAPE[1]
NAME = "model.layers.3.self_attn.q_proj.weight"
Z = 5.0  # standard deviations allowed


@pytest.fixture(scope="module")
def delta() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=generator) * 0.02


def draws(seed: int, shape=SHAPE, expert: int = 0) -> torch.Tensor:
    return uniform_from_key(derive_key(seed, NAME, expert), shape)


def kept_mask(sparsifier, delta, params, seed) -> torch.Tensor:
    sparse = sparsify_delta(
        sparsifier, delta, params, GlobalParams(), uniform=lambda: draws(seed, delta.shape)
    )
    return sparse != 0


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_is_density(delta, density):
    kept = kept_mask(Sparsifier.RANDOM, delta, ExpertParams(density=density), seed=1)
    std = math.sqrt(density * (1 - density) / NUMEL)  # ≈ 1e-3 at d = 0.5
    assert abs(float(kept.double().mean()) - density) < Z * std
    # and no row or column pattern: every row keeps about d of its 1024 entries
    row_std = math.sqrt(density * (1 - density) / SHAPE[1])
    row_fraction = kept.double().mean(dim=1)
    assert (row_fraction - density).abs().max() < 6 * row_std


def test_dare_survivors_are_divided_by_density(delta):
    sparse = sparsify_delta(
        Sparsifier.RANDOM, delta, ExpertParams(density=0.3), GlobalParams(), lambda: draws(2)
    )
    kept = sparse != 0
    assert torch.equal(kept, draws(2) < 0.3)
    assert torch.equal(sparse[kept], delta[kept] / 0.3)


@pytest.mark.parametrize(("density", "epsilon"), [(0.7, 0.07), (0.5, 0.3)])
def test_magprune_kept_fraction_per_row_is_density(delta, density, epsilon):
    params = ExpertParams(density=density, epsilon=epsilon)
    kept = kept_mask(Sparsifier.MAGPRUNE, delta, params, seed=3).double()
    keep_prob = magprune_keep_prob(delta, density, epsilon).double()
    # Per row, the kept count is a sum of independent Bernoulli(k_i) with mean n·d.
    row_std = torch.sqrt((keep_prob * (1 - keep_prob)).sum(dim=1)) / SHAPE[1]
    row_fraction = kept.mean(dim=1)
    assert ((row_fraction - density).abs() < 6 * row_std).all()
    total_std = math.sqrt(float((keep_prob * (1 - keep_prob)).sum())) / NUMEL
    assert abs(float(kept.mean()) - density) < Z * total_std


def test_magprune_kept_fraction_rises_with_rank(delta):
    density, epsilon = 0.5, 0.3
    params = ExpertParams(density=density, epsilon=epsilon)
    kept = kept_mask(Sparsifier.MAGPRUNE, delta, params, seed=4).double()
    quintile = stable_row_ranks(as_rows(delta.abs())) * 5 // SHAPE[1]  # 0..4 by magnitude
    fractions = [float(kept[quintile == q].mean()) for q in range(5)]
    # Expected mean keep probability of quintile q: d − ε + 2ε·(q + 1/2)/5 (up to 1/n).
    count = NUMEL / 5
    for q, fraction in enumerate(fractions):
        expected = density - epsilon + 2 * epsilon * (q + 0.5) / 5
        std = math.sqrt(expected * (1 - expected) / count)
        assert abs(fraction - expected) < Z * std + 1e-3, (q, fraction, expected)
    assert fractions == sorted(fractions)
    assert fractions[4] - fractions[0] > 0.4  # 0.74 vs 0.26


def test_magprune_with_epsilon_zero_keeps_uniformly_over_ranks(delta):
    params = ExpertParams(density=0.5, epsilon=0.0)
    kept = kept_mask(Sparsifier.MAGPRUNE, delta, params, seed=5).double()
    quintile = stable_row_ranks(as_rows(delta.abs())) * 5 // SHAPE[1]
    std = math.sqrt(0.25 / (NUMEL / 5))
    for q in range(5):
        assert abs(float(kept[quintile == q].mean()) - 0.5) < Z * std


@pytest.mark.parametrize(
    ("sparsifier", "params"),
    [
        (Sparsifier.RANDOM, ExpertParams(density=0.6)),
        (Sparsifier.MAGPRUNE, ExpertParams(density=0.6, epsilon=0.3)),
    ],
    ids=["dare", "magprune"],
)
def test_rescaled_delta_is_unbiased(sparsifier, params):
    # E[δ̂] = δ element-wise under the keep_prob rescale: average over many keys.
    generator = torch.Generator().manual_seed(7)
    delta = torch.randn(8, 64, generator=generator, dtype=torch.float64)
    trials = 2000
    total = torch.zeros_like(delta)
    for seed in range(trials):
        total += sparsify_delta(
            sparsifier,
            delta,
            params,
            GlobalParams(),
            uniform=lambda seed=seed: draws(seed, delta.shape),
        )
    mean = total / trials
    if sparsifier is Sparsifier.RANDOM:
        keep_prob = torch.full_like(delta, params.density)
    else:
        keep_prob = magprune_keep_prob(delta, params.density, params.epsilon).double()
    # Var[δ̂_i] = δ_i² (1 − k_i) / k_i
    std = delta.abs() * torch.sqrt((1 - keep_prob) / keep_prob / trials)
    z = (mean - delta) / std
    assert z.abs().max() < 5.5  # 512 entries: a 5.5σ miss has probability ~2e-5
    assert abs(float(z.mean())) < Z / math.sqrt(z.numel())  # no overall bias
    # without rescale the mean would be k·δ, far from δ
    assert float(((mean - delta).abs() / delta.abs()).median()) < 0.05


def test_della_linear_one_expert_keeps_delta_over_keep_prob_exactly(delta):
    density, epsilon = 0.7, 0.07
    base = torch.zeros(SHAPE)
    uniform = draws(9)
    merged = merge_one(delta, base, density, epsilon, uniform)
    keep_prob = magprune_keep_prob(delta, density, epsilon)
    kept = merged != 0
    assert torch.equal(kept, uniform < keep_prob)
    assert torch.equal(merged[kept], delta[kept] / keep_prob[kept])
    assert 0.69 < float(kept.float().mean()) < 0.71


def test_della_linear_one_expert_on_a_base(delta):
    base = torch.full(SHAPE, 0.5)
    uniform = draws(9)
    model = base + delta
    merged = merge_one(model, base, 0.7, 0.07, uniform)
    task_vector = model - base  # ranks come from the delta as computed, rounding included
    keep_prob = magprune_keep_prob(task_vector, 0.7, 0.07)
    kept = uniform < keep_prob
    expected = torch.where(kept, task_vector / keep_prob, 0.0) + base
    assert torch.equal(merged, expected)


def merge_one(model, base, density, epsilon, uniform) -> torch.Tensor:
    """della_linear on one expert (w = 1, λ = 1, no normalize), checking the draws it asks for."""
    calls = []

    def expert_draws(index: int) -> torch.Tensor:
        calls.append(index)
        return uniform

    merged = merge_tensor(
        METHODS["della_linear"],
        base,
        [model],
        [ExpertParams(density=density, epsilon=epsilon)],
        GlobalParams(normalize=False),
        uniform=expert_draws,
    )
    assert calls == [0]
    return merged


def test_experts_draw_independent_masks(delta):
    # Two experts with the same delta and their own keys: masks overlap like independent coins.
    first = draws(0, expert=0) < 0.5
    second = draws(0, expert=1) < 0.5
    overlap = float((first & second).double().mean())
    assert abs(overlap - 0.25) < Z * math.sqrt(0.25 * 0.75 / NUMEL)
