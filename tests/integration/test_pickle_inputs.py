"""Merging pickle-only model folders end to end, only with ``--allow-pickle``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from della_cli.api import MergeOptions, run_merge
from della_cli.cli import app


def as_pickle(source: Path, folder: Path) -> Path:
    """``source`` with its safetensors weights saved as ``pytorch_model.bin`` instead."""
    folder.mkdir()
    torch.save(load_file(source / "model.safetensors"), folder / "pytorch_model.bin")
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy2(path, folder / path.name)
    return folder


def recipe(base: Path, experts: list[Path]) -> dict:
    return {
        "merge_method": "della",
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "parameters": {"density": 0.6, "epsilon": 0.1},
        "seed": 2,
    }


# task_arithmetic: a weighted sum, whose rows the streamed reader would read straight from
# the files, which a pickle's are not (it read the pickle's bytes as tensors).
@pytest.mark.parametrize("method", ["della", "task_arithmetic"])
def test_pickle_inputs_merge_to_the_bytes_of_their_safetensors_twins(
    method, model_zoo, write_recipe, tmp_path
):
    folders = [model_zoo("llama"), model_zoo("llama", expert=1), model_zoo("llama", expert=2)]
    pickled = [as_pickle(f, tmp_path / f"pickled-{i}") for i, f in enumerate(folders)]
    expected, actual = tmp_path / "from-safetensors", tmp_path / "from-pickle"
    first, second = (
        {**recipe(models[0], models[1:]), "merge_method": method} for models in (folders, pickled)
    )
    run_merge(write_recipe(first, "a.yaml"), expected, MergeOptions())
    run_merge(write_recipe(second, "b.yaml"), actual, MergeOptions(allow_pickle=True))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (actual / name).read_bytes() == (expected / name).read_bytes(), name


def test_without_the_flag_a_pickle_folder_exits_2_and_writes_nothing(
    model_zoo, write_recipe, tmp_path
):
    base = as_pickle(model_zoo("llama"), tmp_path / "pickled-base")
    path = write_recipe(recipe(base, [model_zoo("llama", expert=1)]))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(path), str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "--allow-pickle" in result.output and "Traceback" not in result.output
    assert not out.exists()
    allowed = CliRunner().invoke(
        app, ["merge", str(path), str(out), "--device", "cpu", "--allow-pickle", "--quiet"]
    )
    assert allowed.exit_code == 0, allowed.output
    assert (out / "model.safetensors").is_file()
