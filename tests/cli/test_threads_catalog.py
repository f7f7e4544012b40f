"""The catalog methods (torch on the CPU) write the same bytes with one torch thread and with
two (a machine of four cores gives them two): torch's intra-op threads split reductions, and a
split that changed a sum's order would change its bits. The tensors are large enough (over
torch's 32K-entry grain) to be split."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from della_cli.cli import app
from della_cli.engine import threads as engine_threads
from della_cli.kernels import (
    CPU_ENTRYWISE_METHODS,
    CPU_SELECTING_METHODS,
    CPU_SPHERICAL_METHODS,
)

# method: (parameters, experts besides the base, whether the base is an input)
CATALOG = {
    "slerp": ({"t": 0.3}, 1, True),
    "nuslerp": ({}, 2, True),
    "multislerp": ({}, 2, True),
    "karcher": ({}, 3, False),
    "model_stock": ({}, 2, True),
    "sce": ({"select_topk": 0.5}, 2, True),
    "nearswap": ({"t": 0.001}, 1, True),
    "arcee_fusion": ({}, 1, True),
    "ram": ({}, 2, True),
    "ramplus_tl": ({}, 2, True),
    "passthrough": ({}, 1, False),
}
WEIGHTED = {"nuslerp", "multislerp"}
SHAPES = {"layer.weight": (384, 256), "layer.bias": (384,), "norm.weight": (96, 1024)}


@pytest.mark.parametrize("method", sorted(CATALOG))
def test_catalog_bytes_do_not_depend_on_the_thread_count(
    method, tensor_models, write_recipe, tmp_path, monkeypatch
):
    parameters, experts, with_base = CATALOG[method]
    base, *others = tensor_models(SHAPES, count=1 + experts, dtype=torch.bfloat16)
    recipe = {"merge_method": method, "parameters": parameters, "dtype": "bfloat16"}
    if with_base:
        recipe["base_model"] = str(base)
        recipe["models"] = [{"model": str(folder)} for folder in others]
        if method in WEIGHTED:
            for entry, weight in zip(recipe["models"], (0.3, 0.7), strict=True):
                entry["parameters"] = {"weight": weight}
    else:
        recipe["models"] = [{"model": str(folder)} for folder in [base, *others][: max(1, experts)]]
    path = write_recipe(recipe)
    monkeypatch.setattr(engine_threads, "usable_cores", lambda: 4)  # --threads 4: torch gets 2
    outputs = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    for threads in ("1", "4"):
        out = tmp_path / f"out-{threads}"
        args = ["merge", str(path), str(out), "--device", "cpu", "--quiet", "--threads", threads]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        outputs.append([p.read_bytes() for p in sorted(out.glob("*.safetensors"))])
    cpu_methods = (*CPU_SPHERICAL_METHODS, *CPU_SELECTING_METHODS, *CPU_ENTRYWISE_METHODS)
    on_torch = method not in (*cpu_methods, "passthrough")
    threads_after = torch.get_num_threads()
    torch.set_num_threads(before)
    if on_torch:
        assert threads_after == 2  # the second merge ran torch on two threads
    assert outputs[0] and outputs[0] == outputs[1]
