"""The recipe schema: every shipped example parses, every rule fails with its field path first.

Bad recipes are a table: each row is a valid DELLA recipe with a few edits, and the exact start
of the one-line error it must produce (``models.1.parameters.epsilon: ...``), plus fragments the
rest of the message must contain (the offending value, the fix).
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from della_cli.errors import RecipeError, UsageError
from della_cli.methods import METHODS, Rescale
from della_cli.recipe import DEFAULT_GAMMA, load_recipe, parse_recipe

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPE_FILES = sorted(RECIPES_DIR.glob("*.yaml"))

VALID: dict[str, Any] = {
    "merge_method": "della",
    "base_model": "base",
    "models": [{"model": "lm"}, {"model": "math"}],
    "parameters": {"density": 0.7, "epsilon": 0.07},
}
DROP = object()  # as a value in an edit: remove the key


def edited(*edits: tuple[str, Any]) -> str:
    """VALID as YAML text, with each (dotted path, value) edit applied in order.

    Missing mappings along the path are created; a value of DROP deletes the key. Dumped with
    PyYAML so that NaN and infinity come out as YAML's ``.nan`` and ``.inf``.
    """
    recipe = copy.deepcopy(VALID)
    for path, value in edits:
        *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
        node: Any = recipe
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
        if value is DROP:
            del node[last]
        else:
            node[last] = value
    return yaml.safe_dump(recipe, sort_keys=False)


def method(name: str, *edits: tuple[str, Any]) -> str:
    """A recipe of method ``name`` with parameters it accepts, then ``edits``."""
    base_edits: list[tuple[str, Any]] = [("merge_method", name)]
    if name not in ("della", "della_linear"):
        base_edits.append(("parameters.epsilon", DROP))
    if name in ("linear", "task_arithmetic"):
        base_edits.append(("parameters.density", DROP))
    if name == "linear":
        base_edits.append(("base_model", DROP))
    return edited(*base_edits, *edits)


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text)
    message = str(caught.value)
    assert "\n" not in message, "a recipe error is one line"
    return message


# --- every shipped example -------------------------------------------------------------------


def test_there_is_one_example_recipe_per_method():
    methods = {load_recipe(path).method.name for path in RECIPE_FILES}
    assert methods == set(METHODS)
    assert {path.stem for path in RECIPE_FILES} == set(METHODS)
    assert (RECIPES_DIR / "README.md").is_file()


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda path: path.name)
def test_example_recipe_parses_and_explains_itself(path: Path):
    recipe = load_recipe(path)
    assert recipe.method.name == path.stem
    assert recipe.path == path
    assert recipe.text == path.read_text()
    assert path.read_text().startswith("#"), "each example starts with a comment header"
    assert recipe.model_refs, "each example lists models"
    for index in range(len(recipe.model_refs)):
        params = recipe.expert_params(index, "model.layers.0.mlp.up_proj.weight")
        shared = recipe.method_values("model.layers.0.mlp.up_proj.weight")
        for name in recipe.method.required_parameters:
            assert (shared[name] if name in shared else getattr(params, name)) is not None
    assert f"`{path.name}`" in (RECIPES_DIR / "README.md").read_text()


def test_della_example_uses_the_papers_lm_math_code_setting():
    recipe = load_recipe(RECIPES_DIR / "della.yaml")
    assert recipe.schema.base_model == "meta-llama/Llama-2-13b-hf"
    assert len(recipe.model_refs) == 3
    for index in range(3):
        params = recipe.expert_params(index, "lm_head.weight")
        assert (params.weight, params.density, params.epsilon) == (1.0, 0.7, 0.07)
    assert recipe.global_params().lambda_ == 1.1
    assert recipe.global_params().normalize is True
    assert recipe.global_params().rescale is Rescale.KEEP_PROB


# --- bad recipes, one line each, field path first -------------------------------------------

BAD_RECIPES = [
    # YAML and shape
    pytest.param(
        "merge_method: della\nmodels: [{model: lm}, {model: math}\nseed: 1\n",
        "recipe: line 3, column 1: invalid YAML",
        ["expected ',' or ']'"],
        id="yaml-unclosed-list",
    ),
    pytest.param(
        "merge_method: della\nbase_model: base\n  models: lm\n",
        "recipe: line 3, column 9: invalid YAML",
        ["mapping values are not allowed here"],
        id="yaml-bad-indent",
    ),
    pytest.param(
        "merge_method: della\n\tmodels: []\n",
        "recipe: line 2, column 1: invalid YAML",
        ["'\\t'"],
        id="yaml-tab",
    ),
    pytest.param("- lm\n- math\n", "recipe: a recipe is a YAML mapping", [], id="list"),
    pytest.param("della\n", "recipe: a recipe is a YAML mapping", [], id="scalar"),
    pytest.param("", "recipe: a recipe is a YAML mapping", ["merge_method"], id="empty-file"),
    # unknown keys, with the nearest known key
    pytest.param(
        edited(("merge_methd", "della")),
        "merge_methd: unknown key; did you mean 'merge_method'?",
        [],
        id="unknown-top-level",
    ),
    pytest.param(
        edited(("densty", 0.7)),
        "densty: unknown key; known keys: merge_method, base_model, models, parameters",
        [],
        id="unknown-top-level-no-close-match",
    ),
    pytest.param(
        edited(("parameters.densty", 0.7)),
        "parameters.densty: unknown key; did you mean 'density'?",
        [],
        id="unknown-under-parameters",
    ),
    pytest.param(
        edited(("parameters.lamda", 1.1)),
        "parameters.lamda: unknown key; did you mean 'lambda'?",
        [],
        id="unknown-alias-lambda",
    ),
    pytest.param(
        edited(("models.1.parameters.densty", 0.7)),
        "models.1.parameters.densty: unknown key; did you mean 'density'?",
        [],
        id="unknown-under-model-parameters",
    ),
    pytest.param(
        edited(("models.0.modle", "lm")),
        "models.0.modle: unknown key; did you mean 'model'?",
        [],
        id="unknown-in-model-entry",
    ),
    # wrong types
    pytest.param(edited(("merge_method", 3)), "merge_method: must be a string, got 3", [], id="m3"),
    pytest.param(
        edited(("models", "lm")), "models: must be a list of models, got 'lm'", [], id="models-str"
    ),
    pytest.param(
        edited(("models", ["lm", "math"])),
        "models.0: must be a mapping, got 'lm'",
        [],
        id="model-entry-str",
    ),
    pytest.param(
        edited(("models.0.model", DROP)), "models.0.model: is required", [], id="model-missing"
    ),
    pytest.param(edited(("models.0.model", "")), "models.0.model:", [], id="model-empty"),
    pytest.param(
        edited(("parameters", [0.7])),
        "parameters: must be a mapping, got [0.7]",
        [],
        id="parameters-list",
    ),
    pytest.param(
        edited(("models.1.parameters", 0.7)),
        "models.1.parameters: must be a mapping, got 0.7",
        [],
        id="model-parameters-number",
    ),
    pytest.param(
        edited(("parameters.density", "high")),
        "parameters.density: must be a number, got 'high'",
        [],
        id="density-str",
    ),
    pytest.param(
        edited(("parameters.density", True)),
        "parameters.density: must be a number, got True",
        [],
        id="density-bool",
    ),
    pytest.param(
        edited(("models.0.parameters.weight", "heavy")),
        "models.0.parameters.weight: must be a number, got 'heavy'",
        [],
        id="weight-str",
    ),
    pytest.param(
        edited(("parameters.normalize", "maybe")),
        "parameters.normalize: must be true or false, got 'maybe'",
        [],
        id="normalize-str",
    ),
    pytest.param(
        edited(("parameters.rescale", "l2")),
        "parameters.rescale: must be true, false or l1, got 'l2'",
        [],
        id="rescale-unknown",
    ),
    pytest.param(
        edited(("parameters.int8_mask", "yes please")),
        "parameters.int8_mask: must be true or false",
        [],
        id="int8-mask-str",
    ),
    pytest.param(
        edited(("merge_method", None)), "merge_method: must be a string, got None", [], id="m-null"
    ),
    pytest.param(
        edited(("models.0.model", None)), "models.0.model: must be a string", [], id="model-null"
    ),
    pytest.param(
        edited(("parameters.normalize", 2)),
        "parameters.normalize: must be true or false, got 2",
        [],
        id="normalize-2",
    ),
    pytest.param(
        edited(("models.0.parameters.weight", 10**400)),
        "models.0.parameters.weight: must be a finite number, got an integer of 401 digits",
        [],
        id="weight-beyond-float",
    ),
    pytest.param(
        edited(("models.1.parameters.lambda_", 1.1)),
        "models.1.parameters.lambda_: unknown key; did you mean 'lambda'?",
        [],
        id="lambda-underscore",
    ),
    pytest.param(
        edited(("seed", 7.0)), "seed: must be an integer, got 7.0", [], id="seed-whole-float"
    ),
    pytest.param(edited(("seed", 1.5)), "seed: must be an integer, got 1.5", [], id="seed-float"),
    pytest.param(edited(("seed", "x")), "seed: must be an integer, got 'x'", [], id="seed-str"),
    pytest.param(edited(("seed", True)), "seed: must be an integer, got True", [], id="seed-bool"),
    # bounds
    pytest.param(
        edited(("parameters.density", 0)),
        "parameters.density: must be in (0, 1], got 0",
        [],
        id="density-0",
    ),
    pytest.param(
        edited(("models.1.parameters.density", 1.3)),
        "models.1.parameters.density: must be in (0, 1], got 1.3",
        [],
        id="density-1.3",
    ),
    pytest.param(
        edited(("parameters.density", float("nan"))),
        "parameters.density: must be a finite number, got nan",
        [],
        id="density-nan",
    ),
    pytest.param(
        edited(("parameters.density", float("inf"))),
        "parameters.density: must be a finite number, got inf",
        [],
        id="density-inf",
    ),
    pytest.param(
        edited(("parameters.lambda", float("-inf"))),
        "parameters.lambda: must be a finite number, got -inf",
        [],
        id="lambda-inf",
    ),
    pytest.param(
        edited(("models.0.parameters.weight", float("nan"))),
        "models.0.parameters.weight: must be a finite number, got nan",
        [],
        id="weight-nan",
    ),
    pytest.param(
        edited(("parameters.epsilon", -0.01)),
        "parameters.epsilon: must be in [0, 0.5), got -0.01",
        [],
        id="epsilon-negative",
    ),
    pytest.param(
        edited(("models.0.parameters.epsilon", 0.5)),
        "models.0.parameters.epsilon: must be in [0, 0.5), got 0.5",
        [],
        id="epsilon-0.5",
    ),
    pytest.param(
        method("breadcrumbs", ("parameters.gamma", 1.0)),
        "parameters.gamma: must be in [0, 1), got 1.0",
        [],
        id="gamma-1",
    ),
    pytest.param(
        method("breadcrumbs", ("parameters.gamma", 0.4)),
        "parameters.gamma: density 0.7 plus gamma 0.4 exceeds 1",
        ["lower one of them"],
        id="gamma-plus-density",
    ),
    pytest.param(edited(("seed", -1)), "seed:", ["0"], id="seed-negative"),
    pytest.param(edited(("seed", 2**63)), "seed:", [], id="seed-too-large"),
    pytest.param(
        edited(("out_dtype", "int8")),
        "out_dtype: must be one of 'float32', 'float16', 'bfloat16', 'float64', 'fp8' or "
        "'mxfp4', "
        "got 'int8'",
        [],
        id="out-dtype",
    ),
    pytest.param(
        edited(("dtype", "int8")), "dtype: must be one of", ["got 'int8'"], id="dtype-int8"
    ),
    pytest.param(
        edited(("tokenizer_source", "./nowhere")),
        "tokenizer_source: './nowhere' is neither base nor one of the models",
        [],
        id="tokenizer-source-unknown",
    ),
    # the MAGPRUNE window d ± ε must lie in (0, 1], named where epsilon was set
    pytest.param(
        edited(("parameters.density", 0.1), ("parameters.epsilon", 0.1)),
        "parameters.epsilon: keep probabilities d ± ε must lie in (0, 1]",
        ["density 0.1 and epsilon 0.1 give [0, 0.2]", "lower epsilon"],
        id="window-low-edge-top-level",
    ),
    pytest.param(
        edited(("parameters.density", 0.95), ("parameters.epsilon", 0.1)),
        "parameters.epsilon: keep probabilities d ± ε must lie in (0, 1]",
        ["[0.85, 1.05]"],
        id="window-high-top-level",
    ),
    pytest.param(
        edited(("models.1.parameters.epsilon", 0.45)),
        "models.1.parameters.epsilon: keep probabilities d ± ε must lie in (0, 1]",
        ["density 0.7 and epsilon 0.45 give [0.25, 1.15]"],
        id="window-epsilon-per-model",
    ),
    pytest.param(
        edited(("parameters.epsilon", 0.3), ("models.1.parameters.density", 0.2)),
        "parameters.epsilon: keep probabilities d ± ε must lie in (0, 1]",
        ["density 0.2 and epsilon 0.3"],
        id="window-density-per-model-epsilon-top-level",
    ),
    pytest.param(
        method("della_linear", ("models.0.parameters.density", 0.05)),
        "parameters.epsilon: keep probabilities",
        ["[-0.02, 0.12]"],
        id="window-della-linear",
    ),
    # models and base
    pytest.param(edited(("models", [])), "models: must list at least one model", [], id="no-model"),
    pytest.param(edited(("models", DROP)), "models: is required", [], id="models-missing"),
    pytest.param(
        edited(("merge_method", DROP)), "merge_method: is required", [], id="method-missing"
    ),
    pytest.param(
        edited(("merge_method", DROP), ("merge_methd", "della")),
        "merge_methd: unknown key; did you mean 'merge_method'?",
        [],
        id="method-misspelt-is-named-before-it-is-missing",
    ),
    pytest.param(
        edited(("models.0", {"modle": "lm"})),
        "models.0.modle: unknown key; did you mean 'model'?",
        [],
        id="model-misspelt-is-named-before-it-is-missing",
    ),
    pytest.param(
        edited(("models", [{"model": "lm"}, {"model": "math"}, {"model": "lm"}])),
        "models.2.model: 'lm' is listed twice (also models.0)",
        [],
        id="expert-twice",
    ),
    *[
        pytest.param(
            method(name, ("base_model", DROP)),
            f"base_model: {name} merges task vectors and needs a base_model",
            [],
            id=f"{name}-without-base",
        )
        for name in ("task_arithmetic", "ties", "della")
    ],
    pytest.param(
        edited(("merge_method", "dela")),
        "merge_method: unknown method 'dela'; did you mean 'della'?",
        [],
        id="method-typo",
    ),
    pytest.param(
        edited(("merge_method", "frankenmerge")),
        "merge_method: unknown method 'frankenmerge'; one of linear, task_arithmetic",
        ["della_linear"],
        id="method-unknown",
    ),
    # parameters the method does not use, and merge-wide ones set per model
    pytest.param(
        method("ties", ("parameters.rescale", True)),
        "parameters.rescale: ties does not use rescale",
        ["mergekit would scale its kept deltas by their L1 norm"],
        id="ties-rescale",
    ),
    # gradients and filter lists: each value checked, named by its place
    pytest.param(
        edited(("models.1.parameters.density", [0.5, 0.9, 1.3])),
        "models.1.parameters.density[2]: must be in (0, 1], got 1.3",
        [],
        id="density-gradient-out-of-range",
    ),
    pytest.param(
        edited(("parameters.density", [{"filter": "mlp", "value": 0.5}, {"value": [0.7, -1]}])),
        "parameters.density[1].value[1]: must be in (0, 1], got -1.0",
        [],
        id="filtered-density-gradient",
    ),
    pytest.param(
        edited(("models.0.parameters.weight", [0.0, "half", 1.0])),
        "models.0.parameters.weight[1]: must be a number, got 'half'",
        [],
        id="weight-gradient-string",
    ),
    pytest.param(
        edited(("parameters.lambda", [])),
        "parameters.lambda: must not be an empty list",
        [],
        id="lambda-empty",
    ),
    pytest.param(
        edited(("parameters.epsilon", {"filter": "mlp", "valeu": 0.07})),
        "parameters.epsilon.valeu: unknown key; a filter entry has filter and value",
        [],
        id="epsilon-filter-typo",
    ),
    pytest.param(
        edited(("parameters.epsilon", [{"filter": 3, "value": 0.07}])),
        "parameters.epsilon[0].filter: must be a string, got 3",
        [],
        id="filter-not-a-string",
    ),
    pytest.param(
        edited(("parameters.density", [0.5, [0.7]])),
        "parameters.density[1]: a gradient is a list of plain values",
        [],
        id="nested-gradient",
    ),
    pytest.param(
        edited(("parameters.density", [0.2, 0.9, 0.2]), ("parameters.epsilon", [0.15, 0.15])),
        "parameters.epsilon: keep probabilities d ± ε must lie in (0, 1], but density 0.9 and "
        "epsilon 0.15 give [0.75, 1.05] at layer position t = 0.5; lower epsilon",
        [],
        id="window-fine-at-both-ends",
    ),
    pytest.param(
        edited(
            ("parameters.density", [{"filter": "mlp", "value": 0.95}, {"value": 0.5}]),
            ("parameters.epsilon", 0.1),
        ),
        "parameters.epsilon: keep probabilities d ± ε must lie in (0, 1], but density 0.95 and "
        "epsilon 0.1 give [0.85, 1.05] at layer position t = 0 for tensors containing 'mlp'",
        [],
        id="window-per-filter",
    ),
    pytest.param(
        edited(("slices", [{"sources": [{"model": "lm", "layer_range": [0, 2]}]}])),
        "slices: give one of models, slices or modules, not models too",
        [],
        id="slices",
    ),
    pytest.param(
        edited(("tokenizer", {"tokens": {"<|im_start|>": {"source": "./elsewhere"}}})),
        "tokenizer.tokens.<|im_start|>.source: './elsewhere' is neither the base_model nor one "
        "of the models",
        ["'base', 'lm', 'math'"],
        id="tokenizer-tokens-unknown-model",
    ),
    pytest.param(
        edited(
            (
                "tokenizer",
                {
                    "tokens": {
                        "<x>": {
                            "source": {"kind": "model_token", "model": "nowhere", "token_id": 1}
                        }
                    }
                },
            )
        ),
        "tokenizer.tokens.<x>.source.model: 'nowhere' is neither the base_model nor",
        [],
        id="tokenizer-tokens-unknown-model-token-model",
    ),
    pytest.param(
        edited(("tokenizer", {"tokens": {"<x>": {"source": {"kind": "mean"}}}})),
        "tokenizer.tokens.<x>.source.kind: must be zero or model_token, got 'mean'",
        [],
        id="tokenizer-tokens-kind",
    ),
    pytest.param(
        edited(
            (
                "tokenizer",
                {
                    "tokens": {
                        "<x>": {
                            "source": {
                                "kind": "model_token",
                                "model": "lm",
                                "token": "a",
                                "token_id": 3,
                            }
                        }
                    }
                },
            )
        ),
        "tokenizer.tokens.<x>.source: a model_token source takes exactly one of token and token_id",
        [],
        id="tokenizer-tokens-token-and-id",
    ),
    pytest.param(
        edited(
            (
                "tokenizer",
                {
                    "tokens": {
                        "<x>": {"source": {"kind": "model_token", "model": "lm", "token_id": -1}}
                    }
                },
            )
        ),
        "tokenizer.tokens.<x>.source.token_id: must be a non-negative integer, got -1",
        [],
        id="tokenizer-tokens-negative-id",
    ),
    pytest.param(
        edited(("tokenizer", {"tokens": {"<x>": {"force": True}}})),
        "tokenizer.tokens.<x>.force: force: true needs a source",
        [],
        id="tokenizer-tokens-force-without-source",
    ),
    pytest.param(
        edited(("tokenizer", {"tokens": {"<x>": {"sorce": "lm"}}})),
        "tokenizer.tokens.<x>.sorce: unknown key",
        ["source, force"],
        id="tokenizer-tokens-unknown-key",
    ),
    pytest.param(
        edited(("tokenizer", {"source": "base", "pad_to_multiple_of": 0})),
        "tokenizer.pad_to_multiple_of: must be a positive integer, got 0",
        [],
        id="tokenizer-pad-zero",
    ),
    pytest.param(
        edited(("tokenizer", {"source": "base"}), ("tokenizer_source", "base")),
        "tokenizer: give either tokenizer or tokenizer_source, not both",
        [],
        id="tokenizer-twice",
    ),
    pytest.param(
        edited(("tokenizer", {"sourse": "base"})),
        "tokenizer.sourse: unknown key; did you mean 'source'?",
        [],
        id="tokenizer-misspelt",
    ),
    pytest.param(
        edited(("tokenizer", "base")),
        "tokenizer: must be a mapping with a source, got 'base'",
        [],
        id="tokenizer-string",
    ),
    pytest.param(
        edited(("tokenizer", {"source": "./nowhere"})),
        "tokenizer_source: './nowhere' is neither base nor one of the models",
        [],
        id="tokenizer-source-unknown-model",
    ),
    pytest.param(
        edited(("chat_template", "vicuna")),
        "chat_template: 'vicuna' is neither auto, a named template (alpaca, chatml, exaone, "
        "llama3, mistral) nor a Jinja template",
        [],
        id="chat-template-unknown-name",
    ),
    pytest.param(
        edited(("chat_template", "{{ x }}")),
        "chat_template: '{{ x }}' is neither auto",
        ["at least 20 characters"],
        id="chat-template-too-short",
    ),
    pytest.param(
        edited(("chat_template", 3)),
        "chat_template: must be a string, got 3",
        [],
        id="chat-template-number",
    ),
    pytest.param(
        edited(("models.0.parameters.lambda", [1.0, 2.0])) + "models: []\n",
        "recipe: line",
        ["duplicate key 'models' with two values", "keep one"],
        id="duplicate-key-two-values",
    ),
    pytest.param(
        edited(("parameters.epsilon", DROP), ("parameters.density", 0.9)),
        "parameters.epsilon: keep probabilities d ± ε must lie in (0, 1]",
        ["epsilon 0.15 (mergekit's default)", "set epsilon"],
        id="default-epsilon-outside-window",
    ),
    pytest.param(
        method("ties", ("models.0.parameters.epsilon", "x"), ("parameters.densty", 0.5)),
        "parameters.densty: unknown key; did you mean 'density'?",
        [],
        id="unknown-to-mergekit-too",
    ),
    pytest.param(
        edited(("merge_method", "slerp"), ("models", DROP), ("slices", [{"sources": []}])),
        "slices[0].sources: must list at least one source",
        [],
        id="slerp-slices",
    ),
    pytest.param(
        method("nuslerp", ("parameters", {}), ("models", [{"model": "lm"}, {"model": "math"}])),
        "models.0.parameters.weight: nuslerp needs weight (relative weight); add it",
        [],
        id="nuslerp-without-weight",
    ),
    pytest.param(
        method("model_stock", ("parameters", {}), ("models", [{"model": "lm"}])),
        "models: model_stock takes at least 2 models besides the base, got 1",
        [],
        id="model-stock-one-model",
    ),
    pytest.param(
        method("sce", ("parameters", {"select_topk": 1.5})),
        "parameters.select_topk: must be in [0, 1], got 1.5",
        [],
        id="sce-topk-range",
    ),
    pytest.param(
        method(
            "multislerp",
            ("parameters", {}),
            (
                "models",
                [
                    {"model": "lm", "parameters": {"weight": 1}},
                    {"model": "math", "parameters": {"weight": -1}},
                ],
            ),
        ),
        "models: the multislerp weights sum to 0",
        [],
        id="multislerp-weights-sum-to-zero",
    ),
    pytest.param(
        method("passthrough", ("parameters", {})),
        "models: passthrough takes exactly 1 input (the base_model counts as one), got 3",
        [],
        id="passthrough-two-inputs",
    ),
    pytest.param(
        method("arcee_fusion", ("parameters", DROP), ("base_model", DROP)),
        "base_model: arcee_fusion merges into a base and needs a base_model",
        [],
        id="arcee-fusion-without-base",
    ),
    pytest.param(
        method("slerp", ("parameters", DROP), ("models", [{"model": "lm"}])),
        "parameters.t: slerp needs t (interpolation factor: 0 = base); add it",
        [],
        id="slerp-without-t",
    ),
    pytest.param(
        method("slerp", ("parameters", {"t": 0.5})),
        "models: slerp takes exactly 1 model besides the base, got 2",
        [],
        id="slerp-two-models",
    ),
    pytest.param(
        method("slerp", ("models", [{"model": "lm"}]), ("parameters", {"t": [0, "half"]})),
        "parameters.t[1]: must be a number, got 'half'",
        [],
        id="slerp-gradient",
    ),
    pytest.param(
        edited(("modules", {"text": {}})),
        "modules: give one of models, slices or modules, not models too",
        [],
        id="modules",
    ),
]


@pytest.mark.parametrize(("text", "prefix", "fragments"), BAD_RECIPES)
def test_bad_recipe_names_the_field_first(text: str, prefix: str, fragments: list[str]):
    message = error_of(text)
    assert message.startswith(prefix), message
    for fragment in fragments:
        assert fragment in message, message


def test_recipe_errors_are_usage_errors_exit_2():
    with pytest.raises(UsageError) as caught:
        parse_recipe(edited(("parameters.density", 2)))
    assert caught.value.exit_code == 2


def test_load_recipe_prefixes_yaml_errors_with_the_file(write_recipe):
    path = write_recipe("merge_method: della\nbase_model: base\n  models: lm\n")
    with pytest.raises(RecipeError, match=r"line 3, column 9: invalid YAML") as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: line 3, column 9: ")


def test_load_recipe_missing_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value) == f"{path}: no such recipe file"


def test_load_recipe_not_utf8(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("merge_method: d\xe9lla\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="cannot read the recipe") as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: ")


# --- what a valid recipe means ----------------------------------------------------------------


def test_per_model_parameters_override_top_level_defaults(write_recipe):
    recipe = load_recipe(
        write_recipe(
            edited(
                ("parameters.weight", 0.5),
                ("models.1.parameters.weight", 2.0),
                ("models.1.parameters.density", 0.5),
                ("models.1.parameters.epsilon", 0.1),
            )
        )
    )
    first = recipe.expert_params(0, "model.layers.0.self_attn.q_proj.weight")
    second = recipe.expert_params(1, "model.layers.0.self_attn.q_proj.weight")
    assert (first.weight, first.density, first.epsilon) == (0.5, 0.7, 0.07)
    assert (second.weight, second.density, second.epsilon) == (2.0, 0.5, 0.1)
    assert recipe.model_refs == ["lm", "math"]


def test_parameters_may_be_given_per_model_only():
    recipe = parse_recipe(
        edited(
            ("parameters", DROP),
            ("models.0.parameters", {"density": 0.6, "epsilon": 0.05}),
            ("models.1.parameters", {"density": 0.8, "epsilon": 0.1}),
        )
    )
    assert recipe.expert_params(0, "x").density == 0.6
    assert recipe.expert_params(1, "x").epsilon == 0.1


def test_weight_defaults_to_one():
    recipe = parse_recipe(edited())
    assert [recipe.expert_params(i, "x").weight for i in range(2)] == [1.0, 1.0]


def test_lambda_defaults_to_one_and_can_be_set():
    assert parse_recipe(edited()).global_params().lambda_ == 1.0
    assert parse_recipe(edited(("parameters.lambda", 1.1))).global_params().lambda_ == 1.1


NORMALIZE_DEFAULTS = {  # ALGORITHMS.md, "Methods"
    "linear": True,
    "task_arithmetic": False,
    "ties": True,
    "dare_linear": False,
    "dare_ties": False,
    "breadcrumbs": False,
    "breadcrumbs_ties": False,
    "della": True,
    "della_linear": False,
}


@pytest.mark.parametrize(("name", "default"), NORMALIZE_DEFAULTS.items())
def test_normalize_default_per_method(name: str, default: bool):
    assert set(NORMALIZE_DEFAULTS) == {n for n, spec in METHODS.items() if spec.catalog is None}
    assert parse_recipe(method(name)).global_params().normalize is default
    flipped = parse_recipe(method(name, ("parameters.normalize", not default)))
    assert flipped.global_params().normalize is (not default)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (DROP, Rescale.KEEP_PROB),
        (True, Rescale.KEEP_PROB),
        ("l1", Rescale.L1),
        (False, Rescale.NONE),
    ],
    ids=["default", "true", "l1", "false"],
)
@pytest.mark.parametrize("name", ["della", "della_linear", "dare_ties", "dare_linear"])
def test_rescale_mapping(name: str, value: Any, expected: Rescale):
    edits = [] if value is DROP else [("parameters.rescale", value)]
    assert parse_recipe(method(name, *edits)).global_params().rescale is expected


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_gamma_defaults_to_mergekits_value_for_breadcrumbs(name: str):
    assert DEFAULT_GAMMA == 0.01
    recipe = parse_recipe(method(name, ("models.1.parameters.gamma", 0.05)))
    assert recipe.expert_params(0, "x").gamma == 0.01
    assert recipe.expert_params(1, "x").gamma == 0.05


def test_gamma_is_none_for_methods_without_it():
    assert parse_recipe(edited()).expert_params(0, "x").gamma is None


@pytest.mark.parametrize("value", [True, False])
def test_int8_mask_is_accepted_and_changes_nothing(value: bool):
    plain = parse_recipe(edited())
    masked = parse_recipe(edited(("parameters.int8_mask", value)))
    assert masked.schema.parameters.int8_mask is value
    assert masked.global_params() == plain.global_params()
    assert masked.expert_params(1, "x") == plain.expert_params(1, "x")


def test_linear_may_list_the_base_and_needs_no_base():
    with_base = parse_recipe(method("linear", ("base_model", "base"), ("models.1.model", "base")))
    assert with_base.model_refs == ["lm", "base"]
    assert parse_recipe(method("linear")).schema.base_model is None


@pytest.mark.parametrize(
    ("density", "epsilon"),
    [(0.7, 0.0), (0.7, 0.3), (0.6, 0.4), (0.9, 0.1), (0.11, 0.1), (1.0, 0.2), (1.0, 0.0)],
)
def test_window_edges_that_are_valid(density: float, epsilon: float):
    """d + ε = 1 is allowed, ε = 0 is a uniform drop, and d = 1 keeps everything."""
    recipe = parse_recipe(edited(("parameters.density", density), ("parameters.epsilon", epsilon)))
    assert recipe.expert_params(0, "x").epsilon == epsilon


def test_seed_defaults_to_zero_and_can_be_overridden():
    recipe = parse_recipe(edited())
    assert recipe.seed == 0
    assert parse_recipe(edited(("seed", 42))).seed == 42
    reseeded = recipe.with_seed(7)
    assert reseeded.seed == 7
    # The text written beside the merged model must reproduce it: the seed is in it.
    assert parse_recipe(reseeded.text).seed == 7
    assert recipe.seed == 0
    assert parse_recipe(edited(("seed", 3))).with_seed(9).text.count("seed:") == 1


def test_sha256_is_of_the_recipe_text():
    text = edited(("seed", 3))
    assert parse_recipe(text).sha256 == hashlib.sha256(text.encode()).hexdigest()


def test_mergekit_style_recipe_with_dtype_and_tokenizer_source_parses():
    recipe = parse_recipe(
        edited(("dtype", "bfloat16"), ("out_dtype", "float16"), ("tokenizer_source", "base"))
    )
    assert recipe.schema.out_dtype == "float16"
    assert recipe.schema.tokenizer_source == "base"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0.0, False), ("yes", True), ("Off", False)],
)
def test_booleans_take_mergekits_spellings(value: Any, expected: bool):
    """Recipes written for mergekit (whose parser is lenient) may spell a boolean as 1 or
    "yes"; they mean the same here."""
    recipe = parse_recipe(method("ties", ("parameters.normalize", value)))
    assert recipe.global_params().normalize is expected


def test_numbers_are_floats_and_the_keys_given_are_kept_in_order():
    recipe = parse_recipe(edited(("parameters.weight", 2), ("models.1.parameters.density", 1)))
    assert recipe.schema.parameters.weight == 2.0
    assert type(recipe.schema.parameters.weight) is float
    assert recipe.schema.parameters.given == ("density", "epsilon", "weight")
    assert recipe.schema.models[1].parameters.given == ("density",)
    assert recipe.schema.models[0].parameters.given == ()


# --- what mergekit accepts is accepted, with one note each ------------------------------------

# Each row: a recipe mergekit 0.1.5 runs, the notes it gets (the start of each, in order), and
# what della reads from it (a function of the parsed recipe that must hold).
LENIENT = [
    pytest.param(
        method("ties", ("parameters.epsilon", 0.1)),
        ["parameters.epsilon: ignored, as mergekit ignores it: ties does not use epsilon"],
        lambda r: r.schema.parameters.given == ("density",),
        id="unused-parameter",
    ),
    pytest.param(
        method("dare_ties", ("models.1.parameters.epsilon", 0.1), ("parameters.t", [0, 1])),
        [
            "parameters.t: ignored, as mergekit ignores it: dare_ties does not use t",
            "models.1.parameters.epsilon: ignored, as mergekit ignores it",
        ],
        lambda r: r.expert_params(1, "x").epsilon is None,
        id="unused-per-model-and-gradient",
    ),
    pytest.param(
        edited(("parameters.gamma", 0.01)),
        ["parameters.gamma: ignored, as mergekit ignores it: della does not use gamma"],
        lambda r: r.expert_params(0, "x").gamma is None,
        id="della-gamma",
    ),
    pytest.param(
        method("linear", ("parameters.density", 0.5), ("parameters.lambda", 1.1)),
        [
            "parameters.density: ignored, as mergekit ignores it: linear does not use density",
            "parameters.lambda: ignored",
        ],
        lambda r: r.global_params().lambda_ == 1.0,
        id="linear-density-lambda",
    ),
    pytest.param(
        method("task_arithmetic", ("parameters.density", 0.5), ("parameters.rescale", True)),
        [
            "parameters.density: ignored, as mergekit ignores it: task_arithmetic does not use",
            "parameters.rescale: ignored",
        ],
        lambda r: r.expert_params(0, "x").density is None,
        id="task-arithmetic-density-rescale",
    ),
    pytest.param(
        method("ties", ("parameters.rescale", False)),
        ["parameters.rescale: ignored, as mergekit ignores it: ties does not use rescale"],
        lambda r: r.global_params().rescale is Rescale.KEEP_PROB,
        id="ties-rescale-false",
    ),
    *[
        pytest.param(
            edited((f"models.1.parameters.{name}", value)),
            [
                f"models.1.parameters.{name}: ignored, as mergekit ignores it: {name} applies "
                f"to the whole merge and is read only under parameters (the merge uses {used})"
            ],
            lambda r: r.global_params() == parse_recipe(edited()).global_params(),
            id=f"{name}-per-model",
        )
        for name, value, used in (
            ("lambda", 1.1, "1.0"),
            ("normalize", False, "true"),
            ("rescale", "l1", "true"),
            ("int8_mask", True, "false"),
        )
    ],
    pytest.param(
        edited(("parameters.lambda", 0.9), ("models.0.parameters.lambda", 1.5)),
        [
            "models.0.parameters.lambda: ignored, as mergekit ignores it: lambda applies to the "
            "whole merge and is read only under parameters (the merge uses 0.9)"
        ],
        lambda r: r.global_params().lambda_ == 0.9,
        id="older-per-model-lambda",
    ),
    *[
        pytest.param(
            method(name, ("parameters.density", DROP)),
            ["parameters.density: not set; mergekit's default 1.0 is used (every delta is kept)"],
            lambda r: r.expert_params(1, "x").density == 1.0,
            id=f"{name}-without-density",
        )
        for name in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "della", "della_linear")
    ],
    pytest.param(
        edited(("parameters.density", DROP), ("models.0.parameters.density", 0.5)),
        ["parameters.density: not set for 'math'; mergekit's default 1.0 is used"],
        lambda r: (r.expert_params(0, "x").density, r.expert_params(1, "x").density) == (0.5, 1),
        id="density-for-one-model-only",
    ),
    *[
        pytest.param(
            method(name, ("parameters.epsilon", DROP)),
            ["parameters.epsilon: not set; mergekit's default 0.15 is used"],
            lambda r: r.expert_params(0, "x").epsilon == 0.15,
            id=f"{name}-without-epsilon",
        )
        for name in ("della", "della_linear")
    ],
    pytest.param(
        edited(("models", [{"model": "base", "parameters": {"weight": 3}}, *VALID["models"]])),
        [
            "models.0: 'base' is the base model; della merges task vectors, so this entry and "
            "its parameters are ignored, as mergekit ignores them"
        ],
        lambda r: r.model_refs == ["lm", "math"],
        id="base-in-models",
    ),
    pytest.param(
        method("linear", ("base_model", "base"), ("models.1.model", "base")),
        [
            "models.1: 'base' is the base model and is listed, so linear averages it as one of "
            "the models"
        ],
        lambda r: r.model_refs == ["lm", "base"],
        id="base-in-models-linear",
    ),
    pytest.param(
        edited(("parameters", None), ("models.0.parameters", None)),
        [
            "parameters.density: not set; mergekit's default 1.0 is used",
            "parameters.epsilon: not set; mergekit's default 0.15 is used",
        ],
        lambda r: r.schema.parameters.given == () and r.expert_params(0, "x").epsilon == 0.15,
        id="empty-parameters",
    ),
    pytest.param(
        "name: my-merge\n" + edited(),
        ["name: the model card's title (it names a stage of a multi-stage file; this file is one)"],
        lambda r: r.model_refs == ["lm", "math"],
        id="top-level-name",
    ),
    pytest.param(
        edited() + "seed: 3\nseed: 3\n",
        ["seed: given twice with the same value; read once"],
        lambda r: r.seed == 3,
        id="duplicate-key-one-value",
    ),
    pytest.param(
        edited(("dtype", "float16")),
        [],
        lambda r: r.schema.out_dtype is None and r.schema.dtype == "float16",
        id="dtype-without-out-dtype",
    ),
    pytest.param(
        edited(("tokenizer", {"source": "lm"})),
        [],
        lambda r: r.schema.tokenizer_source == "lm" and r.tokenizer_model == 0,
        id="tokenizer-block-model",
    ),
    pytest.param(
        edited(("tokenizer", {"source": "base"})),
        [],
        lambda r: r.schema.tokenizer_source == "base" and r.tokenizer_model is None,
        id="tokenizer-block-base",
    ),
    *[
        pytest.param(
            edited(("chat_template", value)),
            [],
            lambda r, value=value: r.schema.chat_template == value,
            id=f"chat-template-{value[:8]}",
        )
        for value in (
            "auto",
            "chatml",
            "llama3",
            "{% for m in messages %}{{ m.content }}{% endfor %}",
        )
    ],
]


@pytest.mark.parametrize(("text", "notes", "holds"), LENIENT)
def test_what_mergekit_accepts_is_accepted_with_a_note(text, notes, holds):
    recipe = parse_recipe(text)
    assert len(recipe.schema.notes) == len(notes), recipe.schema.notes
    for note, start in zip(recipe.schema.notes, notes, strict=True):
        assert note.startswith(start) or start in note, (note, start)
        assert "\n" not in note
    assert holds(recipe)


def test_a_recipe_without_leniency_has_no_notes():
    assert parse_recipe(edited()).schema.notes == ()
    assert parse_recipe(method("linear")).schema.notes == ()


def test_notes_survive_a_new_seed():
    recipe = parse_recipe("name: x\n" + edited())
    assert recipe.with_seed(5).schema.notes == recipe.schema.notes
