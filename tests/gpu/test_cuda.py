"""CUDA merges against CPU merges (skipped without a CUDA device).

The random draws are integer hashes and the ranks are exact, so the random methods must give
the same bytes on both devices; the deterministic ones match to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from della_cli.api import MergeOptions, run_merge

pytestmark = pytest.mark.gpu

PARAMETERS = {
    "della": {"density": 0.7, "epsilon": 0.07, "lambda": 1.1},
    "della_linear": {"density": 0.6, "epsilon": 0.1},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "ties": {"density": 0.3},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
    "task_arithmetic": {"lambda": 0.5},
    "linear": {},
}
EXACT = {"della", "della_linear", "dare_ties", "dare_linear"}


@pytest.mark.parametrize("method", sorted(PARAMETERS))
def test_cuda_merge_matches_cpu_merge(method, model_zoo, write_recipe, tmp_path):
    recipe = write_recipe(
        {
            "merge_method": method,
            "base_model": str(model_zoo("llama")),
            "models": [
                {"model": str(model_zoo("llama", expert=1))},
                {"model": str(model_zoo("llama", expert=2)), "parameters": {"weight": 0.5}},
            ],
            "parameters": PARAMETERS[method],
            "out_dtype": "float32",
            "seed": 3,
        }
    )
    run_merge(recipe, tmp_path / "cpu", MergeOptions(device="cpu"))
    run_merge(recipe, tmp_path / "cuda", MergeOptions(device="cuda"))
    cpu = load_file(tmp_path / "cpu" / "model.safetensors")
    cuda = load_file(tmp_path / "cuda" / "model.safetensors")
    assert cpu.keys() == cuda.keys()
    for name, expected in cpu.items():
        if method in EXACT:
            assert torch.equal(cuda[name].view(torch.int32), expected.view(torch.int32)), name
        else:
            torch.testing.assert_close(cuda[name], expected, rtol=1e-6, atol=1e-7)
