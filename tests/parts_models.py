"""The toy models and recipes the merges-in-parts tests share: a base and three experts of
bfloat16 tensors, and a recipe per method that makes it do real work on them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from della_cli.api import MergeOptions
from della_cli.methods import METHODS
from della_cli.methods.catalog import BasePolicy

SHARD_BYTES = 5000  # about one tensor a shard: 9 shards, so 7 parts all get work but for one
SHAPES = {
    **{f"model.layers.{i}.mlp.weight": (32, 64) for i in range(6)},
    "model.layers.0.norm.weight": (64,),
    "model.embed_tokens.weight": (96, 64),  # larger than a shard: a shard of its own
    "lm_head.weight": (16, 64),
}


def build_toy_models(root: Path) -> list[Path]:
    """A base and three experts (the base plus seeded deltas), bfloat16."""
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
