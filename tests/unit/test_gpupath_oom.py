"""A device that runs out of memory mid-merge: the block is merged again in halves, then on
the CPU, with one warning and the same bytes (``engine.memory_retry``). The out-of-memory
errors come from the torch backend's seam (``TorchBackend.fault_injector``), on CPU torch
workers (``cpu,cpu``) standing in for GPUs."""

from __future__ import annotations

import pytest
import torch

from della_cli.api import MergeOptions, run_merge
from della_cli.backends.torch_backend import SimulatedOutOfMemory, TorchBackend
from della_cli.engine.memory_retry import MIN_RETRY_ELEMENTS, retryable

PARAMETERS = {
    "della": {"density": 0.7, "epsilon": 0.07, "lambda": 1.1},
    "ties": {"density": 0.3},
    "task_arithmetic": {"lambda": 0.5},
    "slerp": {"t": 0.3},
    "sce": {},
}
# 512 x 512: a block a retry can halve (twice the smallest retry block, and more).
SHAPES = {"big.weight": (512, 512), "small.weight": (16, 32), "norm.weight": (32,)}
assert SHAPES["big.weight"][0] * SHAPES["big.weight"][1] >= 4 * MIN_RETRY_ELEMENTS


def merged(folders, method, write_recipe, out, devices="cpu,cpu") -> tuple[bytes, list[str]]:
    models = [{"model": str(folder)} for folder in folders[1 : 2 if method == "slerp" else 3]]
    recipe = write_recipe(
        {
            "merge_method": method,
            "base_model": str(folders[0]),
            "models": models,
            "parameters": PARAMETERS[method],
            "seed": 4,
        },
        name=f"{out.name}.yaml",
    )
    warnings: list[str] = []
    run_merge(recipe, out, MergeOptions(device=devices, progress=False), on_warning=warnings.append)
    return (out / "model.safetensors").read_bytes(), warnings


def devices_fail_above(limit: int, seen: list[tuple[str, int]]):
    """An injector under which every device (not the CPU fallback) has room for ``limit``
    entries per block."""

    def inject(backend: TorchBackend, elements: int) -> bool:
        seen.append(("fallback" if backend.fallback else str(backend.device), elements))
        return not backend.fallback and elements > limit

    return inject


@pytest.mark.parametrize("method", sorted(PARAMETERS))
def test_blocks_too_big_for_the_device_are_halved_with_one_warning(
    method, tensor_models, write_recipe, tmp_path, monkeypatch
):
    folders = tensor_models(SHAPES)
    expected, quiet = merged(folders, method, write_recipe, tmp_path / "free")
    assert quiet == []
    seen: list[tuple[str, int]] = []
    # Room for a quarter of the big tensor's rows with their 2 or 3 inputs (128 x 512 x 3 =
    # 196,608 entries), not for the whole tensor: its keep masks and statistics go to the CPU.
    limit = 200_000
    monkeypatch.setattr(TorchBackend, "fault_injector", devices_fail_above(limit, seen))
    got, warnings = merged(folders, method, write_recipe, tmp_path / "tight")
    assert got == expected
    assert len(warnings) == 1 and "ran out of memory" in warnings[0], warnings
    assert "'big.weight'" in warnings[0]
    sizes = {elements for where, elements in seen if where == "cpu"}
    assert any(limit // 2 < size <= limit for size in sizes)  # quarters of big.weight fit
    if method in ("ties", "slerp", "sce"):  # a whole-tensor step first: that went to the CPU
        assert any(where == "fallback" for where, _ in seen)


@pytest.mark.parametrize("method", ["della", "ties", "slerp"])
def test_a_device_with_no_room_at_all_leaves_every_block_to_the_cpu(
    method, tensor_models, write_recipe, tmp_path, monkeypatch
):
    folders = tensor_models(SHAPES)
    expected, _ = merged(folders, method, write_recipe, tmp_path / "free", devices="cpu")
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(TorchBackend, "fault_injector", devices_fail_above(0, seen))
    got, warnings = merged(folders, method, write_recipe, tmp_path / "none")
    assert got == expected  # and the CPU backend's bytes (numba, C) where one ran above
    assert len(warnings) == 1 and "ran out of memory" in warnings[0]
    assert {where for where, elements in seen if elements} >= {"cpu", "fallback"}


def test_other_errors_are_not_retried(tensor_models, write_recipe, tmp_path, monkeypatch):
    def broken(backend: TorchBackend, elements: int) -> bool:
        raise RuntimeError("device lost")

    monkeypatch.setattr(TorchBackend, "fault_injector", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        merged(tensor_models(SHAPES), "della", write_recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_only_a_gpu_or_simulated_out_of_memory_error_is_retried():
    """On the CPU, torch may have changed a float32 block in place before failing."""
    from della_cli.engine.threads import ThreadBudget
    from della_cli.engine.torch_jobs import TorchJobs
    from della_cli.methods import registry

    jobs = TorchJobs("cpu", "F32", registry.METHODS["della"], ThreadBudget(1))
    assert retryable(jobs, SimulatedOutOfMemory("test"))
    assert not retryable(jobs, torch.OutOfMemoryError("CPU allocator"))
    assert not retryable(jobs, RuntimeError("other"))
