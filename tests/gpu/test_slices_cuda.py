"""Merges by slices on CUDA against the same merges on the CPU (skipped without a CUDA
device): a slice's own base and the reference of a passthrough frankenmerge reach the torch
backend as they do on the CPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from della_cli.api import MergeOptions, run_merge

pytestmark = pytest.mark.gpu


def source(model, start: int, end: int, **parameters) -> dict:
    entry: dict = {"model": str(model), "layer_range": [start, end]}
    return {**entry, "parameters": parameters} if parameters else entry


def recipes(deep) -> dict[str, dict]:
    base, one, two = deep
    return {
        "frankenmerge": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [source(base, 0, 3)]},
                {"sources": [source(one, 1, 5, scale=[0.5, 2.0])]},
            ],
        },
        "slerp-slice-base": {
            "merge_method": "slerp",
            "base_model": str(base),
            "slices": [
                {"sources": [source(base, 0, 2), source(one, 0, 2)]},
                {"sources": [source(one, 2, 5), source(two, 2, 5)], "base_model": str(two)},
            ],
            "parameters": {"t": [0.2, 0.7]},
        },
        "ties-gradients": {
            "merge_method": "ties",
            "base_model": str(base),
            "slices": [
                {"sources": [source(base, 0, 3), source(one, 0, 3, weight=[0.0, 1.0])]},
                {"sources": [source(base, 3, 5), source(two, 1, 3)]},
            ],
            "parameters": {"density": 0.5, "weight": 0.7},
        },
    }


@pytest.mark.parametrize("case", ["frankenmerge", "slerp-slice-base", "ties-gradients"])
def test_sliced_cuda_merge_matches_cpu_merge(case, model_zoo, write_recipe, tmp_path):
    deep = tuple(model_zoo("llama", expert=e, layers=5) for e in (None, 1, 2))
    recipe = write_recipe(recipes(deep)[case])
    run_merge(recipe, tmp_path / "cpu", MergeOptions(device="cpu", progress=False))
    run_merge(recipe, tmp_path / "cuda", MergeOptions(device="cuda", progress=False))
    cpu, cuda = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "cuda"))
    assert cpu.keys() == cuda.keys()
    for name, expected in cpu.items():
        torch.testing.assert_close(cuda[name], expected, rtol=1e-6, atol=1e-7)
