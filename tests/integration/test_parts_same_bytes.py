"""A merge made in parts (``--part i/N`` then ``--assemble``) gives exactly the bytes of the
merge on one machine: for every method, for N = 1, 2, 3 and 7, parts run in a shuffled order,
and with a part killed midway and run again."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from della_cli.api import MergeOptions, run_merge
from della_cli.assemble import assemble
from della_cli.methods import METHODS
from della_cli.methods.catalog import BasePolicy
from della_cli.part_merge import run_part

SHARD_BYTES = 5000  # about one tensor a shard: 9 shards, so 7 parts all get work but for one
PART_COUNTS = (1, 2, 3, 7)
SHAPES = {
    **{f"model.layers.{i}.mlp.weight": (32, 64) for i in range(6)},
    "model.layers.0.norm.weight": (64,),
    "model.embed_tokens.weight": (96, 64),  # larger than a shard: a shard of its own
    "lm_head.weight": (16, 64),
}


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory) -> list[Path]:
    """A base and three experts of bfloat16 tensors (the experts: base plus seeded deltas)."""
    root = tmp_path_factory.mktemp("parts-models")
    base = {
        name: torch.randn(shape, generator=torch.Generator().manual_seed(7 + i))
        for i, (name, shape) in enumerate(SHAPES.items())
    }
    folders = []
    for index in range(4):
        delta = torch.Generator().manual_seed(100 + index)
        tensors = {
            name: (t + (0.1 * torch.randn(t.shape, generator=delta) if index else 0)).bfloat16()
            for name, t in base.items()
        }
        folder = root / f"model{index}"
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
        folders.append(folder)
    return folders


def method_recipe(method: str, models: list[Path]) -> dict:
    """A recipe that makes ``method`` do real work (random draws, selections) on the toy
    models: two experts (one where the method takes one), every parameter given a value."""
    spec = METHODS[method]
    contract = spec.catalog.contract if spec.catalog else None
    wants_base = spec.needs_base if contract is None else contract.base is BasePolicy.REQUIRED
    count = 2 if contract is None else min(contract.max_models or 2, max(contract.min_models, 2))
    values = {"weight": 0.6, "density": 0.5, "epsilon": 0.1, "gamma": 0.01, "scale": 0.9}
    per_model = {p: values[p] for p in spec.expert_parameters if p in values}
    recipe: dict = {
        "merge_method": method,
        "seed": 11,
        "models": [
            {"model": str(folder), "parameters": {**per_model, "weight": 0.6 - 0.2 * k}}
            if "weight" in per_model
            else {"model": str(folder), "parameters": per_model}
            for k, folder in enumerate(models[1 : 1 + count])
        ],
    }
    if wants_base:
        recipe["base_model"] = str(models[0])
    if "t" in spec.global_parameters:
        recipe["parameters"] = {"t": 0.4}
    return recipe


def options(**more) -> MergeOptions:
    return MergeOptions(device="cpu", out_shard_bytes=SHARD_BYTES, progress=False, **more)


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_in_parts_gives_the_bytes_of_one_machine(method, toy_models, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(method_recipe(method, toy_models)))
    whole = tmp_path / "one" / "out"
    report = run_merge(recipe, whole, options())
    assert report.shards >= 8
    expected = files_of(whole)
    order = random.Random(method)
    for count in PART_COUNTS:
        out = tmp_path / f"in{count}" / "out"
        numbers = list(range(1, count + 1))
        order.shuffle(numbers)
        computed = 0
        for number in numbers:
            computed += run_part(recipe, out, options(), number, count).computed_shards
        assert computed == report.shards  # each shard computed by exactly one part
        assemble(recipe, out, options())
        assert files_of(out) == expected, f"{method} in {count} parts"
        assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # parts folder gone


def test_a_killed_part_run_again_keeps_its_shards_and_gives_the_same_bytes(toy_models, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(method_recipe("della", toy_models)))
    whole = tmp_path / "one" / "out"
    run_merge(recipe, whole, options())
    out = tmp_path / "parts" / "out"
    run_part(recipe, out, options(), 1, 3)
    run_part(recipe, out, options(), 3, 3)
    finished = []

    def die(job) -> None:
        finished.append(job.name)
        if len(finished) == 2:
            raise Killed

    with pytest.raises(Killed):
        run_part(recipe, out, options(), 2, 3, on_progress=die)
    again = run_part(recipe, out, options(resume=True), 2, 3)
    assert again.kept_shards == 2 and again.computed_shards == len(again.shards) - 2
    assemble(recipe, out, options())
    assert files_of(out) == files_of(whole)


def test_a_part_run_again_without_resume_computes_all_its_shards(toy_models, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(method_recipe("dare_ties", toy_models)))
    out = tmp_path / "parts" / "out"
    first = run_part(recipe, out, options(), 1, 2)
    again = run_part(recipe, out, options(), 1, 2)
    kept = run_part(recipe, out, options(resume=True), 1, 2)
    assert (first.computed_shards, again.computed_shards) == (len(first.shards),) * 2
    assert (kept.kept_shards, kept.computed_shards) == (len(first.shards), 0)
