"""Golden tests for the merge methods: the worked examples of ALGORITHMS.md and small cases
worked by hand, run through ``merge_tensor`` in float64 and float32."""

from __future__ import annotations

import pytest
import torch

from della_cli.methods import (
    METHODS,
    ExpertParams,
    GlobalParams,
    Rescale,
    Sparsifier,
    elect_signs,
    fuse,
    merge_tensor,
    sparsify_delta,
)
from della_cli.methods.sparsify import magprune_keep_prob

DTYPES = [torch.float64, torch.float32]
# ALGORITHMS.md prints 4 significant digits; exact fractions are checked to float32 precision.
PRINTED_ATOL = 1e-4
EXACT_ATOL = 1e-6


def tensor(values, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def mask(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def assert_close(actual: torch.Tensor, expected, atol: float) -> None:
    expected_tensor = torch.tensor(expected, dtype=torch.float64)
    assert actual.shape == expected_tensor.shape
    torch.testing.assert_close(actual.double(), expected_tensor, atol=atol, rtol=0)


def refuse_draws(*_args):
    raise AssertionError("uniform draws were requested where none are needed")


# ---------------------------------------------------------------------------------------------
# E1: task arithmetic
# ---------------------------------------------------------------------------------------------

E1_BASE = [1.0, 2.0, 3.0, 4.0]
E1_A = [1.5, 1.0, 3.0, 4.2]
E1_B = [0.7, 2.6, 3.4, 4.2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("normalize", "expected"),
    [(False, [1.2, 1.6, 3.4, 4.4]), (True, [1.1, 1.8, 3.2, 4.2])],
)
def test_e1_task_arithmetic(dtype, normalize, expected):
    models = [tensor(E1_A, dtype), tensor(E1_B, dtype)]
    merged = merge_tensor(
        METHODS["task_arithmetic"],
        tensor(E1_BASE, dtype),
        models,
        [ExpertParams(), ExpertParams()],
        GlobalParams(normalize=normalize),
    )
    assert merged.dtype == dtype
    assert_close(merged, expected, EXACT_ATOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_normalize_divides_by_the_weight_sum(dtype):
    # δ_A = [0.5, −1, 0, 0.2], δ_B = [−0.3, 0.6, 0.4, 0.2]; w = [1, 2]:
    # N = [−0.1, 0.2, 0.8, 0.6], D = 3.
    models = [tensor(E1_A, dtype), tensor(E1_B, dtype)]
    params = [ExpertParams(weight=1.0), ExpertParams(weight=2.0)]
    base = tensor(E1_BASE, dtype)
    spec = METHODS["task_arithmetic"]
    summed = merge_tensor(spec, base, models, params, GlobalParams(normalize=False))
    averaged = merge_tensor(spec, base, models, params, GlobalParams(normalize=True))
    assert_close(summed, [0.9, 2.2, 3.8, 4.6], EXACT_ATOL)
    assert_close(averaged, [1 - 0.1 / 3, 2 + 0.2 / 3, 3 + 0.8 / 3, 4.2], EXACT_ATOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_weights_summing_to_zero_divide_by_one(dtype):
    # D = 1 − 1 = 0 → D := 1, so normalize true gives N = δ_A − δ_B.
    models = [tensor(E1_A, dtype), tensor(E1_B, dtype)]
    params = [ExpertParams(weight=1.0), ExpertParams(weight=-1.0)]
    merged = merge_tensor(
        METHODS["task_arithmetic"], tensor(E1_BASE, dtype), models, params, GlobalParams()
    )
    assert torch.isfinite(merged).all()
    assert_close(merged, [1.8, 0.4, 2.6, 4.0], EXACT_ATOL)


# ---------------------------------------------------------------------------------------------
# E2: ties
# ---------------------------------------------------------------------------------------------

E2_DELTAS = [
    [0.9, -0.1, 0.4, -0.7, 0.05, 0.3],
    [-0.5, 0.8, -0.2, -0.6, 0.1, -0.05],
    [0.2, 0.3, 0.6, 0.1, -0.9, 0.0],
]


def merge_e2(dtype, weights, density, lambda_=1.0, base=None):
    base_tensor = torch.zeros(6, dtype=dtype) if base is None else tensor(base, dtype)
    models = [base_tensor + tensor(delta, dtype) for delta in E2_DELTAS]
    params = [ExpertParams(weight=w, density=density) for w in weights]
    return merge_tensor(METHODS["ties"], base_tensor, models, params, GlobalParams(lambda_=lambda_))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("weights", "density", "printed", "exact"),
    [
        pytest.param(
            [1.0, 1.0, 1.0],
            0.5,
            [0.9, 0.55, 0.5, -0.65, -0.9, 0.0],
            [0.9, 0.55, 0.5, -0.65, -0.9, 0.0],
            id="equal-weights",
        ),
        pytest.param(
            [1.0, 2.0, 1.0],
            0.5,
            [-0.5, 0.6333, 0.5, -0.6333, -0.9, 0.0],
            [-0.5, 1.9 / 3, 0.5, -1.9 / 3, -0.9, 0.0],
            id="weights-1-2-1",
        ),
        pytest.param(
            [1.0, 1.0, 1.0],
            1.0,
            [0.55, 0.55, 0.5, -0.65, -0.9, 0.3],
            [0.55, 0.55, 0.5, -0.65, -0.9, 0.3],
            id="density-1",
        ),
    ],
)
def test_e2_ties(dtype, weights, density, printed, exact):
    merged = merge_e2(dtype, weights, density)
    assert merged.dtype == dtype
    assert_close(merged, printed, PRINTED_ATOL)
    assert_close(merged, exact, EXACT_ATOL)


@pytest.mark.parametrize("rescale", [Rescale.L1, Rescale.NONE])
def test_ties_and_breadcrumbs_ignore_the_rescale_setting(rescale):
    # Only the random sparsifiers rescale; TIES trim and breadcrumbs keep survivors as they are.
    models = [tensor(delta) for delta in E2_DELTAS]
    params = [ExpertParams(density=0.5, gamma=0.2)] * 3
    base = torch.zeros(6, dtype=torch.float64)
    for method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        spec = METHODS[method]
        plain = merge_tensor(spec, base, models, params, GlobalParams())
        other = merge_tensor(spec, base, models, params, GlobalParams(rescale=rescale))
        assert torch.equal(plain, other)


@pytest.mark.parametrize("dtype", DTYPES)
def test_e2_trim_keeps_the_largest_half_of_each_expert(dtype):
    trimmed = [
        [0.9, 0, 0.4, -0.7, 0, 0],
        [-0.5, 0.8, 0, -0.6, 0, 0],
        [0, 0.3, 0.6, 0, -0.9, 0],
    ]
    for delta, expected in zip(E2_DELTAS, trimmed, strict=True):
        sparse = sparsify_delta(
            Sparsifier.MAGNITUDE,
            tensor(delta, dtype),
            ExpertParams(density=0.5),
            GlobalParams(),
            uniform=refuse_draws,
        )
        assert torch.equal(sparse, tensor(expected, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lambda_scales_the_merged_delta_before_adding_the_base(dtype):
    base = [1.0, -2.0, 0.5, 3.0, 0.0, 10.0]
    merged = merge_e2(dtype, [1.0, 1.0, 1.0], 0.5, lambda_=2.0, base=base)
    delta = [0.9, 0.55, 0.5, -0.65, -0.9, 0.0]
    assert_close(merged, [b + 2.0 * d for b, d in zip(base, delta, strict=True)], EXACT_ATOL)
    halved = merge_e2(dtype, [1.0, 1.0, 1.0], 0.5, lambda_=0.5)
    assert_close(halved, [0.5 * d for d in delta], EXACT_ATOL)


# ---------------------------------------------------------------------------------------------
# E5 and E6: MAGPRUNE keep probabilities, injected masks, della fuse
# ---------------------------------------------------------------------------------------------

E5_DELTA = [0.05, -0.40, 0.10, 0.80, -0.20]
E5_KEEP_PROB = [0.60, 0.75, 0.65, 0.80, 0.70]
E5_MASK = [False, True, True, True, False]
E6_DELTA = [-0.30, 0.10, 0.20, -0.10, -0.50]
E6_KEEP_PROB = [0.75, 0.60, 0.70, 0.65, 0.80]
E6_MASK = [True, False, True, False, True]
MAGPRUNE = ExpertParams(density=0.7, epsilon=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("delta", "keep_prob"), [(E5_DELTA, E5_KEEP_PROB), (E6_DELTA, E6_KEEP_PROB)]
)
def test_e5_e6_keep_probabilities(dtype, delta, keep_prob):
    # E6's δ has |0.10| twice: the earlier one ranks lower (stable ranks).
    computed = magprune_keep_prob(tensor(delta, dtype), density=0.7, epsilon=0.1)
    assert computed.dtype == torch.float32
    assert_close(computed, keep_prob, EXACT_ATOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("rescale", "printed", "exact"),
    [
        pytest.param(
            Rescale.KEEP_PROB,
            [0, -0.5333, 0.1538, 1.0, 0],
            [0, -0.40 / 0.75, 0.10 / 0.65, 1.0, 0],
            id="keep_prob",
        ),
        pytest.param(
            Rescale.L1,
            [0, -0.4769, 0.1192, 0.9538, 0],
            [0, -0.40 * 1.55 / 1.3, 0.10 * 1.55 / 1.3, 0.80 * 1.55 / 1.3, 0],
            id="l1",
        ),
        pytest.param(Rescale.NONE, [0, -0.4, 0.1, 0.8, 0], [0, -0.4, 0.1, 0.8, 0], id="none"),
    ],
)
def test_e5_injected_mask(dtype, rescale, printed, exact):
    # One expert, θ₀ = 0, w = 1, λ = 1, no normalize: the merge returns δ̂ itself.
    base = torch.zeros(5, dtype=dtype)
    merged = merge_tensor(
        METHODS["della_linear"],
        base,
        [tensor(E5_DELTA, dtype)],
        [MAGPRUNE],
        GlobalParams(normalize=False, rescale=rescale),
        uniform=refuse_draws,
        keep_masks=[mask(E5_MASK)],
    )
    assert merged.dtype == dtype
    assert_close(merged, printed, PRINTED_ATOL)
    assert_close(merged, exact, EXACT_ATOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_e6_della_fuse(dtype):
    base = torch.zeros(5, dtype=dtype)
    merged = merge_tensor(
        METHODS["della"],
        base,
        [tensor(E5_DELTA, dtype), tensor(E6_DELTA, dtype)],
        [MAGPRUNE, MAGPRUNE],
        GlobalParams(lambda_=1.1),
        uniform=refuse_draws,
        keep_masks=[mask(E5_MASK), mask(E6_MASK)],
    )
    assert merged.dtype == dtype
    assert_close(merged, [-0.44, -0.5867, 0.2418, 1.1, -0.6875], PRINTED_ATOL)
    mean_2 = (0.10 / 0.65 + 0.20 / 0.70) / 2
    assert_close(merged, [-0.44, -1.1 * 0.40 / 0.75, 1.1 * mean_2, 1.1, -1.1 * 0.625], EXACT_ATOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_e6_sparsified_second_expert(dtype):
    sparse = sparsify_delta(
        Sparsifier.MAGPRUNE,
        tensor(E6_DELTA, dtype),
        MAGPRUNE,
        GlobalParams(),
        keep_mask=mask(E6_MASK),
    )
    assert_close(sparse, [-0.4, 0, 0.2857, 0, -0.625], PRINTED_ATOL)
    assert_close(sparse, [-0.4, 0, 0.2 / 0.7, 0, -0.625], EXACT_ATOL)


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------

LINEAR_A = [1.0, 2.0, 3.0]
LINEAR_B = [3.0, 6.0, -1.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("normalize", "expected"),
    [(True, [2.5, 5.0, 0.0]), (False, [10.0, 20.0, 0.0])],  # (A + 3B) / 4, and A + 3B
)
@pytest.mark.parametrize("base", [None, [100.0, -100.0, 7.0]], ids=["no-base", "base"])
def test_linear_averages_the_models_and_ignores_the_base(dtype, normalize, expected, base):
    merged = merge_tensor(
        METHODS["linear"],
        None if base is None else tensor(base, dtype),
        [tensor(LINEAR_A, dtype), tensor(LINEAR_B, dtype)],
        [ExpertParams(weight=1.0), ExpertParams(weight=3.0)],
        GlobalParams(normalize=normalize, lambda_=5.0),  # λ is not a linear parameter
    )
    assert merged.dtype == dtype
    assert_close(merged, expected, 0.0)


def test_linear_equal_weights_is_the_plain_mean():
    models = [tensor([1.0, 4.0]), tensor([2.0, 5.0]), tensor([6.0, 0.0])]
    merged = merge_tensor(METHODS["linear"], None, models, [ExpertParams()] * 3, GlobalParams())
    assert_close(merged, [3.0, 3.0], 0.0)


def test_linear_weights_summing_to_zero_divide_by_one():
    merged = merge_tensor(
        METHODS["linear"],
        None,
        [tensor(LINEAR_A), tensor(LINEAR_B)],
        [ExpertParams(weight=1.0), ExpertParams(weight=-1.0)],
        GlobalParams(normalize=True),
    )
    assert_close(merged, [-2.0, -4.0, 4.0], 0.0)


def test_methods_on_deltas_refuse_a_missing_base():
    with pytest.raises(ValueError, match="needs a base"):
        merge_tensor(METHODS["ties"], None, [tensor([1.0])], [ExpertParams()], GlobalParams())


def test_merge_needs_a_model():
    with pytest.raises(ValueError, match="at least one model"):
        merge_tensor(METHODS["linear"], None, [], [], GlobalParams())


# ---------------------------------------------------------------------------------------------
# DARE with injected masks: survivors divided by d
# ---------------------------------------------------------------------------------------------

DARE_BASE = [1.0, 1.0, 1.0, 1.0]
# Dyadic values, so every sum below is exact and the tie at position 0 is a true zero.
DARE_DELTAS = [[0.25, -0.5, 0.75, 1.0], [-0.5, 0.5, 0.25, -0.75]]
DARE_MASKS = [[True, True, False, True], [True, False, True, True]]
# d = 0.5: δ̂₁ = [0.5, −1, 0, 2], δ̂₂ = [−1, 0, 0.5, −1.5]; w = [1, 0.5]:
# u₁ = [0.5, −1, 0, 2], u₂ = [−0.5, 0, 0.25, −0.75]; Σu = [0, −1, 0.25, 1.25].


def merge_dare(method, dtype, normalize, rescale=Rescale.KEEP_PROB):
    base = tensor(DARE_BASE, dtype)
    return merge_tensor(
        METHODS[method],
        base,
        [base + tensor(delta, dtype) for delta in DARE_DELTAS],
        [ExpertParams(weight=1.0, density=0.5), ExpertParams(weight=0.5, density=0.5)],
        GlobalParams(normalize=normalize, rescale=rescale),
        uniform=refuse_draws,
        keep_masks=[mask(m) for m in DARE_MASKS],
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_linear_injected_masks(dtype):
    assert_close(merge_dare("dare_linear", dtype, False), [1.0, 0.0, 1.25, 2.25], 0.0)
    # normalize: N / (1 + 0.5)
    expected = [1.0, 1 - 1 / 1.5, 1 + 0.25 / 1.5, 1 + 1.25 / 1.5]
    assert_close(merge_dare("dare_linear", dtype, True), expected, EXACT_ATOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_linear_without_rescale_keeps_survivors_as_they_are(dtype):
    # u₁ = [0.25, −0.5, 0, 1], u₂ = [−0.25, 0, 0.125, −0.375]
    merged = merge_dare("dare_linear", dtype, False, rescale=Rescale.NONE)
    assert_close(merged, [1.0, 0.5, 1.125, 1.625], 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_ties_injected_masks(dtype):
    # Σu = [0, −1, 0.25, 1.25] → s = [+ (tie), −, +, +].
    # Agreeing: [u₁ 0.5], [u₁ −1], [u₂ 0.25 (u₁ is 0)], [u₁ 2].
    assert_close(merge_dare("dare_ties", dtype, False), [1.5, 0.0, 1.25, 3.0], 0.0)
    # normalize: D = [1, 1, 0.5, 1]
    assert_close(merge_dare("dare_ties", dtype, True), [1.5, 0.0, 1.5, 3.0], 0.0)


def test_dare_defaults_do_not_normalize():
    assert METHODS["dare_linear"].normalize_default is False
    assert METHODS["dare_ties"].normalize_default is False
    assert METHODS["della"].normalize_default is True
    assert METHODS["ties"].normalize_default is True


def test_random_sparsifier_without_draws_or_mask_is_an_error():
    with pytest.raises(ValueError, match="needs uniform draws"):
        sparsify_delta(
            Sparsifier.RANDOM, tensor([1.0, 2.0]), ExpertParams(density=0.5), GlobalParams()
        )


# ---------------------------------------------------------------------------------------------
# breadcrumbs: masks worked by hand
# ---------------------------------------------------------------------------------------------

CRUMBS_1 = [0.1, -0.9, 0.3, 0.05, -0.5, 0.7, 0.2, -0.02, 0.4, 0.6]
CRUMBS_2 = [-0.1, 0.2, -0.6, 0.9, 0.3, -0.4, -0.5, 0.05, 0.8, 0.7]


@pytest.mark.parametrize(
    ("density", "gamma", "kept"),
    [
        # drop the 2 largest (0.9, 0.7), keep the next 5, drop the 3 smallest
        pytest.param(0.5, 0.2, [0, 0, 1, 0, 1, 0, 1, 0, 1, 1], id="top-and-bottom"),
        # n_top = 0: the 5 largest stay
        pytest.param(0.5, 0.0, [0, 1, 0, 0, 1, 1, 0, 0, 1, 1], id="gamma-0"),
        pytest.param(0.5, None, [0, 1, 0, 0, 1, 1, 0, 0, 1, 1], id="gamma-unset"),
        pytest.param(0.5, 0.05, [0, 1, 0, 0, 1, 1, 0, 0, 1, 1], id="gamma-floors-to-0"),
        # 5 dropped at the top leave only 5, fewer than ⌊0.7·10⌋ = 7
        pytest.param(0.7, 0.5, [1, 0, 1, 1, 0, 0, 1, 1, 0, 0], id="top-leaves-too-few"),
        pytest.param(0.3, 0.1, [0, 0, 0, 0, 1, 1, 0, 0, 0, 1], id="one-dropped-at-top"),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_breadcrumbs_masks(dtype, density, gamma, kept):
    base = torch.full((10,), 2.0, dtype=dtype)
    merged = merge_tensor(
        METHODS["breadcrumbs"],
        base,
        [base + tensor(CRUMBS_1, dtype)],
        [ExpertParams(density=density, gamma=gamma)],
        GlobalParams(normalize=False),
        uniform=refuse_draws,
    )
    expected = [2.0 + d if k else 2.0 for d, k in zip(CRUMBS_1, kept, strict=True)]
    assert_close(merged, expected, EXACT_ATOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_breadcrumbs_ties_two_experts(dtype):
    # d = 0.5, γ = 0.2 on both:
    # δ̃₁ = [0, 0, 0.3, 0, −0.5, 0, 0.2, 0, 0.4, 0.6]
    # δ̃₂ = [0, 0, −0.6, 0, 0.3, −0.4, −0.5, 0, 0, 0.7]
    # Σ  = [0, 0, −0.3, 0, −0.2, −0.4, −0.3, 0, 0.4, 1.3]
    base = torch.zeros(10, dtype=dtype)
    models = [tensor(CRUMBS_1, dtype), tensor(CRUMBS_2, dtype)]
    params = [ExpertParams(density=0.5, gamma=0.2)] * 2
    summed = merge_tensor(
        METHODS["breadcrumbs"], base, models, params, GlobalParams(normalize=False)
    )
    assert_close(summed, [0, 0, -0.3, 0, -0.2, -0.4, -0.3, 0, 0.4, 1.3], EXACT_ATOL)
    elected = merge_tensor(
        METHODS["breadcrumbs_ties"], base, models, params, GlobalParams(normalize=False)
    )
    assert_close(elected, [0, 0, -0.6, 0, -0.5, -0.4, -0.5, 0, 0.4, 1.3], EXACT_ATOL)
    averaged = merge_tensor(
        METHODS["breadcrumbs_ties"], base, models, params, GlobalParams(normalize=True)
    )
    assert_close(averaged, [0, 0, -0.6, 0, -0.5, -0.4, -0.5, 0, 0.4, 0.65], EXACT_ATOL)


# ---------------------------------------------------------------------------------------------
# sign election and fuse
# ---------------------------------------------------------------------------------------------


def test_elect_signs_breaks_an_exact_zero_towards_plus():
    signs = elect_signs(tensor([0.0, -0.0, 1e-300, -1e-300, 3.0, -2.0]))
    assert signs.tolist() == [1.0, 1.0, 1.0, -1.0, 1.0, -1.0]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_opposite_deltas_elect_plus(method):
    # Σu = 0 exactly, so s = +1 and only the positive expert counts.
    base = torch.zeros(4, dtype=torch.float64)
    models = [tensor([0.5, -0.25, 1.0, -2.0]), tensor([-0.5, 0.25, -1.0, 2.0])]
    params = [ExpertParams(density=1.0, epsilon=0.0, gamma=0.0)] * 2
    merged = merge_tensor(
        METHODS[method], base, models, params, GlobalParams(normalize=False), refuse_draws
    )
    assert_close(merged, [0.5, 0.25, 1.0, 2.0], 0.0)


def test_zeros_never_agree():
    # s = + everywhere; the zero entries must not count in D, so the mean is 0.5, not 0.25.
    signs = torch.ones(3, dtype=torch.float64)
    weighted = [tensor([0.5, 0.0, 0.0]), tensor([0.0, 0.0, -0.0])]
    merged = fuse(weighted, [1.0, 1.0], normalize=True, signs=signs)
    assert_close(merged, [0.5, 0.0, 0.0], 0.0)
    assert not torch.isnan(merged).any()


def test_zeros_never_agree_in_ties():
    base = torch.zeros(2, dtype=torch.float64)
    models = [tensor([0.5, 0.0]), tensor([0.0, 0.0])]
    merged = merge_tensor(
        METHODS["ties"], base, models, [ExpertParams(density=1.0)] * 2, GlobalParams()
    )
    assert_close(merged, [0.5, 0.0], 0.0)


def test_fuse_with_no_agreeing_expert_divides_by_one():
    signs = tensor([1.0, -1.0])
    merged = fuse([tensor([-0.5, 0.25])], [2.0], normalize=True, signs=signs)
    assert_close(merged, [0.0, 0.0], 0.0)
    assert torch.isfinite(merged).all()


def test_fuse_denominator_sums_the_weights_of_agreeing_experts():
    signs = tensor([1.0, 1.0, -1.0])
    weighted = [tensor([1.0, -1.0, -3.0]), tensor([2.0, 4.0, -1.0]), tensor([3.0, 0.0, 5.0])]
    merged = fuse(weighted, [1.0, 2.0, 4.0], normalize=True, signs=signs)
    # N = [6, 4, −4], D = [7, 2, 3]
    assert_close(merged, [6 / 7, 2.0, -4 / 3], 1e-12)
    summed = fuse(weighted, [1.0, 2.0, 4.0], normalize=False, signs=signs)
    assert_close(summed, [6.0, 4.0, -4.0], 0.0)


# ---------------------------------------------------------------------------------------------
# density 1: no change, no randomness, for every sparsifier
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsifier", list(Sparsifier))
@pytest.mark.parametrize("rescale", list(Rescale))
@pytest.mark.parametrize("uniform", [None, refuse_draws], ids=["uniform-None", "refusing"])
def test_density_one_changes_nothing(sparsifier, rescale, uniform):
    delta = tensor([[0.3, -0.1, 0.0], [2.0, -5.0, 0.25]])
    params = ExpertParams(density=1.0, epsilon=0.2, gamma=0.3)
    sparse = sparsify_delta(sparsifier, delta, params, GlobalParams(rescale=rescale), uniform)
    assert torch.equal(sparse, delta)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_density_one_merges_without_draws(method):
    base = tensor([1.0, 2.0, 3.0])
    models = [tensor([1.5, 1.0, 3.0]), tensor([0.5, 2.5, 3.5])]
    params = [ExpertParams(density=1.0, epsilon=0.1, gamma=0.1)] * 2
    merged = merge_tensor(METHODS[method], base, models, params, GlobalParams(), uniform=None)
    reference = "ties" if METHODS[method].sign_consensus else "task_arithmetic"
    if method == "linear":
        reference = "linear"
    expected = merge_tensor(METHODS[reference], base, models, [ExpertParams()] * 2, GlobalParams())
    assert torch.equal(merged, expected)


def test_weights_too_small_for_float32_do_not_make_nan():
    """Σw = 1e-300 is 0 in float32: the normalizer must be taken as 1, not divide 0 by 0."""
    base = torch.tensor([0.5, -1.0])
    expert = torch.tensor([0.75, -1.0])
    spec = METHODS["task_arithmetic"]
    merged = merge_tensor(
        spec, base, [expert], [ExpertParams(weight=1e-300)], GlobalParams(normalize=True)
    )
    assert torch.equal(merged, base)
