"""Shared fixtures: tiny real models built once per session, and recipe writing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from della_cli.tiny import make_base, make_expert, random_delta


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def model_zoo(tmp_path_factory) -> Callable[..., Path]:
    """Build (once per session) a tiny model: ``model_zoo("llama")``, or an expert of it with
    ``model_zoo("llama", expert=1)`` (base + N(0, 0.02²) deltas seeded by ``expert``)."""
    root = tmp_path_factory.mktemp("zoo")
    cache: dict[tuple, Path] = {}

    def build(architecture: str = "llama", expert: int | None = None, **options) -> Path:
        key = (architecture, expert, tuple(sorted(options.items())))
        if key not in cache:
            base_key = (architecture, None, tuple(sorted(options.items())))
            if base_key not in cache:
                folder = root / f"{architecture}-{len(cache)}-base"
                cache[base_key] = make_base(folder, architecture, **options)
            if expert is not None:
                folder = root / f"{architecture}-{len(cache)}-expert{expert}"
                cache[key] = make_expert(cache[base_key], folder, random_delta(expert))
        return cache[key]

    return build


@pytest.fixture
def write_recipe(tmp_path) -> Callable[..., Path]:
    """Write a recipe (a dict, dumped as JSON, which is YAML) and return its path."""

    def write(recipe: dict | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(recipe if isinstance(recipe, str) else json.dumps(recipe, indent=2))
        return path

    return write
