"""Properties of the merge methods that hold for any input (hypothesis, small shapes).

Exact-equality properties use dyadic values (multiples of 1/8, weights powers of two), so every
sum is exact in floating point and a different summation order cannot hide or fake a result.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from della_cli.methods import (
    METHODS,
    ExpertParams,
    GlobalParams,
    Rescale,
    Sparsifier,
    elect_signs,
    merge_tensor,
    sparsify_delta,
)
from della_cli.methods.randomness import derive_key, uniform_from_key
from della_cli.methods.sparsify import as_rows, magprune_keep_prob

SETTINGS = settings(max_examples=50, deadline=None)
DTYPES = st.sampled_from([torch.float32, torch.float64])
DETERMINISTIC = ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]
SHAPES = st.one_of(
    st.tuples(st.integers(1, 12)),
    st.tuples(st.integers(1, 4), st.integers(1, 8)),
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4)),
)


@st.composite
def density_epsilon(draw) -> tuple[float, float]:
    """A valid MAGPRUNE window: 0 < d − ε and d + ε ≤ 1."""
    density = draw(st.floats(0.05, 1.0))
    room = min(density, 1.0 - density)
    epsilon = draw(st.floats(0.0, 0.99)) * room
    return density, epsilon


def float_tensor(draw, shape, dtype=torch.float32) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= size
    values = draw(
        st.lists(st.floats(-4.0, 4.0, allow_nan=False, width=32), min_size=numel, max_size=numel)
    )
    return torch.tensor(values, dtype=dtype).reshape(shape)


def dyadic_tensor(draw, shape, dtype) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= size
    values = draw(st.lists(st.integers(-16, 16), min_size=numel, max_size=numel))
    return (torch.tensor(values, dtype=dtype) / 8).reshape(shape)


def seeded_draws(seed: int, shape):
    return lambda index: uniform_from_key(derive_key(seed, "t", index), shape)


# ---------------------------------------------------------------------------------------------
# keep probabilities
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), shape=SHAPES, window=density_epsilon())
def test_keep_prob_in_window_and_non_decreasing_with_magnitude(data, shape, window):
    density, epsilon = window
    delta = float_tensor(data.draw, shape)
    keep_prob = magprune_keep_prob(delta, density, epsilon)
    assert keep_prob.shape == delta.shape
    slack = 1e-6
    assert (keep_prob >= density - epsilon - slack).all()
    assert (keep_prob <= density + epsilon + slack).all()
    magnitude_rows = as_rows(delta.abs())
    prob_rows = as_rows(keep_prob)
    for magnitudes, probs in zip(magnitude_rows, prob_rows, strict=True):
        order = sorted(range(len(magnitudes)), key=lambda i, m=magnitudes: (float(m[i]), i))
        ordered = probs[order]
        assert (ordered[1:] >= ordered[:-1]).all()
        assert abs(float(probs.double().mean()) - density) < 1e-5
        if len(magnitudes) > 1:
            # the window is used in full: smallest gets d − ε, largest d + ε
            assert abs(float(ordered[0]) - (density - epsilon)) < slack
            assert abs(float(ordered[-1]) - (density + epsilon)) < slack


@SETTINGS
@given(data=st.data(), shape=SHAPES, density=st.floats(0.05, 1.0))
def test_epsilon_zero_keep_prob_is_constant_density(data, shape, density):
    delta = float_tensor(data.draw, shape)
    keep_prob = magprune_keep_prob(delta, density, 0.0)
    assert torch.equal(keep_prob, torch.full(shape, density, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# sign consensus
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(
    data=st.data(),
    method=st.sampled_from(["ties", "della", "dare_ties", "breadcrumbs_ties"]),
    shape=SHAPES,
    experts=st.integers(1, 4),
    window=density_epsilon(),
    normalize=st.booleans(),
    lambda_=st.floats(0.1, 3.0),
)
def test_output_sign_is_the_elected_sign_or_zero(
    data, method, shape, experts, window, normalize, lambda_
):
    density, epsilon = window
    density = max(density, 0.2)  # TIES needs ⌊d·N⌋ ≥ 1 to be interesting
    epsilon = min(epsilon, density - 0.01, 1 - density)
    base = torch.zeros(shape, dtype=torch.float64)
    models = [float_tensor(data.draw, shape, torch.float64) for _ in range(experts)]
    weights = data.draw(st.lists(st.floats(0.1, 2.0), min_size=experts, max_size=experts))
    params = [ExpertParams(w, density, epsilon, gamma=0.1) for w in weights]
    numel = base.numel()
    masks = [
        torch.tensor(data.draw(st.lists(st.booleans(), min_size=numel, max_size=numel))).reshape(
            shape
        )
        for _ in models
    ]
    spec = METHODS[method]
    keep_masks = masks if spec.is_random else None
    global_params = GlobalParams(lambda_=lambda_, normalize=normalize)
    merged = merge_tensor(spec, base, models, params, global_params, keep_masks=keep_masks)

    weighted_sum = torch.zeros(shape, dtype=torch.float64)
    for index, (model, expert) in enumerate(zip(models, params, strict=True)):
        mask = keep_masks[index] if keep_masks is not None else None
        sparse = sparsify_delta(spec.sparsifier, model, expert, global_params, keep_mask=mask)
        weighted_sum += expert.weight * sparse
    signs = elect_signs(weighted_sum)
    assert ((torch.sign(merged) == signs) | (merged == 0)).all()


# ---------------------------------------------------------------------------------------------
# permutation of experts
# ---------------------------------------------------------------------------------------------


def permutation_case(data, shape, experts, dtype):
    base = dyadic_tensor(data.draw, shape, dtype)
    models = [base + dyadic_tensor(data.draw, shape, dtype) for _ in range(experts)]
    weights = data.draw(
        st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0]), min_size=experts, max_size=experts)
    )
    permutation = data.draw(st.permutations(range(experts)))
    return base, models, weights, permutation


@SETTINGS
@given(
    data=st.data(),
    method=st.sampled_from(DETERMINISTIC),
    shape=SHAPES,
    experts=st.integers(2, 4),
    dtype=DTYPES,
    density=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
    gamma=st.sampled_from([0.0, 0.1, 0.25]),
    normalize=st.booleans(),
    lambda_=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_permuting_experts_with_their_weights_changes_nothing(
    data, method, shape, experts, dtype, density, gamma, normalize, lambda_
):
    base, models, weights, permutation = permutation_case(data, shape, experts, dtype)
    params = [ExpertParams(w, density, gamma=gamma) for w in weights]
    global_params = GlobalParams(lambda_=lambda_, normalize=normalize)
    spec = METHODS[method]
    merged = merge_tensor(spec, base, models, params, global_params)
    permuted = merge_tensor(
        spec,
        base,
        [models[i] for i in permutation],
        [params[i] for i in permutation],
        global_params,
    )
    assert torch.equal(merged, permuted)


@SETTINGS
@given(
    data=st.data(),
    method=st.sampled_from(["dare_linear", "dare_ties"]),
    shape=SHAPES,
    experts=st.integers(2, 4),
    dtype=DTYPES,
    normalize=st.booleans(),
)
def test_permuting_dare_experts_with_their_masks_changes_nothing(
    data, method, shape, experts, dtype, normalize
):
    base, models, weights, permutation = permutation_case(data, shape, experts, dtype)
    # dyadic densities keep δ / d exact
    densities = data.draw(
        st.lists(st.sampled_from([0.25, 0.5]), min_size=experts, max_size=experts)
    )
    params = [ExpertParams(w, d) for w, d in zip(weights, densities, strict=True)]
    numel = base.numel()
    masks = [
        torch.tensor(data.draw(st.lists(st.booleans(), min_size=numel, max_size=numel))).reshape(
            shape
        )
        for _ in range(experts)
    ]
    spec, global_params = METHODS[method], GlobalParams(normalize=normalize)
    merged = merge_tensor(spec, base, models, params, global_params, keep_masks=masks)
    permuted = merge_tensor(
        spec,
        base,
        [models[i] for i in permutation],
        [params[i] for i in permutation],
        global_params,
        keep_masks=[masks[i] for i in permutation],
    )
    assert torch.equal(merged, permuted)


@SETTINGS
@given(
    data=st.data(),
    shape=SHAPES,
    experts=st.integers(2, 4),
    window=density_epsilon(),
    normalize=st.booleans(),
)
def test_permuting_della_linear_experts_with_their_masks_changes_nothing(
    data, shape, experts, window, normalize
):
    base, models, weights, permutation = permutation_case(data, shape, experts, torch.float64)
    params = [ExpertParams(w, *window) for w in weights]
    numel = base.numel()
    masks = [
        torch.tensor(data.draw(st.lists(st.booleans(), min_size=numel, max_size=numel))).reshape(
            shape
        )
        for _ in range(experts)
    ]
    spec, global_params = METHODS["della_linear"], GlobalParams(normalize=normalize)
    merged = merge_tensor(spec, base, models, params, global_params, keep_masks=masks)
    permuted = merge_tensor(
        spec,
        base,
        [models[i] for i in permutation],
        [params[i] for i in permutation],
        global_params,
        keep_masks=[masks[i] for i in permutation],
    )
    # δ / k_i is not exact, so only the summation order may differ
    torch.testing.assert_close(merged, permuted, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# experts equal to the base
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(
    data=st.data(),
    method=st.sampled_from(sorted(METHODS)),
    shape=SHAPES,
    experts=st.integers(1, 4),
    dtype=DTYPES,
    window=density_epsilon(),
    gamma=st.sampled_from([0.0, 0.1, 0.3]),
    normalize=st.booleans(),
    lambda_=st.floats(0.1, 3.0),
    rescale=st.sampled_from(list(Rescale)),
    seed=st.integers(0, 2**31),
)
def test_experts_equal_to_the_base_give_the_base_back(
    data, method, shape, experts, dtype, window, gamma, normalize, lambda_, rescale, seed
):
    spec = METHODS[method]
    if spec.on_deltas:
        base = float_tensor(data.draw, shape, dtype)
        weights = data.draw(st.lists(st.floats(-2.0, 2.0), min_size=experts, max_size=experts))
    else:
        # linear averages the models: exact only for dyadic values and weights, normalized
        base = dyadic_tensor(data.draw, shape, dtype)
        weights = data.draw(
            st.lists(st.sampled_from([0.25, 0.5, 1.0]), min_size=experts, max_size=experts)
        )
        normalize = True
    params = [ExpertParams(w, *window, gamma=gamma) for w in weights]
    global_params = GlobalParams(lambda_=lambda_, normalize=normalize, rescale=rescale)
    models = [base.clone() for _ in range(experts)]
    merged = merge_tensor(spec, base, models, params, global_params, seeded_draws(seed, shape))
    assert merged.dtype == dtype
    assert torch.equal(merged, base)


# ---------------------------------------------------------------------------------------------
# d = 1 and ε = 0
# ---------------------------------------------------------------------------------------------


def refuse_draws(*_args):
    raise AssertionError("uniform draws were requested where none are needed")


@SETTINGS
@given(
    data=st.data(),
    pair=st.sampled_from(
        [
            ("dare_linear", "task_arithmetic"),
            ("della_linear", "task_arithmetic"),
            ("dare_ties", "ties"),
            ("della", "ties"),
            ("breadcrumbs", "task_arithmetic"),
            ("breadcrumbs_ties", "ties"),
        ]
    ),
    shape=SHAPES,
    experts=st.integers(1, 3),
    dtype=DTYPES,
    epsilon=st.floats(0.0, 0.5),
    normalize=st.booleans(),
    rescale=st.sampled_from(list(Rescale)),
)
def test_density_one_is_the_unsparsified_method(
    data, pair, shape, experts, dtype, epsilon, normalize, rescale
):
    method, reference = pair
    base = float_tensor(data.draw, shape, dtype)
    models = [float_tensor(data.draw, shape, dtype) for _ in range(experts)]
    weights = data.draw(st.lists(st.floats(0.1, 2.0), min_size=experts, max_size=experts))
    global_params = GlobalParams(normalize=normalize, rescale=rescale)
    merged = merge_tensor(
        METHODS[method],
        base,
        models,
        [ExpertParams(w, 1.0, epsilon, gamma=0.2) for w in weights],
        global_params,
        uniform=refuse_draws,
    )
    expected = merge_tensor(
        METHODS[reference],
        base,
        models,
        [ExpertParams(w, 1.0) for w in weights],
        global_params,
        uniform=refuse_draws,
    )
    assert torch.equal(merged, expected)


@SETTINGS
@given(
    data=st.data(),
    shape=SHAPES,
    experts=st.integers(1, 3),
    density=st.floats(0.05, 0.95),
    normalize=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_epsilon_zero_makes_della_linear_a_uniform_dare_drop(
    data, shape, experts, density, normalize, seed
):
    base = float_tensor(data.draw, shape)
    models = [float_tensor(data.draw, shape) for _ in range(experts)]
    weights = data.draw(st.lists(st.floats(0.1, 2.0), min_size=experts, max_size=experts))
    global_params = GlobalParams(normalize=normalize)
    draws = seeded_draws(seed, shape)

    def merge(method: str) -> torch.Tensor:
        params = [ExpertParams(w, density, 0.0) for w in weights]
        return merge_tensor(METHODS[method], base, models, params, global_params, draws)

    della, dare = merge("della_linear"), merge("dare_linear")
    torch.testing.assert_close(della, dare, rtol=1e-6, atol=1e-6)
    # and the masks are the same: the same entries of each expert survive
    for index, model in enumerate(models):
        delta = model - base
        for sparsifier in (Sparsifier.MAGPRUNE, Sparsifier.RANDOM):
            sparse = sparsify_delta(
                sparsifier,
                delta,
                ExpertParams(1.0, density, 0.0),
                global_params,
                uniform=lambda index=index: draws(index),
            )
            assert torch.equal(sparse != 0, (draws(index) < density) & (delta != 0))
