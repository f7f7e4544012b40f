"""The compiled CPU kernel must give exactly the bytes of the torch reference path."""

from __future__ import annotations

import pytest
import torch

from della_cli.methods import (
    ExpertParams,
    GlobalParams,
    Rescale,
    Sparsifier,
    cpu_kernels,
    sparsify_delta,
)
from della_cli.methods.randomness import Draws, derive_key

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="numba is not installed")


def awkward_delta(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16-derived deltas (many equal magnitudes) with zeros, negative zeros and long ties."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator).bfloat16().float()
    expert = (base + 0.01 * torch.randn(shape, generator=generator)).bfloat16().float()
    delta = expert - base
    flat = delta.view(-1)
    flat[::13] = 0.0
    flat[5::17] = -0.0
    flat[7::19] = flat[min(7, flat.numel() - 1)]
    return delta


def both_paths(sparsifier, delta, params, rescale, draws):
    global_params = GlobalParams(rescale=rescale)
    fused = sparsify_delta(sparsifier, delta, params, global_params, lambda: draws)
    reference = sparsify_delta(
        sparsifier, delta, params, global_params, lambda: draws.uniform(delta.shape)
    )
    return fused, reference


CASES = [
    ((64, 2816), 0),
    ((300, 7), 0),
    ((3, 5, 40), 12_345),  # viewed as (3, 200)
    ((1, 2), 0),
    ((2, 3000), 2**32 - 4000),  # flat indices cross 2**32
    ((257,), 2**31 - 100),  # one row; indices cross 2**31
]


@pytest.mark.parametrize("rescale", [Rescale.KEEP_PROB, Rescale.NONE])
@pytest.mark.parametrize(("shape", "start"), CASES)
@pytest.mark.parametrize("sparsifier", [Sparsifier.MAGPRUNE, Sparsifier.RANDOM])
def test_fused_kernel_matches_the_torch_reference_bit_for_bit(sparsifier, shape, start, rescale):
    delta = awkward_delta(shape, seed=len(shape) + shape[0])
    params = ExpertParams(density=0.7, epsilon=0.07)
    draws = Draws(derive_key(7, "w", 1), start)
    fused, reference = both_paths(sparsifier, delta, params, rescale, draws)
    # Compare bit patterns: -0.0 against 0.0 and NaN payloads count too.
    assert torch.equal(fused.view(torch.int32), reference.view(torch.int32))
    if delta.numel() >= 1000:  # a real drop happened on this input
        kept = int((reference != 0).sum()) / int((delta != 0).sum())
        assert 0.6 < kept < 0.8


@pytest.mark.parametrize("epsilon", [0.0, 0.29])
def test_fused_kernel_matches_at_the_window_edges(epsilon):
    delta = awkward_delta((32, 512), seed=3)
    params = ExpertParams(density=0.7, epsilon=epsilon)
    fused, reference = both_paths(
        Sparsifier.MAGPRUNE, delta, params, Rescale.KEEP_PROB, Draws(99, 0)
    )
    assert torch.equal(fused.view(torch.int32), reference.view(torch.int32))


def test_non_finite_inputs_give_the_same_bits():
    delta = awkward_delta((8, 256), seed=4)
    delta[0, 0], delta[1, 1], delta[2, 2] = float("nan"), float("inf"), float("-inf")
    fused, reference = both_paths(
        Sparsifier.MAGPRUNE,
        delta,
        ExpertParams(density=0.6, epsilon=0.1),
        Rescale.KEEP_PROB,
        Draws(5, 0),
    )
    assert torch.equal(fused.view(torch.int32), reference.view(torch.int32))


@pytest.mark.parametrize("size", [50, 1000, 2_000_003])
def test_radix_selection_matches_the_torch_reference(size, monkeypatch):
    from della_cli.methods import sparsify

    generator = torch.Generator().manual_seed(size)
    magnitude = (
        torch.randn(size, generator=generator).bfloat16().float()
        - torch.randn(size, generator=generator).bfloat16().float()
    ).abs()
    magnitude[::7] = magnitude[3]  # a long run of equal values
    magnitude[::11] = 0.0
    min_ranks = sorted({1, 2, size // 7, size // 2, size - 2, size - 1})
    fused = [cpu_kernels.rank_at_least_mask(magnitude, r) for r in min_ranks]
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    for min_rank, mask in zip(min_ranks, fused, strict=True):
        assert torch.equal(mask, sparsify.rank_at_least_mask(magnitude, min_rank)), min_rank
        assert int(mask.sum()) == size - min_rank


@pytest.mark.parametrize("consensus", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, -0.25, 2.0], [0.0, 0.0, 1.5]])
def test_fused_fuse_matches_the_torch_reference(consensus, normalize, weights, monkeypatch):
    from della_cli.methods import METHODS, merge_tensor

    generator = torch.Generator().manual_seed(11)
    base = torch.randn(64, 96, generator=generator)
    models = [base + awkward_delta((64, 96), seed) for seed in (1, 2, 3)]
    models[0][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    models[1][1, :2] = base[1, :2]  # zero deltas
    models[2][2, 0] = base[2, 0] - (models[0][2, 0] - base[2, 0])  # sums cancelling to 0
    spec = METHODS["ties" if consensus else "task_arithmetic"]
    params = [ExpertParams(weight=w, density=1.0) for w in weights]
    global_params = GlobalParams(lambda_=1.1, normalize=normalize)
    fused = merge_tensor(spec, base, models, params, global_params)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    reference = merge_tensor(spec, base, models, params, global_params)
    assert torch.equal(fused.view(torch.int32), reference.view(torch.int32))


def test_bfloat16_widening_keeps_every_bit():
    generator = torch.Generator().manual_seed(5)
    values = (torch.randn(70_000, generator=generator) * 1e30).bfloat16()
    specials = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -3e38]
    values[: len(specials)] = torch.tensor(specials).bfloat16()
    widened = cpu_kernels.bfloat16_to_float32(values.reshape(700, 100))
    expected = values.float().reshape(700, 100)
    assert torch.equal(widened.view(torch.int32), expected.view(torch.int32))


def test_bfloat16_delta_magnitude_equals_widen_subtract_abs():
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(300, 257, generator=generator).bfloat16()
    expert = (base.float() + 0.01 * torch.randn(300, 257, generator=generator)).bfloat16()
    expert.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0]).bfloat16()
    fused = cpu_kernels.bfloat16_delta_magnitude(expert, base)
    expected = (expert.float() - base.float()).abs()
    assert torch.equal(fused.view(torch.int32), expected.view(torch.int32))
