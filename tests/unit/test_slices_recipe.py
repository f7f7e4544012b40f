"""slices: and modules: as read (recipe_slices): the layer map, where each tensor's parameters
come from (source, slice, module, top level, default), gradients placed per slice, and the
one-line errors naming the field. Expected values worked by hand from MERGEKIT-SEMANTICS.md."""

from __future__ import annotations

import pytest
import yaml

from della_cli.errors import RecipeError
from della_cli.layer_map import LayerMap, output_config
from della_cli.recipe import parse_recipe
from della_cli.recipe_slices import describe_layer_map, input_name, place_of

FRANKEN = """
merge_method: passthrough
slices:
  - sources: [{model: base, layer_range: [0, 4]}]
  - sources: [{model: expert, layer_range: [2, 6], parameters: {scale: [1, 2]}}]
"""

# Two slices over a base and two experts, with parameters at every level.
SLICED = """
merge_method: ties
base_model: base
slices:
  - sources:
      - {model: base, layer_range: [0, 3]}
      - {model: a, layer_range: [0, 3], parameters: {weight: [0, 1], density: 0.5}}
      - {model: b, layer_range: [1, 4]}
    parameters:
      density: [{filter: mlp, value: 0.3}]
  - sources:
      - {model: base, layer_range: [3, 4]}
      - {model: a, layer_range: [3, 4], parameters: {weight: [{filter: layers.3., value: 7}]}}
      - {model: b, layer_range: [5, 6]}
    parameters: {lambda: 0.5}
parameters: {weight: 0.25, density: 0.9, lambda: [1, 2]}
"""

MODULES = """
merge_method: task_arithmetic
base_model: base
modules:
  default:
    models:
      - {model: a, parameters: {weight: 2}}
      - {model: b}
    parameters: {weight: 0.5, lambda: 0.75}
parameters: {weight: 0.1, lambda: 3}
"""


@pytest.mark.parametrize(
    ("name", "slice_index", "offset", "t"),
    [
        ("model.embed_tokens.weight", 0, None, 0.0),  # before the layers: the first slice
        ("model.layers.0.mlp.up_proj.weight", 0, 0, 0.0),
        ("model.layers.2.mlp.up_proj.weight", 0, 2, 2 / 3),
        ("model.layers.3.self_attn.q_proj.weight", 0, 3, 1.0),
        ("model.layers.4.self_attn.q_proj.weight", 1, 0, 0.0),  # each slice restarts at 0
        ("model.layers.7.input_layernorm.weight", 1, 3, 1.0),
        ("model.norm.weight", 1, None, 0.0),  # after the layers: the last slice
        ("lm_head.weight", 1, None, 0.0),
    ],
)
def test_each_output_tensor_has_its_slice_offset_and_t(name, slice_index, offset, t):
    slices = parse_recipe(FRANKEN).schema.slices
    place = place_of(slices, name)
    assert (place.slice_index, place.offset) == (slice_index, offset)
    assert place.t == pytest.approx(t)


def test_a_one_layer_slice_has_t_1():
    slices = parse_recipe(SLICED).schema.slices
    assert place_of(slices, "model.layers.3.mlp.up_proj.weight").t == 1.0


@pytest.mark.parametrize(
    ("name", "layer", "expected"),
    [
        ("model.layers.4.mlp.up_proj.weight", 2, "model.layers.2.mlp.up_proj.weight"),
        ("transformer.h.0.attn.c_attn.weight", 11, "transformer.h.11.attn.c_attn.weight"),
        ("model.norm.weight", 3, "model.norm.weight"),
    ],
)
def test_input_names_take_the_source_layer(name, layer, expected):
    assert input_name(name, layer) == expected


def test_the_layer_map_in_one_line():
    recipe = parse_recipe(FRANKEN)
    line = describe_layer_map(recipe.schema.slices, lambda ref: ref)
    assert line == "layers 0-3 ← base 0-3; 4-7 ← expert 2-5"
    sliced = describe_layer_map(parse_recipe(SLICED).schema.slices, lambda ref: ref)
    assert sliced == "layers 0-2 ← base 0-2 + a 0-2 + b 1-3; 3 ← base 3 + a 3 + b 5"


def test_the_models_a_sliced_recipe_reads_are_listed_once_in_order():
    assert parse_recipe(SLICED).model_refs == ["base", "a", "b"]
    assert parse_recipe(FRANKEN).model_refs == ["base", "expert"]


# (model, output tensor) -> weight, density under SLICED, by hand:
# slice 0 (layers 0-2, t = 0, 0.5, 1): a's own weight [0, 1] at t; b falls to the top 0.25.
# density: a's own 0.5; b: the slice's filter (mlp) 0.3, else the top 0.9.
# slice 1 (layer 3, t = 1): a's own filter matches its input name 'layers.3.' -> 7; b has no
# own parameters: 0.25. Outside the layers: embeddings slice 0 at t = 0, norm slice 1 at t = 0.
PRECEDENCE = [
    ("a", "model.layers.0.mlp.up_proj.weight", 0.0, 0.5),
    ("a", "model.layers.1.self_attn.q_proj.weight", 0.5, 0.5),
    ("a", "model.layers.2.mlp.up_proj.weight", 1.0, 0.5),
    ("b", "model.layers.1.mlp.up_proj.weight", 0.25, 0.3),
    ("b", "model.layers.1.self_attn.q_proj.weight", 0.25, 0.9),
    ("a", "model.layers.3.mlp.up_proj.weight", 7.0, 0.9),
    ("b", "model.layers.3.mlp.up_proj.weight", 0.25, 0.9),
    ("a", "model.embed_tokens.weight", 0.0, 0.5),
    ("b", "model.embed_tokens.weight", 0.25, 0.9),
    ("a", "model.norm.weight", 0.25, 0.9),  # slice 1's filter names layers.3., not the norm
]


@pytest.mark.parametrize(("model", "name", "weight", "density"), PRECEDENCE)
def test_source_then_slice_then_top_level(model, name, weight, density):
    recipe = parse_recipe(SLICED)
    params = recipe.expert_params(recipe.model_refs.index(model), name)
    assert (params.weight, params.density) == (pytest.approx(weight), pytest.approx(density))


def test_filters_of_a_source_match_its_own_input_name():
    """b's slice-1 layer is its layer 5: a filter on 'layers.5.' matches there, on the output's
    'layers.3.' does not."""
    text = SLICED.replace(
        "{model: b, layer_range: [5, 6]}",
        "{model: b, layer_range: [5, 6], parameters: {weight: [{filter: layers.5., value: 9}]}}",
    )
    recipe = parse_recipe(text)
    assert recipe.expert_params(2, "model.layers.3.mlp.up_proj.weight").weight == 9.0


@pytest.mark.parametrize(
    ("name", "lambda_"),
    [
        ("model.layers.0.mlp.up_proj.weight", 1.0),  # the top gradient [1, 2] at t = 0
        ("model.layers.1.mlp.up_proj.weight", 1.5),  # at t = 0.5 of slice 0
        ("model.layers.3.mlp.up_proj.weight", 0.5),  # slice 1's own lambda
        ("model.embed_tokens.weight", 1.0),
        ("model.norm.weight", 0.5),
    ],
)
def test_merge_wide_values_come_from_the_slice_then_the_top(name, lambda_):
    assert parse_recipe(SLICED).global_params(name).lambda_ == pytest.approx(lambda_)


@pytest.mark.parametrize(
    ("model", "weight"),
    [("a", 2.0), ("b", 0.5)],  # own, else the module's (not the top level's 0.1)
)
def test_module_parameters_sit_between_the_models_and_the_top_level(model, weight):
    recipe = parse_recipe(MODULES)
    index = recipe.model_refs.index(model)
    assert recipe.expert_params(index, "model.layers.0.mlp.up_proj.weight").weight == weight
    assert recipe.global_params("model.norm.weight").lambda_ == 0.75
    assert recipe.schema.slices is None  # modules: default: models is models: with a scope


def test_whole_model_slices_read_as_models():
    text = """
merge_method: ties
base_model: base
slices:
  - sources:
      - {model: base, layer_range: [0, 2]}
      - {model: a, layer_range: [0, 2], parameters: {weight: [1, 3], density: 0.5}}
"""
    recipe = parse_recipe(text)
    models = parse_recipe(
        "merge_method: ties\nbase_model: base\nmodels:\n"
        "  - {model: a, parameters: {weight: [1, 3], density: 0.5}}\n"
    ).with_layers(2)
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        index = recipe.model_refs.index("a")
        assert recipe.expert_params(index, name) == models.expert_params(0, name)


def bad(text: str) -> str:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text)
    message = str(caught.value)
    assert "\n" not in message
    return message


SLICE = "  - sources: [{model: base, layer_range: [0, 2]}, {model: a, layer_range: [0, 2]}]\n"
BAD = [
    ("merge_method: linear\nslices: []\n", "slices: must list at least one slice"),
    ("merge_method: linear\nslices:\n  - sources: []\n", "slices[0].sources: must list"),
    (
        "merge_method: linear\nslices:\n  - {sources: [{model: a}]}\n",
        "slices[0].sources[0].layer_range: is required",
    ),
    (
        "merge_method: linear\nslices:\n  - {sources: [{model: a, layer_range: [3, 1]}]}\n",
        "slices[0].sources[0].layer_range: must be [start, end)",
    ),
    (
        "merge_method: linear\nslices:\n  - {sources: [{model: a, layer_range: [-1, 2]}]}\n",
        "slices[0].sources[0].layer_range: must be [start, end)",
    ),
    (
        "merge_method: linear\nslices:\n"
        + SLICE
        + "  - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [1, 2]}]\n",
        "slices[1].sources[1].layer_range: covers 1 layers but slices[1].sources[0] covers 2",
    ),
    (
        "merge_method: linear\nslices:\n  - sources: [{layer_range: [0, 2]}]\n",
        "slices[0].sources[0].model: must be a model's name",
    ),
    (
        "merge_method: linear\nslices:\n  - sources: [{model: a, layer_range: [0, 1]}, "
        "{model: a, layer_range: [1, 2]}]\n",
        "slices[0].sources[1].model: 'a' is listed twice in this slice",
    ),
    (
        "merge_method: ties\nbase_model: base\nslices:\n  - sources: [{model: a, "
        "layer_range: [0, 2]}]\n",
        "slices[0].sources: the base_model 'base' is not among them",
    ),
    (
        "merge_method: ties\nslices:\n" + SLICE,
        "slices[0].base_model: ties merges into a base and this slice has none",
    ),
    ("merge_method: passthrough\nslices:\n" + SLICE, "slices[0].sources: passthrough takes"),
    (
        "merge_method: linear\nslices:\n  - sources: [{model: a, layer_range: [0, 2], "
        "parameters: {wieght: 1}}]\n",
        "slices[0].sources[0].parameters.wieght: unknown key; did you mean 'weight'?",
    ),
    (
        "merge_method: linear\nslices:\n  - {sourcs: []}\n",
        "slices[0].sourcs: unknown key; did you mean 'sources'?",
    ),
    (
        "merge_method: ties\nbase_model: base\nslices:\n" + SLICE + "    parameters: "
        "{density: 1.5}\n",
        "slices[0].parameters.density: must be in (0, 1]",
    ),
    (
        "merge_method: della\nbase_model: base\nslices:\n  - sources: [{model: base, "
        "layer_range: [0, 2]}, {model: a, layer_range: [0, 2], parameters: {density: 0.9}}]\n"
        "    parameters: {epsilon: 0.2}\n",
        "slices[0].parameters.epsilon: keep probabilities d ± ε must lie in (0, 1]",
    ),
    (
        "merge_method: slerp\nbase_model: base\nslices:\n" + SLICE,
        "parameters.t: slerp needs t",
    ),
    ("merge_method: linear\nmodels: [{model: a}]\nslices:\n" + SLICE, "slices: give one of"),
    (
        "merge_method: linear\nmodules: {default: {models: [{model: a}]}}\nmodels: [{model: a}]\n",
        "modules: give one of models, slices or modules, not models too",
    ),
    (
        "merge_method: linear\nmodules: {text_decoder: {models: [{model: a}]}}\n",
        "modules.text_decoder: unknown module",
    ),
    (
        "merge_method: linear\nmodules: {default: {models: [{model: a}], slices: [{}]}}\n",
        "modules.default: give exactly one of models or slices",
    ),
    (
        "merge_method: linear\nmodules: {default: {models: [{model: a}], "
        "parameters: {weight: x}}}\n",
        "modules.default.parameters.weight: must be a number",
    ),
]


@pytest.mark.parametrize(("text", "prefix"), BAD, ids=[p for _, p in BAD])
def test_a_bad_slice_or_module_is_one_line_naming_the_field(text, prefix):
    message = bad(text)
    assert message.startswith(prefix), message


def test_a_slice_may_merge_into_its_own_base():
    recipe = parse_recipe(
        "merge_method: slerp\nbase_model: base\nparameters: {t: 0.5}\nslices:\n"
        + SLICE
        + "  - sources: [{model: a, layer_range: [2, 4]}, {model: b, layer_range: [2, 4]}]\n"
        "    base_model: b\n"
    )
    assert recipe.schema.slices[1].base_model == "b"


CONFIG_CASES = [
    # (config, layer map, expected)
    (
        {"num_hidden_layers": 4, "layer_types": ["s", "f", "s", "f"], "hidden_size": 8},
        LayerMap(5, "", {"layer_types": ["s", "f", "s", "s", "f"], "no_rope_layers": [1] * 5}),
        {"num_hidden_layers": 5, "layer_types": ["s", "f", "s", "s", "f"], "hidden_size": 8},
    ),
    ({"n_layer": 2}, LayerMap(3, ""), {"n_layer": 3}),
    (
        {"text_config": {"num_hidden_layers": 2, "layer_types": ["a", "b"]}, "x": 1},
        LayerMap(1, "", {"layer_types": ["b"]}),
        {"text_config": {"num_hidden_layers": 1, "layer_types": ["b"]}, "x": 1},
    ),
]


@pytest.mark.parametrize(("config", "layer_map", "expected"), CONFIG_CASES)
def test_output_config_has_the_layers_written(config, layer_map, expected):
    before = yaml.safe_dump(config)
    assert output_config(config, layer_map) == expected
    assert yaml.safe_dump(config) == before  # the reference's config is left as it was
    assert output_config(config, None) is config


class _Reader:
    def __init__(self, config: dict, layers: int):
        self.config = config
        self.tensors = {f"model.layers.{i}.mlp.up_proj.weight": None for i in range(layers)}


def test_per_layer_lists_come_from_each_slices_own_model():
    """A two-layer model first, a four-layer one second: each output layer's entry is the one
    its own model's config gives its source layer (the first config has no entry 3)."""
    from della_cli.layer_map import _per_layer_values, _Slicer

    recipe = parse_recipe(
        "merge_method: passthrough\nslices:\n"
        "  - sources: [{model: short, layer_range: [0, 2]}]\n"
        "  - sources: [{model: long, layer_range: [2, 4]}]\n"
    )
    short = _Reader({"num_hidden_layers": 2, "layer_types": ["a", "b"], "mlp_only_layers": [0]}, 2)
    long = _Reader(
        {"num_hidden_layers": 4, "layer_types": ["w", "x", "y", "z"], "mlp_only_layers": [3]}, 4
    )
    values = _per_layer_values(_Slicer(recipe, None, [short, long]))
    assert values == {"layer_types": ["a", "b", "y", "z"], "mlp_only_layers": [0, 3]}
    del long.config["layer_types"]
    assert "layer_types" not in _per_layer_values(_Slicer(recipe, None, [short, long]))


def test_residual_weight_is_read_and_ignored_with_a_note():
    recipe = parse_recipe(
        FRANKEN.replace(
            "  - sources: [{model: base", "  - residual_weight: 0.5\n    sources: [{model: base"
        )
    )
    assert recipe.schema.notes == ("slices[0].residual_weight: ignored, as mergekit ignores it",)
    assert parse_recipe(FRANKEN).schema.notes == ()
