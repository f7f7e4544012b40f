"""Issue 18 on CUDA (skipped without a CUDA device): blocks copied ahead from pinned memory,
several devices (real ones where there are several, else two workers sharing one GPU, which
runs the same code), a real out-of-memory error retried, and the non-finite check read after
the merge. Every method's bytes against the CPU merge's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from della_cli.api import MergeOptions, prepare, run_merge
from della_cli.device_plan import spread_jobs
from della_cli.engine import MergeEngine
from della_cli.io.writer import ShardWriter

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
    "slerp": {"t": 0.3},
    "multislerp": {},
}
EXACT = {"della", "della_linear", "dare_ties", "dare_linear"}  # the CPU's bytes on CUDA
SHAPES = {"big.weight": (1024, 768), "small.weight": (48, 64), "norm.weight": (64,)}


def bfloat16_models(tmp_path, nan_in: str | None = None) -> list:
    generator = torch.Generator().manual_seed(3)
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in SHAPES.items()}
    folders = []
    for index in range(3):
        tensors = {
            name: (value + torch.randn(value.shape, generator=generator) * 0.01 * (index > 0))
            for name, value in base.items()
        }
        if nan_in and index == 1:
            tensors[nan_in].view(-1)[5] = float("nan")
        folder = tmp_path / f"model{index}"
        folder.mkdir()
        save_file({k: v.bfloat16() for k, v in tensors.items()}, folder / "model.safetensors")
        (folder / "config.json").write_text('{"model_type": "synthetic"}')
        folders.append(folder)
    return folders


def recipe(folders, method, write_recipe):
    models = folders[1:2] if method == "slerp" else folders[1:]
    return write_recipe(
        {
            "merge_method": method,
            "base_model": str(folders[0]),
            "models": [
                {"model": str(folder), "parameters": {"weight": index + 1}}
                for index, folder in enumerate(models)
            ],
            "parameters": PARAMETERS[method],
            "seed": 9,
        },
        name=f"{method}.yaml",
    )


def merged(recipe_path, out, device, warnings=None, allow_nonfinite=False) -> dict:
    options = MergeOptions(device=device, progress=False, allow_nonfinite=allow_nonfinite)
    run_merge(recipe_path, out, options, on_warning=warnings)
    return load_file(out / "model.safetensors")


def merged_on_workers(recipe_path, folder, devices: list[str], block_elements: int) -> dict:
    """The merge's tensors with the plan spread over ``devices`` by hand (``cuda:0`` twice:
    two workers, two copy streams, on one GPU) in blocks of ``block_elements``."""
    recipe_obj, inputs, plan = prepare(recipe_path, MergeOptions(device="cuda:0"))
    plan = spread_jobs(dataclasses.replace(plan, devices=("cuda:0",)), devices)
    engine = MergeEngine(recipe_obj, plan, inputs, "cuda:0", block_elements=block_elements)
    assert len(engine.workers) == len(devices)
    folder.mkdir()
    writer = ShardWriter(folder, plan.shards)
    engine.run(writer)
    written = {}
    for name in writer.close():
        written.update(load_file(folder / name))
    return written


def assert_matches_cpu(got: dict, expected: dict, method: str) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if method in EXACT:
            assert torch.equal(got[name].view(torch.int16), value.view(torch.int16)), name
        else:
            torch.testing.assert_close(got[name], value)


@pytest.mark.parametrize("method", sorted(PARAMETERS))
def test_one_gpu_and_several_workers_match_the_cpu(method, write_recipe, tmp_path):
    folders = bfloat16_models(tmp_path)
    path = recipe(folders, method, write_recipe)
    cpu = merged(path, tmp_path / "cpu", "cpu")
    assert_matches_cpu(merged(path, tmp_path / "gpu", "cuda"), cpu, method)
    # one worker and two on one GPU, in blocks small enough that tensors span several
    one = merged_on_workers(path, tmp_path / "one", ["cuda:0"], 64 * 768)
    two = merged_on_workers(path, tmp_path / "two", ["cuda:0", "cuda:0"], 64 * 768)
    assert_matches_cpu(two, cpu, method)
    assert two.keys() == one.keys()
    for name, value in one.items():  # the same device's math: the same bytes
        assert torch.equal(two[name].view(torch.int16), value.view(torch.int16)), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("method", ["della", "ties", "slerp"])
def test_several_gpus_write_the_bytes_of_one(method, write_recipe, tmp_path):
    folders = bfloat16_models(tmp_path)
    path = recipe(folders, method, write_recipe)
    one = merged(path, tmp_path / "one", "cuda:0")
    several = merged(path, tmp_path / "several", "cuda:0,cuda:1")
    for name, value in one.items():
        assert torch.equal(several[name].view(torch.int16), value.view(torch.int16)), name


@pytest.mark.parametrize("method", ["della", "ties", "slerp"])
def test_a_real_out_of_memory_error_is_retried_with_one_warning(method, write_recipe, tmp_path):
    """The process may use 8 MB of the device's memory: the blocks of ``big.weight`` fail for
    real and are merged in halves or on the CPU; the merge finishes with the CPU's bytes (or
    float32 rounding of them) and one warning."""
    folders = bfloat16_models(tmp_path)
    path = recipe(folders, method, write_recipe)
    cpu = merged(path, tmp_path / "cpu", "cpu")
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(8e6 / torch.cuda.mem_get_info()[1])
    warnings: list[str] = []
    try:
        got = merged(path, tmp_path / "gpu", "cuda", warnings.append)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert len(warnings) == 1 and "ran out of memory" in warnings[0], warnings
    assert_matches_cpu(got, cpu, method)


def test_non_finite_inputs_are_still_reported_on_the_device(write_recipe, tmp_path):
    folders = bfloat16_models(tmp_path, nan_in="small.weight")
    warnings: list[str] = []
    path = recipe(folders, "della", write_recipe)
    merged(path, tmp_path / "out", "cuda", warnings.append, allow_nonfinite=True)
    assert any("NaN or Inf values in 'small.weight'" in warning for warning in warnings)
    assert not any("'big.weight'" in warning for warning in warnings)
