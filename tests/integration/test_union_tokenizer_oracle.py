"""A tokenizer the merge builds, against mergekit 0.1.5 (tests/oracle.py): the union, ``tokens:``
settings of every kind and ``pad_to_multiple_of``, on recipes whose output mergekit gives the
same from run to run (one model adds tokens, all of them added tokens, which mergekit orders by
id; several models adding ordinary words get ids in a hash map's order there)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from oracle import assert_same_model, assert_same_tokenizer
from vocabularies import with_added_tokens

from della_cli.api import MergeOptions, run_merge

pytestmark = pytest.mark.oracle

CHATML = (("<|im_start|>", True), ("<|im_end|>", True), ("hello", False))


def recipe(models: dict[str, Path], method: str = "task_arithmetic", **top_level) -> dict:
    text = {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["chat"]), "parameters": {"weight": 1.0, "density": 0.6}},
            {"model": str(models["other"]), "parameters": {"weight": 0.5, "density": 0.6}},
        ],
    }
    if method == "task_arithmetic":
        for entry in text["models"]:
            del entry["parameters"]["density"]
    return {**text, **top_level}


def every_kind_of_token(models: dict[str, Path]) -> dict:
    return {
        "<|im_start|>": {"source": {"kind": "zero"}},
        "<|im_end|>": {
            "source": {"kind": "model_token", "model": str(models["base"]), "token_id": 2},
            "force": True,
        },
        "hello": {"source": {"kind": "model_token", "model": str(models["chat"]), "token": "w3"}},
        "w5": {"source": str(models["other"]), "force": True},
    }


CASES: dict[str, Callable[[dict[str, Path]], dict]] = {
    "union": lambda m: recipe(m, tokenizer_source="union"),
    # a catalog method, whose statistics pass reads the re-indexed rows too
    "union-slerp-padded": lambda m: {
        "merge_method": "slerp",
        "base_model": str(m["base"]),
        "models": [{"model": str(m["chat"])}],
        "parameters": {"t": 0.3},
        "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
    },
    "union-ties-padded": lambda m: recipe(
        m, "ties", tokenizer={"source": "union", "pad_to_multiple_of": 8}
    ),
    "tokens-every-kind-padded": lambda m: recipe(
        m, tokenizer={"tokens": every_kind_of_token(m), "pad_to_multiple_of": 16}
    ),
    # (mergekit fails on a base source with tokens: naming a token the base lacks)
    "base-with-tokens-padded": lambda m: recipe(
        m,
        tokenizer={
            "source": "base",
            "tokens": {
                "w5": {"source": str(m["chat"]), "force": True},
                "w6": {"source": {"kind": "zero"}, "force": True},
            },
            "pad_to_multiple_of": 64,
        },
    ),
    "model-with-forced-zero": lambda m: recipe(
        m,
        tokenizer={
            "source": str(m["chat"]),
            "tokens": {"w7": {"source": {"kind": "zero"}, "force": True}},
        },
    ),
}


@pytest.fixture(scope="module")
def models(model_zoo, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("union-oracle-models")
    chat = with_added_tokens(model_zoo("llama", expert=1), folder / "chat", CHATML)
    return {"base": model_zoo("llama"), "chat": chat, "other": model_zoo("llama", expert=2)}


@pytest.fixture(scope="module")
def recipes(models, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("union-oracle-recipes")
    paths = {}
    for name, build in CASES.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(build(models), sort_keys=False))
    return paths


@pytest.fixture(scope="module")
def mergekit_outputs(mergekit, recipes, tmp_path_factory) -> dict[str, Path]:
    return mergekit.merge_many(recipes, tmp_path_factory.mktemp("union-oracle-out"))


@pytest.mark.parametrize("case", list(CASES))
def test_built_tokenizer_matches_mergekit(case, recipes, mergekit_outputs, tmp_path):
    ours = tmp_path / "della-out"
    run_merge(recipes[case], ours, MergeOptions(device="cpu", progress=False))
    theirs = mergekit_outputs[case]
    assert_same_model(ours, theirs)  # embed_tokens, lm_head and config vocab_size included
    assert_same_tokenizer(ours, theirs)
