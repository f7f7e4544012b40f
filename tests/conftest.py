"""Shared fixtures: tiny real models built once per session, and recipe writing."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from della_cli.tiny import make_base, make_expert, random_delta

# Merges compile the numba kernels in their own process, as before backends.cpu.warm: which
# jobs a cold cache sends to the torch stand-in would otherwise depend on the tests' order
# (tests/unit/test_engine_cost_compile.py tests the stand-in itself).
os.environ.setdefault("DELLA_COMPILE_INLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_real_hub(tmp_path_factory, monkeypatch):
    """No test reaches the real Hub or the user's token and cache: offline, with an empty
    Hub home, unless a test starts the fake Hub (tests/hub_server.py)."""
    import huggingface_hub.constants as hub_constants

    home = tmp_path_factory.mktemp("hf-home")
    hub_variables = ("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE")
    for name in (*hub_variables, "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))


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


@pytest.fixture(scope="session")
def mergekit():
    """mergekit 0.1.5 in its own virtual environment (tests/oracle.py): skipped when it is not
    installed, a failure under CI (``CI=true``), which must never skip the comparison."""
    from oracle import MERGEKIT_VERSION, Mergekit, installed_version, mergekit_python

    python = mergekit_python()
    version = installed_version(python)
    if version != MERGEKIT_VERSION:
        found = f"mergekit {version}" if version else "no mergekit"
        message = (
            f"{found} at {python}; the oracle tests need mergekit {MERGEKIT_VERSION} (.ci/run "
            "installs it in .venv-mergekit/, or set DELLA_MERGEKIT_PYTHON)"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return Mergekit(python)


@pytest.fixture
def write_recipe(tmp_path) -> Callable[..., Path]:
    """Write a recipe (a dict, dumped as JSON, which is YAML) and return its path."""

    def write(recipe: dict | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(recipe if isinstance(recipe, str) else json.dumps(recipe, indent=2))
        return path

    return write


@pytest.fixture
def bf16_recipe(model_zoo, write_recipe) -> Callable[..., Path]:
    """Write a recipe merging two bfloat16 experts of the tiny Llama into its base:
    ``bf16_recipe("della", {"density": 0.5}, seed=3)`` (extra keys go to the top level)."""

    def write(method: str, parameters: dict, **top_level) -> Path:
        return write_recipe(
            {
                "merge_method": method,
                "base_model": str(model_zoo("llama", dtype=torch.bfloat16)),
                "models": [
                    {"model": str(model_zoo("llama", expert=e, dtype=torch.bfloat16))}
                    for e in (1, 2)
                ],
                "parameters": parameters,
                **top_level,
            }
        )

    return write


@pytest.fixture
def fake_hub(monkeypatch):
    """A local stand-in for the Hub (tests/hub_server.py) on 127.0.0.1, online, with
    ``HF_ENDPOINT`` pointing at it and ``HF_TOKEN`` set to its one valid (fake) token."""
    from hub_server import VALID_TOKEN, FakeHub

    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.start())
    monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    yield hub
    hub.stop()


@pytest.fixture
def tensor_models(tmp_path) -> Callable[..., list[Path]]:
    """Model folders of bare tensors (no transformers architecture): ``count`` folders with
    the given ``shapes``, seeded random values of ``dtype``, and a minimal config."""
    from safetensors.torch import save_file

    def build(shapes: dict, count: int = 3, dtype: torch.dtype = torch.float32) -> list[Path]:
        folders = []
        for index in range(count):
            generator = torch.Generator().manual_seed(index)
            tensors = {
                name: torch.randn(shape, generator=generator).to(dtype)
                for name, shape in shapes.items()
            }
            folder = tmp_path / f"model{index}"
            folder.mkdir()
            save_file(tensors, folder / "model.safetensors")
            (folder / "config.json").write_text(json.dumps({"model_type": "synthetic"}))
            folders.append(folder)
        return folders

    return build
