"""Merging in blocks of rows must give exactly the bytes of merging whole tensors."""

from __future__ import annotations

import pytest
import torch

from della_cli.api import MergeOptions, prepare
from della_cli.engine import MergeEngine

METHOD_PARAMETERS = {
    "della": {"density": 0.7, "epsilon": 0.07, "lambda": 1.1},
    "della_linear": {"density": 0.6, "epsilon": 0.1},
    "ties": {"density": 0.3},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.8},
    "task_arithmetic": {"lambda": 0.5},
    "linear": {},
}


@pytest.mark.parametrize("method", sorted(METHOD_PARAMETERS))
def test_blocked_merge_equals_whole_tensor_merge(method, model_zoo, write_recipe):
    recipe_path = write_recipe(
        {
            "merge_method": method,
            "base_model": str(model_zoo("llama")),
            "models": [
                {"model": str(model_zoo("llama", expert=1))},
                {"model": str(model_zoo("llama", expert=2)), "parameters": {"weight": 0.5}},
            ],
            "parameters": METHOD_PARAMETERS[method],
            "seed": 7,
        }
    )
    recipe, inputs, plan = prepare(recipe_path, MergeOptions())
    cpu = torch.device("cpu")
    whole = MergeEngine(recipe, plan, inputs, cpu, block_elements=1 << 30)
    # 100 elements: most tensors (rows of 32 or 64) split into many blocks, some of one row.
    blocked = MergeEngine(recipe, plan, inputs, cpu, block_elements=100)
    assert any(len(blocked.row_blocks(job)) > 1 for job in plan.jobs)
    for job in plan.jobs:
        assert torch.equal(whole.compute(job), blocked.compute(job)), job.name


@pytest.mark.parametrize("method", sorted(METHOD_PARAMETERS))
def test_compiled_kernel_and_torch_path_write_the_same_bytes(
    method, model_zoo, write_recipe, tmp_path, monkeypatch
):
    from della_cli.api import run_merge
    from della_cli.methods import cpu_kernels

    recipe_path = write_recipe(
        {
            "merge_method": method,
            "base_model": str(model_zoo("llama")),
            "models": [
                {"model": str(model_zoo("llama", expert=1))},
                {"model": str(model_zoo("llama", expert=2)), "parameters": {"weight": 0.5}},
            ],
            "parameters": METHOD_PARAMETERS[method],
        }
    )
    run_merge(recipe_path, tmp_path / "fused", MergeOptions())
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    run_merge(recipe_path, tmp_path / "torch", MergeOptions())
    fused = (tmp_path / "fused" / "model.safetensors").read_bytes()
    assert fused == (tmp_path / "torch" / "model.safetensors").read_bytes()
