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
from della_cli.methods import entrywise, selection, stock, streamed
from della_cli.methods import spherical_means as means
from della_cli.methods import spherical_pairs as pairs


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
        lambda base, models: pairs.slerp(base, models[0], t),
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


def _recipe(method: str, parameters: dict, weights: tuple | None = None, base: bool = True):
    """A recipe of ``method`` over the base (unless ``base`` is false) and the experts, with
    top-level ``parameters`` and per-model ``weights`` if given."""

    def build(base_path: Path, experts: list[Path]) -> dict:
        recipe: dict = {"merge_method": method}
        if base:
            recipe["base_model"] = str(base_path)
        recipe["models"] = [
            {"model": str(e), **({"parameters": {"weight": w}} if weights else {})}
            for e, w in zip(experts, weights or [None] * len(experts), strict=True)
        ]
        if parameters:
            recipe["parameters"] = parameters
        return recipe

    return build


def _nuslerp(flatten: bool, row_wise: bool, base: bool) -> Case:
    return Case(
        _recipe(
            "nuslerp",
            {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise},
            (1.0, 0.6),
            base,
        ),
        lambda b, models: pairs.nuslerp(
            models[0], models[1], [1.0, 0.6], b if base else None, flatten, row_wise
        ),
        experts=2,
    )


CASES: dict[str, Case] = {
    "slerp": _slerp(0.3),
    "slerp-extrapolated": _slerp(1.4),
    "passthrough": _passthrough(None),
    "passthrough-scaled": _passthrough(0.37),
    "nuslerp": _nuslerp(True, False, True),
    "nuslerp-rows-no-base": _nuslerp(False, False, False),
    "nuslerp-columns": _nuslerp(False, True, True),
    "model_stock": Case(
        _recipe("model_stock", {}),
        lambda base, models: stock.model_stock(models, base),
        experts=3,
    ),
    "model_stock-filter-wise": Case(
        _recipe("model_stock", {"filter_wise": True}),
        lambda base, models: stock.model_stock(models, base, filter_wise=True),
        experts=2,
    ),
    "sce": Case(_recipe("sce", {}), lambda base, models: selection.sce(models, base), experts=3),
    "sce-topk": Case(
        _recipe("sce", {"select_topk": 0.3}),
        lambda base, models: selection.sce(models, base, 0.3),
        experts=2,
    ),
    "multislerp": Case(
        _recipe("multislerp", {}, (1.0, 2.0, 0.5)),
        lambda base, models: means.multislerp(models, [1.0, 2.0, 0.5], base),
        experts=3,
    ),
    "multislerp-no-base": Case(
        _recipe("multislerp", {"normalize_weights": False}, (0.7, 0.4), base=False),
        lambda base, models: means.multislerp(models, [0.7, 0.4], normalize_weights=False),
        experts=2,
    ),
    "karcher": Case(
        _recipe("karcher", {}, base=False),
        lambda base, models: means.karcher(models),
        experts=3,
    ),
    "karcher-base-input": Case(
        _recipe("karcher", {"max_iter": 20}),
        lambda base, models: means.karcher([*models, base], max_iter=20),
        experts=2,
    ),
    "nearswap": Case(
        _recipe("nearswap", {"t": 0.01}),
        lambda base, models: entrywise.nearswap(base, models[0], 0.01),
    ),
    "arcee_fusion": Case(
        _recipe("arcee_fusion", {}),
        lambda base, models: selection.arcee_fusion(base, models[0]),
    ),
    "ram": Case(
        _recipe("ram", {"epsilon": 0.01}),
        lambda base, models: selection.ram(models, base, 0.01),
        experts=3,
    ),
    "ramplus_tl": Case(
        _recipe("ramplus_tl", {"epsilon": 0.01, "r": 0.5, "alpha": 0.8}),
        lambda base, models: selection.ramplus_tl(models, base, 0.5, 0.8, 0.01),
        experts=3,
    ),
}


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def zoo(request, model_zoo) -> tuple[Path, list[Path]]:
    dtype = request.param
    return model_zoo("llama", dtype=dtype), [
        model_zoo("llama", expert=e, dtype=dtype) for e in (1, 2, 3)
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
    # rows of 8 entries in the tiny Llama's smallest matrices: blocks of one to a few rows,
    # each merged one row at a time (the backend's row chunks)
    monkeypatch.setattr(engine_shared, "CPU_BLOCK_ELEMENTS", 16)
    monkeypatch.setattr(streamed, "CPU_CHUNK_ELEMENTS", 1)  # torch's and the CPU's chunks
    blocked = load_model(merged(write_recipe, tmp_path, recipe, "blocks"))
    assert blocked.keys() == ours.keys()
    for name, tensor in ours.items():
        assert torch.equal(blocked[name], tensor), name


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_a_catalog_merge(case, model_zoo, write_recipe, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = CASES[case]
    base = model_zoo("llama")
    experts = [model_zoo("llama", expert=e) for e in (1, 2, 3)][: spec.experts]
    out = merged(write_recipe, tmp_path, spec.recipe(base, experts), "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("case", ["slerp", "nuslerp-columns", "sce-topk", "arcee_fusion", "ram"])
def test_each_pass_reads_one_block_at_a_time_as_often_as_the_plan_says(
    case, model_zoo, write_recipe, tmp_path, monkeypatch
):
    """Memory stays a few blocks: no read of a merge job spans more rows than a block, and a
    tensor of several blocks is read once per pass the plan reports, or once for all its
    passes where the CPU backend keeps its inputs in memory (``engine.held``; the plan says
    "inputs read once"). The first block of a tensor of one block is reused by its passes."""
    from della_cli.engine import held
    from della_cli.engine.rows import RowLoader
    from della_cli.engine.shared import rows_shape

    spec = CASES[case]
    experts = [model_zoo("llama", expert=e) for e in (1, 2, 3)][: spec.experts]
    recipe = spec.recipe(model_zoo("llama"), experts)
    reads: dict[str, list[int]] = {}
    jobs = {}
    load = RowLoader.load

    def recording(self, task, pool=None):
        if task.job.action == "merge":
            reads.setdefault(task.job.name, []).append(task.stop - task.start)
            jobs[task.job.name] = task.job
        return load(self, task, pool)

    monkeypatch.setattr(RowLoader, "load", recording)
    monkeypatch.setattr(engine_shared, "CPU_BLOCK_ELEMENTS", 64)
    # every tensor within the default budget kept, the largest too (``held.budget_of``)
    monkeypatch.setattr(held, "REPEATED_TENSORS", 1)
    merged(write_recipe, tmp_path, recipe, "out")
    several = 0
    for name, spans in reads.items():
        job = jobs[name]
        rows, length = rows_shape(job.shape)
        block_rows = max(1, 64 // length)
        assert max(spans) <= block_rows or rows * length <= 64, (name, spans)
        blocks = -(-rows // block_rows) if rows * length > 64 else 1
        if blocks > 1:
            several += 1
            kept = job.kernel.backend == "cpu" and job.kernel.passes > 1
            reads_per_block = 1 if kept else job.kernel.passes
            assert len(spans) == reads_per_block * blocks, (name, len(spans), blocks)
        else:
            assert len(spans) == 1, (name, spans)
    assert several > 0


def _without(folder: Path, name: str, out: Path) -> Path:
    """A copy of the model ``folder`` that lacks tensor ``name``."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(folder, out)
    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        tensors.pop(name, None)
        save_file(tensors, path, metadata={"format": "pt"})
    return out


def test_a_tensor_the_other_model_lacks_is_the_bases_and_nuslerp_refuses_it(
    model_zoo, write_recipe, tmp_path
):
    """slerp: a tensor missing from the other model is the base's (with a warning); nuslerp,
    which needs both models, names the tensor and the model in the plan's problems."""
    from della_cli.errors import PlanError

    base = model_zoo("llama")
    name = "model.layers.0.mlp.up_proj.weight"
    lacking = _without(model_zoo("llama", expert=1), name, tmp_path / "lacking")
    report = run_merge(
        write_recipe(_slerp(0.5).recipe(base, [lacking]), "slerp.yaml"),
        tmp_path / "slerp",
        MergeOptions(device="cpu", progress=False),
    )
    assert any(name in warning for warning in report.warnings)
    assert torch.equal(load_model(tmp_path / "slerp")[name], load_model(base)[name])
    recipe = _nuslerp(True, False, True).recipe(base, [lacking, model_zoo("llama", expert=2)])
    with pytest.raises(PlanError) as caught:
        run_merge(
            write_recipe(recipe, "nuslerp.yaml"),
            tmp_path / "nuslerp",
            MergeOptions(device="cpu", progress=False),
        )
    assert f"nuslerp needs 2 models for '{name}'" in str(caught.value)
