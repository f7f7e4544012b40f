"""slerp, nuslerp, multislerp, karcher, nearswap: ALGORITHMS.md's worked examples E7-E11, the
two streaming passes against the whole-tensor functions, and properties."""

from __future__ import annotations

import itertools

import pytest
import torch
from worked_examples import DTYPES, assert_printed, row_blocks, t

from della_cli.methods import block_sums, entrywise
from della_cli.methods import spherical_means as means
from della_cli.methods import spherical_pairs as pairs


def blocks_of(tensors, bounds):
    return [[x[a:b] for x in tensors] for a, b in bounds]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- golden (E7-E11)


@pytest.mark.parametrize("dtype", DTYPES)
def test_e7_slerp(dtype):
    base, other = t([1, 0, 1, 0], dtype), t([0, 1, 1, 0], dtype)
    assert_printed(pairs.slerp(base, other, 0.5), [0.5774, 0.5774, 1.1547, 0])
    assert_printed(pairs.slerp(base, other, 0.25), [0.8165, 0.2989, 1.1154, 0])
    assert_printed(pairs.slerp(base, t([-2, 0, -2, 0], dtype), 0.25), [0.25, 0, 0.25, 0])
    assert_printed(pairs.slerp(t([0, 0, 0, 0], dtype), other, 0.5), [0, 0.7071, 0.7071, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_e8_nuslerp(dtype):
    base = t([1, 1, 1, 1], dtype)
    first, second = t([2, 1, 1, 1], dtype), t([1, 2, 1, 1], dtype)
    assert_printed(pairs.nuslerp(first, second, [1, 3], base=base), [1.3827, 1.9239, 1, 1])
    v1, v2 = t([[1, 0], [1, 0]], dtype), t([[0, 1], [2, 0]], dtype)
    assert_printed(pairs.nuslerp(v1, v2, [1, 1]), [[0.5534, 0.5534], [1.6603, 0]])
    assert_printed(pairs.nuslerp(v1, v2, [1, 1], flatten=False), [[0.7071, 0.7071], [1.5, 0]])
    columns = pairs.nuslerp(v1, v2, [1, 1], flatten=False, row_wise=True)
    assert_printed(columns, [[0.5412, 0.7071], [1.6236, 0]])
    antiparallel = pairs.nuslerp(t([1, 2, 0, 0], dtype), t([-0.5, -1, 0, 0], dtype), [1, 3])
    assert_printed(antiparallel, [-0.125, -0.25, 0, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_e9_multislerp(dtype):
    base = t([1, 1, 1, 1], dtype)
    first, second = t([4, 1, 1, 1], dtype), t([1, 5, 1, 1], dtype)
    assert_printed(means.multislerp([first, second], [1, 1], base), [3.4749, 3.4749, 1, 1])
    assert_printed(means.multislerp([first, second], [1, 3], base), [2.1859, 4.5576, 1, 1])
    antipodal = t([-2, 1, 1, 1], dtype)
    assert_printed(means.multislerp([first, antipodal], [1, 1], base), [1, 1, 1, 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_e10_karcher(dtype):
    x1, x2 = t([2, 0, 0, 0], dtype), t([0, 2, 0, 0], dtype)
    assert_printed(means.karcher([x1, x2]), [1.4142, 1.4142, 0, 0])
    assert_printed(means.karcher([x1, x2, t([0, 0, 0, 0], dtype)]), [0.9428, 0.9428, 0, 0])
    three = [t([1, 0, 0, 0], dtype), t([0, 2, 0, 0], dtype), t([0, 0, 3, 0], dtype)]
    assert_printed(means.karcher(three), [1.1547, 1.1547, 1.1547, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_e11_nearswap(dtype):
    result = entrywise.nearswap(t([1, 2, 3, 4], dtype), t([1.05, 2.5, 2, 4], dtype), 0.1)
    assert_printed(result, [1.05, 2.1, 2.9, 4])


# ---------------------------------------------------------------- the two streaming passes


@pytest.mark.parametrize("shape", [(7, 5), (7,), (7, 2, 3)])
def test_slerp_streaming_equals_whole(shape):
    base, other = randn(*shape, seed=1), randn(*shape, seed=2)
    whole = pairs.slerp(base, other, 0.3)
    for bounds in row_blocks(shape[0]):
        blocks = blocks_of([base, other], bounds)
        stats = sum(pairs.slerp_statistics(*b) for b in blocks)
        streamed = torch.cat([pairs.slerp_apply(stats, *b, 0.3) for b in blocks])
        torch.testing.assert_close(streamed, whole)


NUSLERP_CASES = [
    (flatten, row_wise, shape)
    for flatten, row_wise in [(True, False), (False, True), (False, False)]
    for shape in [(7, 5), (7,), (7, 2, 3)]
    if flatten or row_wise or len(shape) > 1  # per row, a 1-D tensor is one row, read whole
]


@pytest.mark.parametrize(("flatten", "row_wise", "shape"), NUSLERP_CASES)
def test_nuslerp_streaming_equals_whole(flatten, row_wise, shape):
    first, second, base = (randn(*shape, seed=s) for s in (3, 4, 5))
    layout = pairs.nuslerp_layout(flatten, row_wise)
    for around in (None, base):
        whole = pairs.nuslerp(first, second, [1, 2], around, flatten, row_wise)
        for bounds in row_blocks(shape[0]):
            inputs = [first, second] if around is None else [first, second, around]
            blocks = blocks_of(inputs, bounds)
            stats = None
            if layout != block_sums.ROWS:
                stats = sum(pairs.nuslerp_statistics(*b[:2], *b[2:], layout=layout) for b in blocks)
            streamed = torch.cat(
                [pairs.nuslerp_apply(stats, *b[:2], 2 / 3, *b[2:], layout=layout) for b in blocks]
            )
            torch.testing.assert_close(streamed, whole)


@pytest.mark.parametrize("shape", [(7, 5), (7,)])
def test_multislerp_and_karcher_streaming_equal_whole(shape):
    models = [randn(*shape, seed=s) for s in (6, 7, 8)]
    base = randn(*shape, seed=9)
    ms_whole = means.multislerp(models, [1, 2, 3], base)
    k_whole = means.karcher(models)
    for bounds in row_blocks(shape[0]):
        blocks = blocks_of([*models, base], bounds)
        gram = sum(means.gram_statistics(b[:3], b[3]) for b in blocks)
        c = means.multislerp_coefficients(gram, [1, 2, 3])
        streamed = torch.cat([means.combine(c, b[:3], b[3]) for b in blocks])
        torch.testing.assert_close(streamed, ms_whole)
        gram = sum(means.gram_statistics(b[:3]) for b in blocks)
        c = means.karcher_coefficients(gram)
        torch.testing.assert_close(torch.cat([means.combine(c, b[:3]) for b in blocks]), k_whole)


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize("shape", [(5, 3), (6,)])
def test_slerp_endpoints_and_identity(shape):
    base, other = randn(*shape, seed=10), randn(*shape, seed=11)
    torch.testing.assert_close(pairs.slerp(base, other, 0.0), base)
    torch.testing.assert_close(pairs.slerp(base, other, 1.0), other)
    torch.testing.assert_close(pairs.slerp(base, base, 0.37), base)
    torch.testing.assert_close(pairs.nuslerp(base, other, [1, 0]), base)
    torch.testing.assert_close(pairs.nuslerp(base, other, [0, 1]), other)
    torch.testing.assert_close(entrywise.nearswap(base, base, 0.5), base)


def test_slerp_keeps_the_norm_of_equal_norm_inputs():
    """On the sphere: inputs of equal norm interpolate at that norm (lerp would shrink it)."""
    base, other = randn(64, seed=12), randn(64, seed=13)
    other = other / other.norm() * base.norm()
    for step in (0.2, 0.5, 0.8):
        assert pairs.slerp(base, other, step).norm() == pytest.approx(float(base.norm()), rel=1e-5)


def test_multislerp_and_karcher_are_permutation_invariant():
    models = [randn(4, 3, seed=s) for s in (14, 15, 16)]
    weights = [0.5, 1.0, 2.0]
    reference = means.multislerp(models, weights)
    karcher = means.karcher(models)
    for order in itertools.permutations(range(3)):
        permuted = [models[i] for i in order]
        torch.testing.assert_close(
            means.multislerp(permuted, [weights[i] for i in order]), reference
        )
        torch.testing.assert_close(means.karcher(permuted), karcher)


def test_nuslerp_swapping_the_models_and_weights_changes_nothing():
    first, second, base = (randn(5, 4, seed=s) for s in (25, 26, 27))
    for around, flatten, row_wise in itertools.product((None, base), (True, False), (False, True)):
        forward = pairs.nuslerp(first, second, [0.3, 0.9], around, flatten, row_wise)
        backward = pairs.nuslerp(second, first, [0.9, 0.3], around, flatten, row_wise)
        torch.testing.assert_close(forward, backward)


def test_identical_inputs_give_themselves():
    x = randn(4, 3, seed=17)
    torch.testing.assert_close(means.multislerp([x, x.clone()], [1, 3]), x)
    torch.testing.assert_close(means.karcher([x, x.clone(), x.clone()]), x)
    torch.testing.assert_close(means.multislerp([x], [5.0]), x)


def test_karcher_converges_to_a_point_with_zero_tangent():
    """The Karcher mean is where the weighted log maps cancel: Σ Ωᵢ/sin Ωᵢ (uᵢ − cos Ωᵢ μ) = 0."""
    models = [randn(32, seed=s) for s in (18, 19, 20)]
    mean = means.karcher(models, max_iter=50, tol=1e-12).double()
    mu = mean / mean.norm()
    tangent = torch.zeros_like(mu)
    for x in models:
        u = x.double() / x.double().norm()
        cos = (u @ mu).clamp(-1, 1)
        angle = torch.acos(cos)
        tangent += angle / torch.sin(angle) * (u - cos * mu)
    assert tangent.norm() < 1e-5
    assert mean.norm() == pytest.approx(sum(float(x.norm()) for x in models) / 3, rel=1e-5)


def test_multislerp_cancelling_directions_fall_back_to_the_weighted_sum():
    """Three models whose directions cancel: mergekit raises; we take Σ wᵢxᵢ (S3)."""
    x = t([1.0, 0, 0, 0])
    y = t([-0.5, 0.8660254037844386, 0, 0])
    z = t([-0.5, -0.8660254037844386, 0, 0])
    result = means.multislerp([x, 2 * y, 3 * z], [1, 1, 1])
    torch.testing.assert_close(result, (x + 2 * y + 3 * z) / 3)


def test_multislerp_refuses_weights_summing_to_zero():
    with pytest.raises(ValueError, match="sum to 0"):
        means.multislerp([randn(3, seed=1), randn(3, seed=2)], [1.0, -1.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_compute_dtype(dtype):
    base, other = randn(4, 3, seed=21).to(dtype), randn(4, 3, seed=22).to(dtype)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    results = [
        pairs.slerp(base, other, 0.5),
        pairs.nuslerp(base, other, [1, 1]),
        means.multislerp([base, other], [1, 1]),
        means.karcher([base, other]),
        entrywise.nearswap(base, other, 0.1),
    ]
    assert all(r.dtype == expected for r in results)
    # a bfloat16 input is widened exactly, so the result matches the float32 computation
    widened = pairs.slerp(base.float(), other.float(), 0.5)
    if dtype != torch.float64:
        torch.testing.assert_close(results[0], widened)


def test_empty_tensors():
    empty = torch.zeros(0, 4)
    assert pairs.slerp(empty, empty, 0.5).shape == (0, 4)
    assert pairs.nuslerp(empty, empty, [1, 1], flatten=False).shape == (0, 4)
    assert entrywise.nearswap(empty, empty, 0.5).shape == (0, 4)


def test_nan_spreads_to_the_whole_tensor():
    base, other = randn(5, seed=23), randn(5, seed=24)
    other[2] = float("nan")
    assert torch.isnan(pairs.slerp(base, other, 0.5)).all()
    swapped = entrywise.nearswap(base, other, 0.5)
    assert torch.isnan(swapped[2]) and not torch.isnan(swapped[[0, 1, 3, 4]]).any()
