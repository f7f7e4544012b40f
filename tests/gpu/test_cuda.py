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
DEVICE = "cuda"

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


def merged_on_both_devices(recipe, tmp_path) -> tuple[dict, dict]:
    """The tensors of ``recipe`` merged on the CPU and on the CUDA device."""
    run_merge(recipe, tmp_path / "cpu", MergeOptions(device="cpu"))
    run_merge(recipe, tmp_path / "cuda", MergeOptions(device=DEVICE))
    return tuple(load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "cuda"))


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
    cpu, cuda = merged_on_both_devices(recipe, tmp_path)
    assert cpu.keys() == cuda.keys()
    for name, expected in cpu.items():
        if method in EXACT:
            assert torch.equal(cuda[name].view(torch.int32), expected.view(torch.int32)), name
        else:
            torch.testing.assert_close(cuda[name], expected, rtol=1e-6, atol=1e-7)


def _write_bfloat16_model(folder, tensors):
    """A model folder of bfloat16 tensors large enough to be merged in row blocks."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text('{"model_type": "synthetic"}')
    return folder


@pytest.mark.parametrize("method", ["della", "dare_ties", "ties", "task_arithmetic"])
def test_cuda_matches_cpu_on_large_bfloat16_tensors(method, write_recipe, tmp_path):
    generator = torch.Generator().manual_seed(0)
    shapes = {"layers.0.up_proj.weight": (2560, 2048), "norm.weight": (2048,)}
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    folders = [_write_bfloat16_model(tmp_path / "base", {k: v.bfloat16() for k, v in base.items()})]
    for index in (1, 2):
        expert = {
            k: (v + torch.randn(v.shape, generator=generator) * 0.01).bfloat16()
            for k, v in base.items()
        }
        folders.append(_write_bfloat16_model(tmp_path / f"expert{index}", expert))
    recipe = write_recipe(
        {
            "merge_method": method,
            "base_model": str(folders[0]),
            "models": [{"model": str(folder)} for folder in folders[1:]],
            "parameters": PARAMETERS[method],
            "seed": 5,
        }
    )
    cpu, cuda = merged_on_both_devices(recipe, tmp_path)
    assert cpu.keys() == cuda.keys() == shapes.keys()
    for name, expected in cpu.items():
        assert cuda[name].dtype == torch.bfloat16
        if method in EXACT:
            assert torch.equal(cuda[name].view(torch.int16), expected.view(torch.int16)), name
        else:
            torch.testing.assert_close(cuda[name], expected)


def test_plan_on_cuda_measures_the_device_and_refuses_what_cannot_fit(
    model_zoo, write_recipe, monkeypatch
):
    from della_cli import preflight
    from della_cli.errors import PlanError

    recipe = write_recipe(
        {
            "merge_method": "della",
            "base_model": str(model_zoo("llama")),
            "models": [{"model": str(model_zoo("llama", expert=1))}],
            "parameters": {"density": 0.7, "epsilon": 0.07},
        }
    )
    report = preflight.plan_merge(recipe, None, MergeOptions(device="cuda:0"))
    free, total = torch.cuda.mem_get_info(0)
    assert report.can_run and report.device.startswith("cuda")
    (device,) = report.devices
    assert device["device"] == "cuda:0" and 0 < device["free_bytes"] <= total
    assert abs(device["free_bytes"] - free) < total // 10
    assert 0 < device["needed_bytes"] < device["free_bytes"]
    monkeypatch.setattr(preflight, "available_memory", lambda device: 1000)
    report = preflight.plan_merge(recipe, None, MergeOptions(device="cuda:0"))
    assert report.problems[0].startswith("cuda:0 has 1.0 kB free but the merge needs about")
    with pytest.raises(PlanError, match=r"cuda:0 has 1\.0 kB free"):
        run_merge(recipe, recipe.parent / "out", MergeOptions(device="cuda:0"))
    assert not (recipe.parent / "out").exists()


@pytest.mark.parametrize("method", ["della", "ties", "task_arithmetic"])
def test_cuda_merges_degenerate_shapes_like_the_cpu(method, tensor_models, write_recipe, tmp_path):
    """Empty, scalar, one-entry and one-column tensors on the device."""
    shapes = {"empty": (0, 8), "column": (16, 1), "rows": (4, 32)}
    if method != "ties":  # a trim of one entry keeps none: refused by the plan
        shapes.update(scalar=(), one=(1,))
    folders = tensor_models(shapes)
    recipe = write_recipe(
        {
            "merge_method": method,
            "base_model": str(folders[0]),
            "models": [{"model": str(f)} for f in folders[1:]],
            "parameters": PARAMETERS[method],
        }
    )
    cpu, cuda = merged_on_both_devices(recipe, tmp_path)
    assert cpu.keys() == cuda.keys() == shapes.keys()
    for name, expected in cpu.items():
        assert cuda[name].shape == expected.shape
        torch.testing.assert_close(cuda[name], expected, rtol=1e-6, atol=1e-7)


# mergekit's other methods (the plan's torch/<method> kernels): their statistics and merge
# passes on the device, against the same kernels on the CPU, to float32 rounding. (The
# selections, sce's top-k and arcee_fusion's outliers, may keep other entries where rounding
# moves a score across the threshold, so they are left out here.)
CATALOG = {
    "slerp": ({"t": 0.3}, 1, True),
    "nuslerp": ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, 2, True),
    "multislerp": ({}, 2, True),
    "karcher": ({}, 2, False),
    "model_stock": ({}, 2, True),
    "sce": ({}, 2, True),
    "nearswap": ({"t": 0.01}, 1, True),
    "ramplus_tl": ({"epsilon": 0.01}, 2, True),
    "passthrough": ({}, 1, False),
}


@pytest.mark.parametrize("method", sorted(CATALOG))
def test_cuda_catalog_merge_matches_cpu_merge(method, model_zoo, write_recipe, tmp_path):
    parameters, count, with_base = CATALOG[method]
    recipe: dict = {"merge_method": method}
    if with_base:
        recipe["base_model"] = str(model_zoo("llama"))
    weighted = method in ("nuslerp", "multislerp")
    recipe["models"] = [
        {
            "model": str(model_zoo("llama", expert=e)),
            **({"parameters": {"weight": e}} if weighted else {}),
        }
        for e in (1, 2)[:count]
    ]
    if parameters:
        recipe["parameters"] = parameters
    cpu, cuda = merged_on_both_devices(write_recipe(recipe), tmp_path)
    assert cpu.keys() == cuda.keys()
    for name, expected in cpu.items():
        torch.testing.assert_close(cuda[name], expected, rtol=1e-5, atol=1e-6)
