"""A merge killed outright (SIGKILL, power loss) for the resume tests, and the toy models they
resume on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from della_cli.api import MergeOptions, run_merge


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even clean-up."""


def kill_after(jobs: int, recipe: Path, out: Path, options: MergeOptions, monkeypatch) -> list:
    """Run a merge that is killed after ``jobs`` finished tensors, leaving its temporary folder
    as a real kill would (its clean-up is disabled); return the tensors it finished."""
    done = []

    def die(job):
        done.append(job.name)
        if len(done) == jobs:
            raise Killed

    monkeypatch.setattr("della_cli.io.output.shutil.rmtree", lambda *args, **kwargs: None)
    with pytest.raises(Killed):
        run_merge(recipe, out, options, on_progress=die)
    monkeypatch.undo()
    return done


def make_model(folder: Path, seed: int, layers: int = 12, width: int = 128) -> Path:
    """A raw safetensors model (no transformers needed): ``layers`` (width, 4*width) matrices,
    the base (seed 0) plus 0.02 of a delta seeded per layer."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(layers):
        base = torch.randn(width, 4 * width, generator=generator)
        delta = torch.randn(width, 4 * width, generator=torch.Generator().manual_seed(seed + layer))
        tensors[f"layers.{layer}.weight"] = base + (0.02 * delta if seed else 0)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return folder
