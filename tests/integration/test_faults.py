"""What happens when things go wrong: bad inputs, a full disk, escaping symlinks, NaN."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from della_cli.cli import app


def raw_model(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return folder


@pytest.fixture
def toy(tmp_path, write_recipe):
    """A base and two experts of three (64, 64) float32 tensors, and a ties recipe."""
    generator = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(64, 64, generator=generator) for i in range(3)}
    folders = [raw_model(tmp_path / "base", base)]
    for expert in (1, 2):
        changed = {k: v + 0.01 * torch.randn(64, 64, generator=generator) for k, v in base.items()}
        folders.append(raw_model(tmp_path / f"expert{expert}", changed))
    recipe = write_recipe(
        {
            "merge_method": "ties",
            "base_model": str(folders[0]),
            "models": [{"model": str(f)} for f in folders[1:]],
            "parameters": {"density": 0.5},
        }
    )
    return recipe, folders


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".della-" in p.name)


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_nan_in_an_input_is_a_warning_naming_the_tensor(toy, tmp_path):
    recipe, folders = toy
    tensors = load_file(folders[2] / "model.safetensors")
    tensors["layers.1.weight"][3, 7] = float("nan")
    save_file(tensors, folders[2] / "model.safetensors", metadata={"format": "pt"})
    result = invoke("merge", recipe, tmp_path / "out", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert "NaN or Inf values in 'layers.1.weight'" in result.output
    assert str(folders[2]) in result.output  # names the model too


def test_an_output_holding_nan_is_not_published(toy, tmp_path):
    """The NaN reaches the merged tensor: that output is an error, not a warning, unless
    --allow-nonfinite (so a batch that pushes never publishes it)."""
    recipe, folders = toy
    tensors = load_file(folders[2] / "model.safetensors")
    tensors["layers.1.weight"][3, 7] = float("nan")
    save_file(tensors, folders[2] / "model.safetensors", metadata={"format": "pt"})
    result = invoke("merge", recipe, tmp_path / "out", "--quiet")
    assert result.exit_code == 2, result.output
    assert "NaN or Inf values in 'layers.1.weight'" in result.stderr  # the warning, then
    assert "the merged output holds NaN or Inf in 'layers.1.weight'" in result.stderr
    assert "--allow-nonfinite" in result.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_inf_in_an_input_fails_under_strict_and_writes_nothing(toy, tmp_path):
    recipe, folders = toy
    tensors = load_file(folders[0] / "model.safetensors")
    tensors["layers.2.weight"][0, 0] = float("inf")
    save_file(tensors, folders[0] / "model.safetensors", metadata={"format": "pt"})
    result = invoke("merge", recipe, tmp_path / "out", "--strict")
    assert result.exit_code == 2
    assert "NaN or Inf values in 'layers.2.weight'" in result.output
    assert "--strict" in result.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_tensor_fails_under_strict_before_anything_is_read(toy, tmp_path):
    recipe, folders = toy
    tensors = load_file(folders[1] / "model.safetensors")
    del tensors["layers.0.weight"]
    save_file(tensors, folders[1] / "model.safetensors", metadata={"format": "pt"})
    assert invoke("merge", recipe, tmp_path / "lenient").exit_code == 0
    result = invoke("merge", recipe, tmp_path / "out", "--strict")
    assert result.exit_code == 2
    assert "has no 'layers.0.weight' (--strict)" in result.output
    assert not (tmp_path / "out").exists()


def _limit_file_size(limit_bytes: int):
    def apply() -> None:
        # Past the limit a write fails with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def test_disk_full_mid_merge_exits_1_and_leaves_everything_as_it_was(toy, tmp_path):
    """A file-size limit stands for a full disk: the 48 KiB output shard cannot be written."""
    recipe, _ = toy
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("an earlier merge")
    command = [sys.executable, "-m", "della_cli", "merge", str(recipe), str(out), "--overwrite"]
    result = subprocess.run(
        command, capture_output=True, text=True, preexec_fn=_limit_file_size(20_000)
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: writing")
    assert "File too large" in result.stderr and "nothing was left behind" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("victim", ["tokenizer.json", "model.safetensors", "config.json"])
def test_symlink_leaving_the_model_folder_is_refused(toy, tmp_path, victim):
    recipe, folders = toy
    outside = tmp_path / "secret"
    outside.write_bytes((folders[0] / "model.safetensors").read_bytes())
    if victim == "model.safetensors":
        (folders[0] / victim).unlink()
    elif victim == "config.json":
        (folders[0] / victim).unlink()
        outside.write_text("{}")
    (folders[0] / victim).symlink_to(outside)
    result = invoke("merge", recipe, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "leads outside its model folder" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no-weights", "no model.safetensors"),
        ("bad-config", "config.json: not valid JSON"),
        ("not-a-folder", "is not a folder"),
    ],
)
def test_broken_model_folders_exit_2(toy, tmp_path, breakage, message):
    recipe, folders = toy
    if breakage == "no-weights":
        (folders[1] / "model.safetensors").unlink()
    elif breakage == "bad-config":
        (folders[1] / "config.json").write_text("{not json")
    else:
        for path in folders[1].iterdir():
            path.unlink()
        folders[1].rmdir()
        folders[1].write_text("a file where the model folder was")
    result = invoke("merge", recipe, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_output_below_a_file_exits_2(toy, tmp_path):
    recipe, _ = toy
    (tmp_path / "plain").write_text("not a folder")
    result = invoke("merge", recipe, tmp_path / "plain" / "merged")
    assert result.exit_code == 2
    assert "is a file, not a folder" in result.output


def test_unwritable_output_folder_exits_2(toy, tmp_path, monkeypatch):
    """As root every folder is writable, so the permission answer is simulated."""
    recipe, _ = toy
    monkeypatch.setattr("della_cli.io.output._writable", lambda folder: False)
    result = invoke("merge", recipe, tmp_path / "out")
    assert result.exit_code == 2
    assert f"cannot write into {tmp_path}: permission denied" in result.output
    assert not (tmp_path / "out").exists()
