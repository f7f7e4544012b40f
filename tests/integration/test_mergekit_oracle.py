"""della against mergekit 0.1.5 on the same tiny models and recipes (tests/oracle.py).

Each case is a recipe both tools read unchanged; della and mergekit merge it, and the tensors
(within float32 rounding) and the config fields a merge sets must agree.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from oracle import assert_same_model, assert_same_tokenizer
from vocabularies import with_vocabulary

from della_cli.api import MergeOptions, run_merge
from della_cli.chat_template import template_text

pytestmark = pytest.mark.oracle


@dataclass(frozen=True)
class Models:
    """The tiny Llama base and experts, plus variants some recipes need."""

    base: Path
    experts: tuple[Path, Path]
    grown: Path  # expert 1 with two more tokens (98 rows)
    chatml: tuple[Path, Path]  # the experts with the chatml template instead of the base's
    deep: tuple[Path, Path, Path]  # a five-layer base and two experts, for gradients


def deep_recipe(m: Models, method: str, weights: tuple, **top_level) -> dict:
    """A recipe over the five-layer models: ``weights`` per expert (values, gradients or
    filter lists)."""
    base, *experts = m.deep
    recipe: dict = {"merge_method": method}
    if method != "linear":
        recipe["base_model"] = str(base)
    recipe["models"] = [
        {"model": str(e), "parameters": {"weight": w}}
        for e, w in zip(experts, weights, strict=True)
    ]
    recipe.update(top_level)
    return recipe


# Filters as published recipes write them: attention, MLP, the rest.
ATTN_MLP = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.8}, {"value": 0.6}]


def llama_recipe(m: Models, method: str, **top_level) -> dict:
    recipe: dict = {"merge_method": method}
    if method != "linear":
        recipe["base_model"] = str(m.base)
    recipe["models"] = [
        {"model": str(expert), "parameters": {"weight": weight}}
        for expert, weight in zip(m.experts, (1.0, 0.5), strict=True)
    ]
    recipe.update(top_level)
    return recipe


def unweighted(m: Models) -> list[dict]:
    """The experts with no parameters (the methods that take no weight)."""
    return [{"model": str(expert)} for expert in m.experts]


def with_models(m: Models, recipe: dict, experts: tuple[Path, ...]) -> dict:
    models = [
        {**entry, "model": str(e)} for entry, e in zip(recipe["models"], experts, strict=True)
    ]
    return {**recipe, "models": models}


def duplicate_keys(m: Models) -> str:
    text = yaml.safe_dump(llama_recipe(m, "ties", parameters={"density": 0.5}), sort_keys=False)
    return text + "merge_method: ties\n"


JINJA = (
    "{% for message in messages %}[{{ message['role'] }}] {{ message['content'] }}\n{% endfor %}"
)

# Each case: a recipe built from the tiny models (a mapping, or YAML text); one mergekit-multi
# run merges them all.
CASES: dict[str, Callable[[Models], dict | str]] = {
    "task_arithmetic": lambda m: llama_recipe(m, "task_arithmetic"),
    "task_arithmetic-lambda": lambda m: llama_recipe(
        m, "task_arithmetic", parameters={"lambda": 0.8}
    ),
    "linear": lambda m: llama_recipe(m, "linear"),
    "linear-unnormalized": lambda m: llama_recipe(m, "linear", parameters={"normalize": False}),
    "ties": lambda m: llama_recipe(m, "ties", parameters={"density": 0.5}),
    "ties-sum": lambda m: llama_recipe(m, "ties", parameters={"density": 0.3, "normalize": False}),
    # the base listed under models: skipped with its parameters, or averaged by linear
    "base-in-models-ties": lambda m: {
        **llama_recipe(m, "ties", parameters={"density": 0.5}),
        "models": [
            {"model": str(m.base), "parameters": {"weight": 3.0, "density": 0.2}},
            *llama_recipe(m, "ties")["models"],
        ],
    },
    "base-in-models-linear": lambda m: {
        **llama_recipe(m, "linear"),
        "base_model": str(m.base),
        "models": [
            *llama_recipe(m, "linear")["models"],
            {"model": str(m.base), "parameters": {"weight": 2.0}},
        ],
    },
    # mergekit's defaults and what it ignores
    "ties-default-density": lambda m: llama_recipe(m, "ties"),
    # random methods at mergekit's default density 1.0 drop nothing, so they are comparable
    "della-default-density-epsilon": lambda m: llama_recipe(m, "della", parameters={"lambda": 1.1}),
    "dare_linear-default-density": lambda m: llama_recipe(m, "dare_linear"),
    "breadcrumbs": lambda m: llama_recipe(m, "breadcrumbs", parameters={"density": 0.8}),
    "breadcrumbs_ties-gamma": lambda m: llama_recipe(
        m, "breadcrumbs_ties", parameters={"density": 0.7, "gamma": 0.05}
    ),
    "unused-parameters": lambda m: llama_recipe(
        m,
        "task_arithmetic",
        parameters={"density": 0.3, "epsilon": 0.1, "t": [0, 1], "lambda": 1.2},
    ),
    "per-model-lambda": lambda m: {
        **llama_recipe(m, "task_arithmetic", parameters={"lambda": 0.9}),
        "models": [
            {"model": str(e), "parameters": {"weight": 1.0, "lambda": 2.0, "normalize": True}}
            for e in m.experts
        ],
    },
    "top-level-name": lambda m: {"name": "my-merge", **llama_recipe(m, "task_arithmetic")},
    "duplicate-key": duplicate_keys,
    "dtype-float16": lambda m: llama_recipe(m, "task_arithmetic", dtype="float16"),
    "dtype-bfloat16-linear": lambda m: llama_recipe(m, "linear", dtype="bfloat16"),
    # tokenizer: and chat_template
    "tokenizer-base": lambda m: with_models(
        m, llama_recipe(m, "task_arithmetic", tokenizer={"source": "base"}), (m.grown, m.experts[1])
    ),
    "tokenizer-model": lambda m: with_models(
        m,
        llama_recipe(m, "task_arithmetic", tokenizer={"source": str(m.grown)}),
        (m.grown, m.experts[1]),
    ),
    "tokenizer-source-model": lambda m: with_models(
        m, llama_recipe(m, "linear", tokenizer_source=str(m.grown)), (m.experts[1], m.grown)
    ),
    "chat-template-named": lambda m: llama_recipe(m, "task_arithmetic", chat_template="llama3"),
    "chat-template-jinja": lambda m: llama_recipe(m, "task_arithmetic", chat_template=JINJA),
    "chat-template-auto": lambda m: with_models(
        m, llama_recipe(m, "task_arithmetic", chat_template="auto"), m.chatml
    ),
    "chat-template-auto-same": lambda m: llama_recipe(m, "linear", chat_template="auto"),
    "chat-template-with-tokenizer": lambda m: with_models(
        m,
        llama_recipe(m, "task_arithmetic", chat_template="chatml", tokenizer={"source": "base"}),
        (m.grown, m.experts[1]),
    ),
    # gradients over the five layers (t = 0, 0.25, ... 1; 0 outside the layers)
    "gradient-task_arithmetic": lambda m: deep_recipe(
        m, "task_arithmetic", ([1.0, 0.3, 0.8], [0.2, 0.9]), parameters={"lambda": [1.0, 0.6]}
    ),
    "gradient-linear": lambda m: deep_recipe(m, "linear", ([0.0, 0.5, 1.0], [1.0, 0.25])),
    "gradient-ties": lambda m: deep_recipe(
        m, "ties", ([0.7, 1.2], 0.5), parameters={"density": [0.2, 0.9, 0.4]}
    ),
    # filters: the first matching entry; a scope matching nothing falls through
    "filters-task_arithmetic": lambda m: deep_recipe(
        m,
        "task_arithmetic",
        (ATTN_MLP, [{"filter": "mlp", "value": 2.0}]),
        parameters={"weight": 0.4},
    ),
    "filters-linear": lambda m: deep_recipe(
        m, "linear", (ATTN_MLP, {"filter": "self_attn", "value": 3.0}), parameters={"weight": 1.0}
    ),
    "filters-ties": lambda m: deep_recipe(
        m,
        "ties",
        (1.0, 0.5),
        parameters={"density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]},
    ),
    # both: a filter's value is a gradient
    "gradient-filters-ties": lambda m: deep_recipe(
        m,
        "ties",
        ([{"filter": "mlp", "value": [0.2, 1.0]}, {"value": 0.5}], [1.0, 0.4]),
        parameters={
            "density": [{"filter": "self_attn", "value": [0.8, 0.3]}, {"value": 0.6}],
            "lambda": [{"filter": "mlp", "value": [1.0, 1.4]}],
        },
    ),
    "gradient-filters-task_arithmetic": lambda m: deep_recipe(
        m,
        "task_arithmetic",
        ([{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}], [{"filter": "mlp", "value": [1, 0]}]),
        parameters={"weight": [0.3, 0.9], "normalize": True},
    ),
}
# mergekit's other methods (ALGORITHMS.md S1-S11): a case each, as published recipes write them.
CATALOG_CASES: dict[str, Callable[[Models], dict | str]] = {
    "slerp": lambda m: {
        "merge_method": "slerp",
        "base_model": str(m.base),
        "models": [{"model": str(m.experts[0])}],
        "parameters": {"t": 0.3},
    },
    "slerp-base-listed-bfloat16": lambda m: {
        "merge_method": "slerp",
        "base_model": str(m.experts[1]),
        "models": [{"model": str(m.experts[1])}, {"model": str(m.experts[0])}],
        "parameters": {"t": 0.7},
        "dtype": "bfloat16",
    },
    "passthrough-scaled": lambda m: {
        "merge_method": "passthrough",
        "models": [{"model": str(m.experts[1]), "parameters": {"scale": 0.37}}],
    },
    "nuslerp": lambda m: llama_recipe(m, "nuslerp"),
    "nuslerp-rows-no-base": lambda m: {
        **{k: v for k, v in llama_recipe(m, "nuslerp").items() if k != "base_model"},
        "parameters": {"nuslerp_flatten": False},
    },
    "nuslerp-columns": lambda m: llama_recipe(
        m, "nuslerp", parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}
    ),
    "model_stock": lambda m: {**llama_recipe(m, "model_stock"), "models": unweighted(m)},
    "model_stock-filter-wise": lambda m: {
        **llama_recipe(m, "model_stock", parameters={"filter_wise": True}),
        "models": unweighted(m),
    },
    "sce": lambda m: {**llama_recipe(m, "sce"), "models": unweighted(m)},
    "sce-topk": lambda m: {
        **llama_recipe(m, "sce", parameters={"select_topk": 0.3}),
        "models": unweighted(m),
    },
    "multislerp": lambda m: llama_recipe(m, "multislerp"),
    "multislerp-no-base": lambda m: {
        **{k: v for k, v in llama_recipe(m, "multislerp").items() if k != "base_model"},
        "parameters": {"normalize_weights": False},
    },
    "karcher": lambda m: {"merge_method": "karcher", "models": unweighted(m)},
    "karcher-base-input": lambda m: {
        "merge_method": "karcher",
        "base_model": str(m.base),
        "models": unweighted(m),
        "parameters": {"max_iter": 20, "tol": 1e-6},
    },
    "nearswap": lambda m: {
        "merge_method": "nearswap",
        "base_model": str(m.base),
        "models": unweighted(m)[:1],
        "parameters": {"t": 0.01},
    },
    "arcee_fusion": lambda m: {
        "merge_method": "arcee_fusion",
        "base_model": str(m.base),
        "models": unweighted(m)[1:],
    },
    "ram": lambda m: {
        **llama_recipe(m, "ram", parameters={"epsilon": 0.01}),
        "models": unweighted(m),
    },
    "ramplus_tl": lambda m: {
        **llama_recipe(m, "ramplus_tl", parameters={"epsilon": 0.01, "r": 0.5, "alpha": 0.8}),
        "models": unweighted(m),
    },
}
CASES.update(CATALOG_CASES)
# Where mergekit computes in a 16-bit dtype and della in float32: a unit in the last place.
TOLERANCE = {
    "dtype-float16": 2e-3,
    "dtype-bfloat16-linear": 1.6e-2,
    "slerp-base-listed-bfloat16": 1.6e-2,
}


@pytest.fixture(scope="module")
def models(model_zoo, tmp_path_factory) -> Models:
    folder = tmp_path_factory.mktemp("oracle-models")
    experts = (model_zoo("llama", expert=1), model_zoo("llama", expert=2))
    chatml = []
    for index, expert in enumerate(experts):
        copy = folder / f"chatml-{index}"
        shutil.copytree(expert, copy)
        (copy / "chat_template.jinja").write_text(template_text("chatml"))
        chatml.append(copy)
    grown = with_vocabulary(experts[0], folder / "grown", 98)
    deep = tuple(model_zoo("llama", expert=e, layers=5) for e in (None, 1, 2))
    return Models(model_zoo("llama"), experts, grown, (chatml[0], chatml[1]), deep)


@pytest.fixture(scope="module")
def recipes(models, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("oracle-recipes")
    paths = {}
    for name, build in CASES.items():
        recipe = build(models)
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return paths


@pytest.fixture(scope="module")
def mergekit_outputs(mergekit, recipes, tmp_path_factory) -> dict[str, Path]:
    return mergekit.merge_many(recipes, tmp_path_factory.mktemp("mergekit-out"))


@pytest.mark.parametrize("case", list(CASES))
def test_della_matches_mergekit(case, recipes, mergekit_outputs, tmp_path):
    ours = tmp_path / "della-out"
    run_merge(recipes[case], ours, MergeOptions(device="cpu", progress=False))
    theirs = mergekit_outputs[case]
    worst = assert_same_model(ours, theirs, TOLERANCE.get(case, 1e-6))
    assert_same_tokenizer(ours, theirs)
    if case in CATALOG_CASES:
        print(f"{case}: max abs difference from mergekit {worst:.3g}")
