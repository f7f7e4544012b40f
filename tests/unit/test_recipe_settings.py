"""Gradients and filters against their closed form (MERGEKIT-SEMANTICS.md, "Parameters").

t = idx/(n−1) for layer idx of n (1 for one layer), 0 outside the layers; a gradient of k
values at t is the linear interpolation between v[⌊t(k−1)⌋] and the next; the first filter that
is absent, "*" or a substring of the tensor name wins, and a scope whose filters match nothing
falls through to the next (the model's own, the top level, the method's default).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from della_cli.methods import Rescale
from della_cli.recipe import Recipe, parse_recipe
from della_cli.recipe_settings import layer_count, layer_position

ATTN = "model.layers.{}.self_attn.q_proj.weight"
MLP = "model.layers.{}.mlp.up_proj.weight"
OUTSIDE = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def recipe(method: str = "ties", layers: int = 6, top: Any = None, **own: Any) -> Recipe:
    """A recipe of two models, the first with parameters ``own``, the top level ``top``."""
    data: dict = {"merge_method": method, "base_model": "base"}
    data["models"] = [{"model": "a", "parameters": own} if own else {"model": "a"}, {"model": "b"}]
    if top:
        data["parameters"] = top
    return parse_recipe(yaml.safe_dump(data)).with_layers(layers)


@pytest.mark.parametrize(
    ("gradient", "layers", "expected"),
    [
        ([0, 0.5, 1], 6, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        ([1, 0], 3, [1.0, 0.5, 0.0]),
        ([0.2, 0.8, 0.4], 5, [0.2, 0.5, 0.8, 0.6, 0.4]),
        ([0.3], 4, [0.3] * 4),
        ([0, 0.5, 1], 1, [1.0]),  # one layer: t = 1
        ([0.1, 0.9], 2, [0.1, 0.9]),
    ],
)
def test_weight_gradient_is_interpolated_over_the_layers(gradient, layers, expected):
    r = recipe(layers=layers, weight=gradient)
    got = [r.expert_params(0, MLP.format(i)).weight for i in range(layers)]
    assert got == pytest.approx(expected, abs=1e-12)
    for name in OUTSIDE:  # outside the layers: t = 0, the first value
        assert r.expert_params(0, name).weight == pytest.approx(gradient[0])


def test_every_numeric_parameter_and_the_top_level_take_gradients():
    r = recipe(
        "della",
        top={"density": [0.5, 0.9], "epsilon": [0.0, 0.1], "lambda": [1.0, 2.0]},
        weight=[2, 4],
    )
    last = MLP.format(5)
    assert r.expert_params(0, last).density == pytest.approx(0.9)
    assert r.expert_params(1, MLP.format(1)).density == pytest.approx(0.58)
    assert r.expert_params(0, MLP.format(4)).epsilon == pytest.approx(0.08)
    assert r.expert_params(0, MLP.format(2)).weight == pytest.approx(2.8)
    assert r.expert_params(1, last).weight == 1.0  # della's default where nothing is set
    assert r.global_params(MLP.format(3)).lambda_ == pytest.approx(1.6)
    assert r.global_params("lm_head.weight").lambda_ == 1.0
    assert r.global_params().lambda_ == 1.0
    gamma = recipe("breadcrumbs", top={"density": 0.5}, gamma=[0.0, 0.2])
    assert gamma.expert_params(0, MLP.format(5)).gamma == pytest.approx(0.2)


def test_booleans_step_instead_of_interpolating():
    r = recipe("dare_ties", top={"normalize": [True, False], "rescale": [True, "l1", False]})
    steps = [r.global_params(MLP.format(i)).normalize for i in range(6)]
    assert steps == [True] * 5 + [False]  # v[⌊t·(k−1)⌋]: only t = 1 reaches the second
    rescales = [r.global_params(MLP.format(i)).rescale for i in range(6)]
    assert rescales == [Rescale.KEEP_PROB] * 3 + [Rescale.L1] * 2 + [Rescale.NONE]


FILTERS = [{"filter": "self_attn", "value": 0.2}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (ATTN.format(0), 0.2),
        (MLP.format(3), 0.7),
        ("model.layers.3.input_layernorm.weight", 0.5),
        ("lm_head.weight", 0.5),
    ],
)
def test_the_first_matching_filter_wins(name, expected):
    assert recipe(weight=FILTERS).expert_params(0, name).weight == expected
    as_star = [*FILTERS[:2], {"filter": "*", "value": 0.5}]
    assert recipe(weight=as_star).expert_params(0, name).weight == expected


def test_a_filter_matching_nothing_falls_through_to_the_next_scope():
    r = recipe(
        top={"weight": [{"filter": "self_attn", "value": 3.0}], "density": 0.4},
        weight=[{"filter": "mlp", "value": 0.7}],
    )
    assert r.expert_params(0, MLP.format(0)).weight == 0.7  # its own
    assert r.expert_params(0, ATTN.format(0)).weight == 3.0  # the top level's
    assert r.expert_params(0, "lm_head.weight").weight == 1.0  # the default
    assert r.expert_params(1, ATTN.format(1)).weight == 3.0
    assert r.expert_params(0, "").weight == 1.0  # an empty name matches no filter


def test_a_single_mapping_is_a_filter_and_a_filter_value_may_be_a_gradient():
    r = recipe(weight={"filter": "mlp", "value": [0, 1]}, density=[{"value": [0.2, 0.6]}])
    assert r.expert_params(0, MLP.format(1)).weight == pytest.approx(0.2)
    assert r.expert_params(0, ATTN.format(1)).weight == 1.0
    assert r.expert_params(0, ATTN.format(5)).density == pytest.approx(0.6)
    assert r.expert_params(0, "model.embed_tokens.weight").density == pytest.approx(0.2)


def test_plain_recipes_need_no_layer_count():
    r = parse_recipe(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a"}]}))
    assert not r.varies_by_tensor and r.layers is None
    assert r.expert_params(0, MLP.format(7)).weight == 1.0
    assert recipe(weight=[0, 1]).varies_by_tensor


def test_layer_position_and_count():
    assert layer_position("model.layers.3.mlp.up_proj.weight", 7) == 0.5
    assert layer_position("transformer.h.1.attn.c_attn.weight", 3) == 0.5
    assert layer_position("model.embed_tokens.weight", None) == 0.0
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0
    with pytest.raises(ValueError, match="layer count is not known"):
        layer_position("model.layers.0.mlp.up_proj.weight", None)
    assert layer_count({"num_hidden_layers": 4}, []) == 4
    assert layer_count({"n_layer": 3}, []) == 3
    assert layer_count({"text_config": {"num_hidden_layers": 5}}, []) == 5
    assert layer_count(None, [MLP.format(0), MLP.format(8), "lm_head.weight"]) == 9
    assert layer_count({}, ["lm_head.weight"]) is None
