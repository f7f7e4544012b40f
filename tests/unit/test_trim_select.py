"""The TIES / breadcrumbs selection from the inputs as stored equals the reference's."""

from __future__ import annotations

import pytest
import torch

from della_cli.backends.cpu import rules
from della_cli.backends.cpu.select import window_keep_mask
from della_cli.io.dtypes import from_torch, to_torch
from della_cli.methods.counts import magnitude_rank_window
from della_cli.methods.sparsify import middle_magnitude_mask, top_magnitude_mask

pytestmark = pytest.mark.skipif(not rules.available(), reason="needs numba")


def pair(shape, dtype, seed, ties=False):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.02
    delta = torch.randn(shape, generator=generator) * 0.002
    if ties:  # coarse deltas: many equal magnitudes, zeros among them
        delta = (delta * 2000).round() / 2000
    return (base + delta).to(dtype), base.to(dtype)


def window_mask(expert, base, low, high):
    """``window_keep_mask`` on the tensors' arrays, as a tensor."""
    return to_torch(window_keep_mask(from_torch(expert), from_torch(base), low, high))


def reference_mask(expert, base, density, gamma):
    """The torch reference (quickselect + cumulative sums) on a float32 |δ|."""
    magnitude = (expert.float() - base.float()).abs()
    if gamma is None:
        return top_magnitude_mask(magnitude, density)
    return middle_magnitude_mask(magnitude, density, gamma)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    ("density", "gamma"),
    [(0.5, None), (0.01, None), (0.999, None), (0.3, 0.05), (0.9, 0.2), (0.5, 0.0)],
)
@pytest.mark.parametrize("shape", [(64, 300), (5000,), (3, 7), (520, 512)])  # 8- and 16-bit digits
def test_window_mask_equals_the_reference(dtype, ties, density, gamma, shape):
    expert, base = pair(shape, dtype, seed=len(shape) + shape[0], ties=ties)
    low, high = magnitude_rank_window(expert.numel(), density, gamma)
    mask = window_mask(expert, base, low, high)
    expected = reference_mask(expert, base, density, gamma)
    assert mask.shape == expert.shape
    assert torch.equal(mask, expected)
    assert int(mask.sum()) == high - low


def test_all_equal_magnitudes_rank_by_position():
    base = torch.zeros(1000, dtype=torch.bfloat16)
    expert = torch.full((1000,), 0.5, dtype=torch.bfloat16)
    mask = window_mask(expert, base, 300, 900)
    assert torch.equal(mask, torch.arange(1000).ge(300) & torch.arange(1000).lt(900))


@pytest.mark.parametrize(("low", "high"), [(0, 10), (0, 0), (4, 4), (10, 10)])
def test_empty_and_full_windows(low, high):
    expert, base = pair((10,), torch.float32, seed=1)
    mask = window_mask(expert, base, low, high)
    assert int(mask.sum()) == high - low
