"""The sparsifier building blocks: row views, stable ranks, MAGPRUNE keep probabilities, the
deterministic masks of TIES and breadcrumbs, and the rescale rules."""

from __future__ import annotations

import math

import pytest
import torch

from della_cli.methods import Rescale
from della_cli.methods.sparsify import (
    apply_keep_mask,
    as_rows,
    magnitude_keep_mask,
    magprune_keep_prob,
    outlier_keep_mask,
    random_keep_mask,
    rank_at_least_mask,
    stable_row_order,
    stable_row_ranks,
)

# ---------------------------------------------------------------------------------------------
# as_rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "rows_shape"),
    [((7,), (1, 7)), ((3, 5), (3, 5)), ((2, 3, 4), (2, 12)), ((4, 1, 2, 3), (4, 6)), ((), (1, 1))],
)
def test_as_rows_shapes(shape, rows_shape):
    values = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    rows = as_rows(values)
    assert tuple(rows.shape) == rows_shape
    # Row-major: row i holds the entries whose first index is i (or everything for 1-D).
    assert rows.flatten().tolist() == values.flatten().tolist()


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_as_rows_is_a_view(shape):
    values = torch.zeros(shape)
    rows = as_rows(values)
    rows[0, -1] = 1.0
    assert values.flatten()[rows.shape[1] - 1] == 1.0


def test_as_rows_of_a_3d_tensor_groups_by_first_dimension():
    values = torch.arange(24.0).reshape(2, 3, 4)
    rows = as_rows(values)
    assert rows[0].tolist() == list(range(12))
    assert rows[1].tolist() == list(range(12, 24))


# ---------------------------------------------------------------------------------------------
# stable_row_ranks
# ---------------------------------------------------------------------------------------------


def test_stable_row_ranks_by_hand():
    rows = torch.tensor([[3.0, 1.0, 2.0], [5.0, 5.0, 5.0], [0.0, 2.0, 0.0], [0.4, 0.1, 0.1]])
    ranks = stable_row_ranks(rows)
    assert ranks.dtype == torch.int64
    assert ranks.tolist() == [[2, 0, 1], [0, 1, 2], [0, 2, 1], [2, 0, 1]]


def test_stable_row_ranks_are_a_permutation_and_order_consistent():
    generator = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 4, (20, 33), generator=generator).float()  # many ties
    ranks = stable_row_ranks(rows)
    assert (ranks.sort(dim=-1).values == torch.arange(33)).all()
    for row, rank in zip(rows, ranks, strict=True):
        # (value, position) order, which is what "equal magnitudes ranked by position" means
        expected = sorted(range(33), key=lambda i, row=row: (row[i].item(), i))
        assert [int(rank[i]) for i in expected] == list(range(33))


# ---------------------------------------------------------------------------------------------
# magprune_keep_prob
# ---------------------------------------------------------------------------------------------


def random_delta(shape, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype)


@pytest.mark.parametrize("shape", [(50,), (8, 17), (3, 4, 5)])
@pytest.mark.parametrize(("density", "epsilon"), [(0.7, 0.1), (0.5, 0.45), (0.3, 0.0)])
def test_magprune_keep_prob_is_linear_in_rank(shape, density, epsilon):
    delta = random_delta(shape)
    keep_prob = magprune_keep_prob(delta, density, epsilon)
    assert keep_prob.shape == delta.shape
    assert keep_prob.dtype == torch.float32
    rows = as_rows(keep_prob)
    n = rows.shape[-1]
    ranks = stable_row_ranks(as_rows(delta.abs())).double()
    expected = (density - epsilon) + 2 * epsilon * ranks / (n - 1)
    torch.testing.assert_close(rows.double(), expected, atol=1e-6, rtol=0)
    assert rows.min() >= density - epsilon - 1e-6
    assert rows.max() <= density + epsilon + 1e-6
    # Each row runs over the whole window and averages exactly d.
    torch.testing.assert_close(rows.min(dim=-1).values.double(), expected.min(dim=-1).values)
    torch.testing.assert_close(rows.max(dim=-1).values.double(), expected.max(dim=-1).values)
    torch.testing.assert_close(
        rows.double().mean(dim=-1), torch.full((rows.shape[0],), density, dtype=torch.float64)
    )


def test_magprune_keep_prob_uses_magnitude_not_sign():
    delta = torch.tensor([-3.0, 1.0, -2.0, 4.0, 0.0])
    keep_prob = magprune_keep_prob(delta, 0.5, 0.2)
    # |δ| ranks [3, 1, 2, 4, 0] of 4 → k = 0.3 + 0.4 · rank / 4
    torch.testing.assert_close(keep_prob, torch.tensor([0.6, 0.4, 0.5, 0.7, 0.3]))


def test_magprune_keep_prob_ties_ranked_by_position():
    keep_prob = magprune_keep_prob(torch.tensor([0.2, -0.2, 0.2]), 0.5, 0.1)
    torch.testing.assert_close(keep_prob, torch.tensor([0.4, 0.5, 0.6]))


@pytest.mark.parametrize("shape", [(1,), (6, 1), (4, 1, 1)])
def test_magprune_keep_prob_single_entry_rows_get_density(shape):
    keep_prob = magprune_keep_prob(random_delta(shape), 0.6, 0.3)
    assert torch.equal(keep_prob, torch.full(shape, 0.6))


def test_magprune_keep_prob_epsilon_zero_is_constant():
    keep_prob = magprune_keep_prob(random_delta((5, 9)), 0.35, 0.0)
    assert torch.equal(keep_prob, torch.full((5, 9), 0.35))


def test_magprune_keep_prob_rows_are_independent():
    # The same row twice, scaled differently: each row is ranked on its own.
    row = torch.tensor([0.3, -0.1, 0.2, 0.05])
    keep_prob = magprune_keep_prob(torch.stack([row, 100 * row]), 0.5, 0.3)
    assert torch.equal(keep_prob[0], keep_prob[1])


# ---------------------------------------------------------------------------------------------
# rank_at_least_mask and magnitude_keep_mask (TIES trim)
# ---------------------------------------------------------------------------------------------


def test_rank_at_least_mask_by_hand():
    magnitude = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    # stable ranks: [0, 1, 2, 3, 4]
    assert rank_at_least_mask(magnitude, 2).tolist() == [False, False, True, True, True]
    assert rank_at_least_mask(magnitude, 1).tolist() == [False, True, True, True, True]
    assert rank_at_least_mask(magnitude, 4).tolist() == [False, False, False, False, True]
    assert rank_at_least_mask(magnitude, 0).all()
    assert rank_at_least_mask(magnitude, -3).all()
    assert not rank_at_least_mask(magnitude, 5).any()
    assert not rank_at_least_mask(magnitude, 99).any()


def test_rank_at_least_mask_agrees_with_stable_ranks():
    generator = torch.Generator().manual_seed(3)
    for trial in range(30):
        shape = (3, 7) if trial % 2 else (2, 2, 5)
        magnitude = torch.randint(0, 5, shape, generator=generator).float()
        ranks = stable_row_ranks(magnitude.reshape(1, -1)).reshape(shape)
        for min_rank in range(magnitude.numel() + 1):
            mask = rank_at_least_mask(magnitude, min_rank)
            assert mask.shape == shape
            assert torch.equal(mask, ranks >= min_rank)


@pytest.mark.parametrize(
    ("numel", "density"), [(10, 0.35), (10, 0.5), (10, 0.1), (7, 0.99), (100, 0.7), (64, 0.01)]
)
def test_magnitude_keep_mask_keeps_floor_d_n_largest(numel, density):
    delta = random_delta((numel,), seed=numel)
    keep = magnitude_keep_mask(delta, density)
    keep_count = math.floor(density * numel)
    assert int(keep.sum()) == keep_count
    if 0 < keep_count < numel:
        assert delta.abs()[keep].min() > delta.abs()[~keep].max()


def test_magnitude_keep_mask_counts_whole_tensor_not_rows():
    delta = torch.tensor([[5.0, 4.0, 3.0], [0.1, 0.2, 0.3]])
    keep = magnitude_keep_mask(delta, 0.5)
    assert keep.tolist() == [[True, True, True], [False, False, False]]


def test_magnitude_keep_mask_tie_break_later_positions_win():
    # |δ| = [1, 1, 1, 0.5, 1]: ranks [1, 2, 3, 0, 4]; keep 2 → positions 2 and 4.
    keep = magnitude_keep_mask(torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0]), 0.4)
    assert keep.tolist() == [False, False, True, False, True]
    all_equal = magnitude_keep_mask(torch.full((8,), -2.0), 0.25)
    assert all_equal.tolist() == [False] * 6 + [True] * 2


def test_magnitude_keep_mask_is_deterministic_with_ties():
    delta = torch.tensor([[0.5, -0.5, 0.25], [0.5, 0.25, -0.5]])
    first = magnitude_keep_mask(delta, 0.5)
    assert int(first.sum()) == 3
    assert first.tolist() == [[False, True, False], [True, False, True]]
    for _ in range(3):
        assert torch.equal(magnitude_keep_mask(delta.clone(), 0.5), first)


# ---------------------------------------------------------------------------------------------
# outlier_keep_mask (breadcrumbs)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [1, 5, 10, 37, 100])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.2, 0.5])
def test_outlier_keep_mask_counts(numel, density, gamma):
    delta = random_delta((numel,), seed=numel)
    keep = outlier_keep_mask(delta, density, gamma)
    top_count = math.floor(gamma * numel)
    keep_count = min(math.floor(density * numel), numel - top_count)
    assert int(keep.sum()) == keep_count
    ranks = stable_row_ranks(delta.abs().reshape(1, -1)).reshape(-1)
    kept_ranks = sorted(ranks[keep].tolist())
    # The kept entries are the ranks just below the dropped top ones.
    first = numel - top_count - keep_count
    assert kept_ranks == list(range(first, first + keep_count))


def test_outlier_keep_mask_2d_ranks_the_whole_tensor():
    delta = torch.tensor([[0.9, 0.1, 0.5], [0.3, -0.7, 0.2]])
    # 6 entries, γ = 0.2 → drop 1 (0.9); d = 0.5 → keep 3 (0.7, 0.5, 0.3)
    keep = outlier_keep_mask(delta, 0.5, 0.2)
    assert keep.tolist() == [[False, False, True], [True, True, False]]


# ---------------------------------------------------------------------------------------------
# random_keep_mask and apply_keep_mask
# ---------------------------------------------------------------------------------------------


def test_random_keep_mask_is_a_strict_comparison():
    uniform = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.5])
    assert random_keep_mask(uniform, 0.5).tolist() == [True, True, False, False, False]
    keep_prob = torch.tensor([0.1, 0.2, 0.6, 1.0, 0.5])
    assert random_keep_mask(uniform, keep_prob).tolist() == [True, False, True, True, False]


DELTA = torch.tensor([0.5, -1.0, 0.25, 2.0])
KEEP = torch.tensor([True, False, True, False])


def test_apply_keep_mask_keep_prob_scalar_and_tensor():
    by_scalar = apply_keep_mask(DELTA, KEEP, 0.5, Rescale.KEEP_PROB)
    assert by_scalar.tolist() == [1.0, 0.0, 0.5, 0.0]
    keep_prob = torch.tensor([0.25, 0.5, 0.125, 1.0])
    by_tensor = apply_keep_mask(DELTA, KEEP, keep_prob, Rescale.KEEP_PROB)
    assert by_tensor.tolist() == [2.0, 0.0, 2.0, 0.0]


def test_apply_keep_mask_l1_restores_the_norm():
    rescaled = apply_keep_mask(DELTA, KEEP, 0.5, Rescale.L1)
    # ‖δ‖₁ = 3.75, kept 0.75 → ×5
    torch.testing.assert_close(rescaled, torch.tensor([2.5, 0.0, 1.25, 0.0]))
    assert math.isclose(float(rescaled.abs().sum()), 3.75, rel_tol=1e-6)


def test_apply_keep_mask_none_keeps_survivors():
    assert apply_keep_mask(DELTA, KEEP, 0.5, Rescale.NONE).tolist() == [0.5, 0.0, 0.25, 0.0]


@pytest.mark.parametrize("rescale", list(Rescale))
def test_apply_keep_mask_all_dropped_leaves_zeros(rescale):
    result = apply_keep_mask(DELTA, torch.zeros(4, dtype=torch.bool), 0.5, rescale)
    assert torch.equal(result, torch.zeros(4))


def test_apply_keep_mask_does_not_modify_its_input():
    delta = DELTA.clone()
    apply_keep_mask(delta, KEEP, 0.5, Rescale.KEEP_PROB)
    apply_keep_mask(delta, KEEP, 0.5, Rescale.L1)
    assert torch.equal(delta, DELTA)


def test_keep_count_uses_the_written_decimal():
    """0.29 · 100 is 28.999999999999996 in floating point; the user asked for 29 entries."""
    delta = torch.arange(1, 101, dtype=torch.float32)
    assert int(magnitude_keep_mask(delta, 0.29).sum()) == 29
    assert bool(magnitude_keep_mask(delta, 0.29)[-29:].all())


@pytest.mark.parametrize("shape", [(96, 2816), (3, 70_000), (700, 64)])
def test_radix_order_equals_a_stable_comparison_sort(shape):
    """The CPU radix path (large float32 inputs) must give torch's stable sort order exactly,
    ties included: bf16-derived magnitudes repeat often, and zeros and infinities occur."""
    generator = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=generator).bfloat16().float()
    expert = torch.randn(shape, generator=generator).bfloat16().float()
    magnitude = (expert - base).abs()
    magnitude[:, ::7] = magnitude[:, :1]  # long runs of equal values
    magnitude[:, 5::11] = 0.0
    magnitude[0, 3] = float("inf")
    assert magnitude.numel() >= 1 << 14  # the radix path is taken
    expected = torch.sort(magnitude, dim=-1, stable=True).indices
    assert torch.equal(stable_row_order(magnitude), expected)


def test_keep_prob_on_the_radix_path_follows_the_rank_formula():
    generator = torch.Generator().manual_seed(3)
    delta = torch.randn(64, 1024, generator=generator).bfloat16().float()
    ranks = torch.sort(torch.sort(delta.abs(), dim=-1, stable=True).indices, dim=-1).indices
    expected = (ranks.to(torch.float32) / 1023) * (2 * 0.1) + (0.7 - 0.1)
    assert torch.equal(magprune_keep_prob(delta, 0.7, 0.1), expected)
