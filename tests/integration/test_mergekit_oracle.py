"""della against mergekit 0.1.5 on the same tiny models and recipes (tests/oracle.py).

Each case is a recipe both tools read unchanged; della and mergekit merge it, and the tensors
(within float32 rounding) and the config fields a merge sets must agree.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from oracle import assert_same_model

from della_cli.api import MergeOptions, run_merge

pytestmark = pytest.mark.oracle


def llama_recipe(zoo, method: str, **top_level) -> dict:
    weights = (1.0, 0.5)
    recipe: dict = {"merge_method": method}
    if method != "linear":
        recipe["base_model"] = str(zoo("llama"))
    recipe["models"] = [
        {"model": str(zoo("llama", expert=e)), "parameters": {"weight": w}}
        for e, w in zip((1, 2), weights, strict=True)
    ]
    recipe.update(top_level)
    return recipe


# Each case: a recipe built from the tiny models; one mergekit-multi run merges them all.
CASES: dict[str, Callable[[Callable[..., Path]], dict]] = {
    "task_arithmetic": lambda zoo: llama_recipe(zoo, "task_arithmetic"),
    "task_arithmetic-lambda": lambda zoo: llama_recipe(
        zoo, "task_arithmetic", parameters={"lambda": 0.8}
    ),
    "linear": lambda zoo: llama_recipe(zoo, "linear"),
    "linear-unnormalized": lambda zoo: llama_recipe(zoo, "linear", parameters={"normalize": False}),
    "ties": lambda zoo: llama_recipe(zoo, "ties", parameters={"density": 0.5}),
    "ties-sum": lambda zoo: llama_recipe(
        zoo, "ties", parameters={"density": 0.3, "normalize": False}
    ),
}


@pytest.fixture(scope="module")
def recipes(model_zoo, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("oracle-recipes")
    paths = {}
    for name, build in CASES.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(build(model_zoo), sort_keys=False))
    return paths


@pytest.fixture(scope="module")
def mergekit_outputs(mergekit, recipes, tmp_path_factory) -> dict[str, Path]:
    return mergekit.merge_many(recipes, tmp_path_factory.mktemp("mergekit-out"))


@pytest.mark.parametrize("case", list(CASES))
def test_della_matches_mergekit(case, recipes, mergekit_outputs, tmp_path):
    ours = tmp_path / "della-out"
    run_merge(recipes[case], ours, MergeOptions(device="cpu", progress=False))
    assert_same_model(ours, mergekit_outputs[case])
