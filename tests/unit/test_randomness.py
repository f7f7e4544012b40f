"""Counter-based uniform draws: stable keys, exact values, block independence, and enough
statistical quality for Bernoulli drops."""

from __future__ import annotations

import pytest
import torch

from della_cli.methods.randomness import derive_key, uniform_from_key

NAME = "model.layers.0.mlp.up_proj.weight"
# Computed once from BLAKE2b-64 of b"della/v1\0" b"0\0" NAME b"\0" b"0" (little endian). If this
# changes, every published merge made with a seed changes: bump the "della/v1" tag on purpose.
KEY_SEED0_EXPERT0 = 5003662722486781459
FIRST_DRAWS_24BIT = [5421343, 13805105, 3749899, 13655052]
MILLION = 1 << 20


def test_derive_key_is_pinned():
    key = derive_key(0, NAME, 0)
    assert key == KEY_SEED0_EXPERT0
    assert 0 <= key < 2**64
    assert key.bit_length() > 48  # a real 64-bit hash, not a small counter


def test_uniform_draws_are_pinned():
    draws = uniform_from_key(KEY_SEED0_EXPERT0, (4,))
    assert (draws * 2**24).tolist() == FIRST_DRAWS_24BIT


def test_derive_key_differs_by_seed_name_and_expert():
    keys = {
        derive_key(seed, name, expert)
        for seed in (0, 1, 2, 1234567)
        for name in (NAME, "lm_head.weight", "model.embed_tokens.weight", "")
        for expert in (0, 1, 2, 10)
    }
    assert len(keys) == 4 * 4 * 4


def test_derive_key_fields_do_not_run_together():
    # "1" + "23" must not collide with "12" + "3": the fields are separated.
    assert derive_key(1, "23", 0) != derive_key(12, "3", 0)
    assert derive_key(0, "a1", 0) != derive_key(0, "a", 10)


def test_uniform_is_float32_in_unit_interval_on_a_grid():
    draws = uniform_from_key(derive_key(7, NAME, 1), (64, 4096))
    assert draws.dtype == torch.float32
    assert draws.shape == (64, 4096)
    assert draws.min() >= 0.0
    assert draws.max() < 1.0
    scaled = draws.double() * 2**24
    assert torch.equal(scaled, scaled.round())


def test_uniform_same_key_same_draws_and_shape_only_reshapes():
    key = derive_key(3, NAME, 0)
    flat = uniform_from_key(key, (240,))
    assert torch.equal(flat, uniform_from_key(key, (240,)))
    assert torch.equal(uniform_from_key(key, (4, 6, 10)), flat.reshape(4, 6, 10))
    assert torch.equal(uniform_from_key(key, torch.Size([12, 20])), flat.reshape(12, 20))


@pytest.mark.parametrize(("block", "numel"), [(1, 300), (7, 1000), (1000, 10_000), (4096, 10_000)])
def test_uniform_blockwise_equals_whole(block, numel):
    key = derive_key(5, NAME, 2)
    whole = uniform_from_key(key, (numel,))
    pieces = [
        uniform_from_key(key, (min(block, numel - start),), start=start)
        for start in range(0, numel, block)
    ]
    assert torch.equal(torch.cat(pieces), whole)


def test_uniform_block_at_an_offset_is_a_slice():
    key = derive_key(5, NAME, 3)
    whole = uniform_from_key(key, (50, 40))
    block = uniform_from_key(key, (7, 40), start=13 * 40)
    assert torch.equal(block, whole[13:20])


def test_uniform_high_index_bits_matter():
    key = derive_key(5, NAME, 2)
    low = uniform_from_key(key, (256,), start=0)
    high = uniform_from_key(key, (256,), start=2**32)
    assert (low != high).float().mean() > 0.99


def test_uniform_empty_shape():
    assert uniform_from_key(1, (0, 5)).shape == (0, 5)


@pytest.fixture(scope="module")
def million_draws() -> torch.Tensor:
    return uniform_from_key(derive_key(11, NAME, 0), (MILLION,)).double()


def test_uniform_mean_and_variance(million_draws):
    # mean 1/2 with std 1/sqrt(12 n) ≈ 2.8e-4; variance 1/12
    assert abs(float(million_draws.mean()) - 0.5) < 5 * (1 / 12 / MILLION) ** 0.5
    assert abs(float(million_draws.var()) - 1 / 12) < 1e-3


def chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("bins", [16, 256, 4096])
def test_uniform_histogram_chi_square(million_draws, bins):
    counts = torch.bincount((million_draws * bins).long(), minlength=bins).double()
    dof = bins - 1
    # χ² with k dof: mean k, std sqrt(2k). Too small is as suspicious as too large.
    statistic = chi_square(counts)
    assert abs(statistic - dof) < 6 * (2 * dof) ** 0.5, statistic


def test_uniform_serial_pairs_chi_square(million_draws):
    # Consecutive pairs over a 32 × 32 grid: catches a hash that is uniform but correlated.
    bins = 32
    cells = (million_draws * bins).long()
    pairs = cells[0::2] * bins + cells[1::2]
    counts = torch.bincount(pairs, minlength=bins * bins).double()
    dof = bins * bins - 1
    assert abs(chi_square(counts) - dof) < 6 * (2 * dof) ** 0.5


@pytest.mark.parametrize("lag", [1, 2, 1024])
def test_uniform_low_autocorrelation(million_draws, lag):
    x = million_draws - million_draws.mean()
    correlation = float((x[:-lag] * x[lag:]).mean() / x.var())
    assert abs(correlation) < 5 / MILLION**0.5


def test_uniform_low_bits_are_balanced(million_draws):
    # The 24-bit integers' lowest bits must be fair coins too.
    integers = (million_draws * 2**24).long()
    for bit in (0, 1, 7):
        ones = float(((integers >> bit) & 1).double().mean())
        assert abs(ones - 0.5) < 5 * 0.5 / MILLION**0.5


def test_different_keys_give_unrelated_streams():
    first = uniform_from_key(derive_key(0, NAME, 0), (MILLION // 4,)).double()
    for other_key in (derive_key(0, NAME, 1), derive_key(1, NAME, 0), KEY_SEED0_EXPERT0 ^ 1):
        second = uniform_from_key(other_key, (MILLION // 4,)).double()
        assert (first == second).float().mean() < 1e-3
        a, b = first - first.mean(), second - second.mean()
        correlation = float((a * b).mean() / (a.std() * b.std()))
        assert abs(correlation) < 5 / (MILLION // 4) ** 0.5


def test_derived_keys_give_streams_that_are_not_shifts_or_permutations():
    stream = uniform_from_key(derive_key(0, NAME, 0), (4096,))
    other = uniform_from_key(derive_key(0, NAME, 1), (4096,))
    for shift in range(1, 4):
        assert (stream[shift:] == other[: 4096 - shift]).float().mean() < 0.01
        assert (other[shift:] == stream[: 4096 - shift]).float().mean() < 0.01
    # Two independent 4096-draw streams on a 2**24 grid share about 4096 / 2**24 of values.
    assert torch.isin(stream, other).float().mean() < 0.01


def _reference_uniform(key: int, index: int) -> float:
    """The hash written out with Python integers: what every backend must reproduce."""
    mask = 0xFFFFFFFF

    def avalanche(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & mask
        x ^= x >> 15
        x = (x * 0x846CA68B) & mask
        return x ^ (x >> 16)

    mixed = (key + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    round_key = (mixed ^ (mixed >> 31)) & mask
    x = ((index & mask) * ((key | 1) & mask) + (key >> 32) + (index >> 32) * 0x9E3779B9) & mask
    x = avalanche(avalanche(x) ^ round_key)
    return (x >> 8) / 2**24


@pytest.mark.parametrize("start", [0, 2**31 - 300, 2**32 - 300, 5 * 2**32 + 17])
def test_draws_equal_the_integer_reference_across_word_boundaries(start):
    """Torch's int32 lanes (wrapping multiply, masked shifts) agree with exact integer math,
    including where indices cross 2**31 (sign of the low word) and 2**32 (the high word)."""
    key = derive_key(3, NAME, 1)
    draws = uniform_from_key(key, (600,), start=start).tolist()
    assert draws == [_reference_uniform(key, start + offset) for offset in range(600)]
