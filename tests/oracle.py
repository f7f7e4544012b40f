"""mergekit 0.1.5 as an oracle: run ``mergekit-yaml`` on the recipe della merged and compare.

mergekit lives in a virtual environment of its own (``.ci/run`` installs it at
``.venv-mergekit/``; ``DELLA_MERGEKIT_PYTHON`` names another interpreter), so that its pinned
dependencies never meet della's. Tests that use it carry the ``oracle`` marker and the
``mergekit`` fixture (tests/conftest.py): skipped when it is not installed, failed under CI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

MERGEKIT_VERSION = "0.1.5"
REPO_DIR = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = REPO_DIR / ".venv-mergekit" / "bin" / "python"
MERGE_TIMEOUT_S = 600


def mergekit_python() -> Path:
    """The interpreter of the environment mergekit is installed in (it may not exist)."""
    configured = os.environ.get("DELLA_MERGEKIT_PYTHON")
    return Path(configured) if configured else DEFAULT_PYTHON


def installed_version(python: Path) -> str | None:
    """mergekit's version in the environment of ``python``; None when it is not there."""
    if not python.is_file():
        return None
    code = "import importlib.metadata as m; print(m.version('mergekit'))"
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


@dataclass(frozen=True)
class Mergekit:
    """``mergekit-yaml`` of one virtual environment."""

    python: Path

    def merge_file(self, path: Path, intermediates: Path, out: Path) -> None:
        """``mergekit-multi`` on a multi-stage file as it is: named stages go to
        ``intermediates/NAME``, the unnamed one to ``out``."""
        command = [str(self.python.parent / "mergekit-multi"), str(path)]
        command += ["--intermediate-dir", str(intermediates), "--out-path", str(out)]
        command += ["--no-lazy", "--copy-tokenizer", "--device", "cpu", "--quiet"]
        command += ["--no-write-model-card"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=MERGE_TIMEOUT_S)
        if result.returncode != 0:
            tail = (result.stdout + result.stderr)[-3000:]
            raise AssertionError(f"mergekit-multi failed ({result.returncode}):\n{tail}")

    def merge_many(self, recipes: dict[str, Path], folder: Path, seed: int = 0) -> dict[str, Path]:
        """Merge every recipe (by case name) in one ``mergekit-multi`` run, which pays
        mergekit's start-up (about 10 s) once; each merge reseeds with ``seed``. Returns each
        case's output folder, under ``folder``. Model paths relative to the recipes are read
        from the first recipe's folder."""
        documents = []
        # Numbered names: mergekit-multi treats any string of a recipe equal to a merge's name
        # (e.g. "ties", the method) as a reference to that merge's output.
        names = {case: f"oracle-case-{index}" for index, case in enumerate(recipes)}
        for case, recipe in recipes.items():
            text = recipe.read_text()
            if text.lstrip().startswith("{"):  # a flow mapping (JSON): a key cannot be prepended
                text = yaml.safe_dump(yaml.safe_load(text), sort_keys=False)
            text = re.sub(r"(?m)^name:.*\n", "", text)
            documents.append(f"name: {names[case]}\n{text}")
        folder.mkdir(parents=True, exist_ok=True)
        batch = folder / "batch.yaml"
        batch.write_text("\n---\n".join(documents))
        script = self.python.parent / "mergekit-multi"
        command = [str(script), str(batch), "--intermediate-dir", str(folder), "--no-lazy"]
        command += ["--copy-tokenizer", "--device", "cpu", "--random-seed", str(seed)]
        command += ["--quiet", "--no-write-model-card"]
        command += ["--lora-merge-cache", str(folder / "lora-cache")]  # model+adapter inputs
        cwd = next(iter(recipes.values())).parent
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=MERGE_TIMEOUT_S, cwd=cwd
        )
        if result.returncode != 0:
            tail = (result.stdout + result.stderr)[-3000:]
            raise AssertionError(f"mergekit-multi failed ({result.returncode}):\n{tail}")
        return {case: folder / name for case, name in names.items()}


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def tensor_differences(ours: Path, theirs: Path) -> dict[str, float]:
    """The largest absolute difference of every tensor of two model folders, which must
    hold the same names, shapes and dtypes."""
    a, b = load_tensors(ours), load_tensors(theirs)
    assert sorted(a) == sorted(b), f"tensor names differ: {sorted(set(a) ^ set(b))}"
    differences = {}
    for name in a:
        assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
        assert a[name].dtype == b[name].dtype, (name, a[name].dtype, b[name].dtype)
        differences[name] = (a[name].double() - b[name].double()).abs().max().item()
    return differences


def config_of(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("dtype", config.get("torch_dtype"))
    return config


def assert_same_model(ours: Path, theirs: Path, tolerance: float = 1e-6) -> float:
    """Same tensors (within ``tolerance``) and the same config fields that a merge sets;
    returns the largest difference."""
    differences = tensor_differences(ours, theirs)
    worst = max(differences.values())
    assert worst <= tolerance, sorted(differences.items(), key=lambda kv: -kv[1])[:3]
    a, b = config_of(ours), config_of(theirs)
    for key in ("dtype", "vocab_size", "num_hidden_layers", "tie_word_embeddings"):
        assert a.get(key) == b.get(key), (key, a.get(key), b.get(key))
    return worst


def assert_same_tokenizer(ours: Path, theirs: Path) -> None:
    """The tokenizers transformers loads from both folders have the same vocabulary, special
    tokens and chat template (mergekit re-saves a tokenizer that della copies)."""
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    assert a.get_vocab() == b.get_vocab()
    assert a.all_special_tokens == b.all_special_tokens
    assert a.chat_template == b.chat_template
