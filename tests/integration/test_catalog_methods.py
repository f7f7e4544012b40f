"""mergekit's other methods (slerp, passthrough, ...; ALGORITHMS.md S1-S11) run end to end.

For each case: ``della merge`` of tiny models equals the torch reference of ``methods`` on the
whole tensors, byte for byte; merging in row blocks far smaller than a tensor (so the
statistics pass sums many blocks) gives the same bytes as one block per tensor; transformers
loads the result. The comparison with mergekit itself is in test_mergekit_oracle.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import della_cli.engine.shared as engine_shared
from della_cli.api import MergeOptions, run_merge
from della_cli.methods import interpolation


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@dataclass(frozen=True)
class Case:
    """A recipe over the tiny models and the reference of one tensor from the whole input
    tensors (base, models), in the compute dtype."""

    recipe: Callable[[Path, list[Path]], dict]
    reference: Callable[[torch.Tensor | None, list[torch.Tensor]], torch.Tensor]
    experts: int = 1


def _slerp(t: float) -> Case:
    return Case(
        lambda base, experts: {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(experts[0])}],
            "parameters": {"t": t},
        },
        lambda base, models: interpolation.slerp(base, models[0], t),
    )


def _passthrough(scale: float | None) -> Case:
    parameters = {} if scale is None else {"parameters": {"scale": scale}}
    return Case(
        lambda base, experts: {
            "merge_method": "passthrough",
            "models": [{"model": str(experts[0]), **parameters}],
        },
        lambda base, models: models[0] if scale is None else models[0] * scale,
    )


CASES: dict[str, Case] = {
    "slerp": _slerp(0.3),
    "slerp-extrapolated": _slerp(1.4),
    "passthrough": _passthrough(None),
    "passthrough-scaled": _passthrough(0.37),
}


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def zoo(request, model_zoo) -> tuple[Path, list[Path]]:
    dtype = request.param
    return model_zoo("llama", dtype=dtype), [
        model_zoo("llama", expert=e, dtype=dtype) for e in (1, 2)
    ]


def merged(write_recipe, tmp_path, recipe: dict, name: str) -> Path:
    out = tmp_path / name
    run_merge(write_recipe(recipe, f"{name}.yaml"), out, MergeOptions(device="cpu", progress=False))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_a_catalog_method_equals_its_reference_in_any_blocks(
    case, zoo, write_recipe, tmp_path, monkeypatch
):
    spec = CASES[case]
    base_path, expert_paths = zoo
    experts = expert_paths[: spec.experts]
    recipe = spec.recipe(base_path, experts)
    ours = load_model(merged(write_recipe, tmp_path, recipe, "whole"))
    base = load_model(base_path)
    inputs = [load_model(path) for path in experts]
    for name, tensor in ours.items():
        models = [model[name].float() for model in inputs]
        expected = spec.reference(base[name].float(), models).to(base[name].dtype)
        assert tensor.dtype == base[name].dtype, name
        assert torch.equal(tensor, expected), (
            name,
            (tensor.float() - expected.float()).abs().max(),
        )
    # rows of 8 entries in the tiny Llama's smallest matrices: blocks of one to a few rows
    monkeypatch.setattr(engine_shared, "CPU_BLOCK_ELEMENTS", 16)
    blocked = load_model(merged(write_recipe, tmp_path, recipe, "blocks"))
    assert blocked.keys() == ours.keys()
    for name, tensor in ours.items():
        assert torch.equal(blocked[name], tensor), name


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_a_catalog_merge(case, model_zoo, write_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = CASES[case]
    base = model_zoo("llama")
    experts = [model_zoo("llama", expert=e) for e in (1, 2)][: spec.experts]
    out = merged(write_recipe, tmp_path, spec.recipe(base, experts), "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
