"""The plan chooses each job's backend, kernel and settled parameters; the engine's threads
never outnumber the cores."""

from __future__ import annotations

import pytest
import torch
from kernel_check import on_backend

from della_cli.api import MergeOptions, prepare
from della_cli.engine import threads as engine_threads
from della_cli.kernels import KEEP, MAGPRUNE, WINDOW, assign_kernels, cpu_backend_installed
from della_cli.methods.counts import magnitude_rank_window
from della_cli.methods.randomness import derive_key
from della_cli.preflight import plan_merge

numba_installed = cpu_backend_installed()
needs_numba = pytest.mark.skipif(not numba_installed, reason="numba is not installed")


def merged_jobs(plan):
    return [job for job in plan.jobs if job.action == "merge"]


@needs_numba
def test_ties_settles_each_experts_rank_window_and_runs_the_cpu_block_kernel(bf16_recipe):
    _, _, plan = prepare(bf16_recipe("ties", {"density": 0.3}), MergeOptions(device="cpu"))
    for job in merged_jobs(plan):
        assert job.kernel.label == "cpu/block"
        for step in job.kernel.experts:
            assert step.sparsify == WINDOW
            assert step.window == magnitude_rank_window(job.numel, 0.3, None)
    assert all(job.kernel is None for job in plan.jobs if job.action == "copy")


@needs_numba
def test_della_settles_the_draw_key_of_each_expert_and_tensor(bf16_recipe):
    path = bf16_recipe("della", {"density": 0.7, "epsilon": 0.1}, seed=9)
    _, _, plan = prepare(path, MergeOptions(device="cpu"))
    job = merged_jobs(plan)[0]
    steps = job.kernel.experts
    assert [step.sparsify for step in steps] == [MAGPRUNE, MAGPRUNE]
    assert [step.key for step in steps] == [derive_key(9, job.name, m) for m in (0, 1)]


@needs_numba
def test_a_weighted_sum_runs_in_chunks_read_by_the_kernel(bf16_recipe):
    recipe, inputs, plan = prepare(bf16_recipe("task_arithmetic", {}), MergeOptions())
    names = {job.kernel.name for job in merged_jobs(plan)}
    assert names <= {"streamed_sum", "chunked_sum"}
    assert all(step.sparsify == KEEP for job in merged_jobs(plan) for step in job.kernel.experts)
    buffered = on_backend(plan, recipe, inputs, "cpu", stream_reads=False)
    assert {job.kernel.name for job in merged_jobs(buffered)} == {"chunked_sum"}


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("ties", {"density": 0.5}),
        ("della", {"density": 0.5, "epsilon": 0.1}),
        ("task_arithmetic", {}),
    ],
)
def test_cuda_float16_and_the_torch_preference_give_the_torch_backend(
    method, parameters, bf16_recipe, model_zoo, write_recipe
):
    recipe, inputs, plan = prepare(bf16_recipe(method, parameters), MergeOptions())
    on_cuda = assign_kernels(plan, recipe, inputs.base, inputs.experts, "cuda")
    preferred = on_backend(plan, recipe, inputs, "torch")
    for chosen in (on_cuda, preferred):
        assert {job.kernel.label for job in merged_jobs(chosen)} == {"torch/merge"}
    half = write_recipe(
        {
            "merge_method": method,
            "base_model": str(model_zoo("llama", dtype=torch.float16)),
            "models": [{"model": str(model_zoo("llama", expert=1, dtype=torch.float16))}],
            "parameters": parameters,
        },
        name="half.yaml",
    )
    _, _, plan = prepare(half, MergeOptions(device="cpu"))
    assert {job.kernel.label for job in merged_jobs(plan)} == {"torch/merge"}


def test_della_plan_shows_the_kernel_of_each_group(bf16_recipe):
    report = plan_merge(bf16_recipe("dare_ties", {"density": 0.5}), None, MergeOptions())
    merged = [group for group in report.groups if group["action"] == "merged"]
    assert merged and all(group["kernel"] for group in merged)
    lines = "\n".join(report.summary_lines())
    assert f"[{merged[0]['kernel']}]" in lines


@pytest.mark.parametrize(("asked", "cores", "total"), [(None, 2, 2), (1, 2, 1), (64, 4, 4)])
def test_threads_never_outnumber_the_usable_cores(asked, cores, total, monkeypatch):
    monkeypatch.setattr(engine_threads, "usable_cores", lambda: cores)
    budget = engine_threads.ThreadBudget(asked)
    assert budget.total == total
    assert budget.chunk_helpers == total - 1
    assert budget.kernel_threads == total  # the reader and writer mostly wait: not counted
    assert budget.torch_threads == max(1, total - 2)  # torch's threads spin between steps


def test_numba_gets_a_writable_cache_where_the_package_and_home_are_read_only(
    tmp_path, monkeypatch
):
    from della_cli.backends import cpu

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu.os, "access", lambda path, mode: False)
    monkeypatch.setattr(cpu.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    cpu.ensure_numba_cache()
    assert cpu.os.environ["NUMBA_CACHE_DIR"].startswith(str(tmp_path / "tmp" / "della-numba-"))
    monkeypatch.setattr(cpu.os, "access", lambda path, mode: True)
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/elsewhere")
    cpu.ensure_numba_cache()
    assert cpu.os.environ["NUMBA_CACHE_DIR"] == "/elsewhere"


@needs_numba
def test_the_engine_refuses_a_plan_made_for_the_cpu_on_another_device(bf16_recipe):
    from della_cli.engine import MergeEngine

    recipe, inputs, plan = prepare(bf16_recipe("ties", {"density": 0.5}), MergeOptions())
    with pytest.raises(ValueError, match="made for the CPU"):
        MergeEngine(recipe, plan, inputs, "cuda:0")
