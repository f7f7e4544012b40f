"""The plan sizes CUDA blocks to each device's free memory (``device_plan.fit_device_blocks``),
here with free-memory figures given by the test: the block halves until the largest job fits,
and a device too small for the smallest block refuses the plan in one line."""

from __future__ import annotations

import dataclasses

import pytest

from della_cli.api import MergeOptions, prepare
from della_cli.device_plan import (
    MIN_DEVICE_BLOCK_ELEMENTS,
    device_memory_bytes,
    fit_device_blocks,
    spread_jobs,
)
from della_cli.engine import CUDA_BLOCK_ELEMENTS, MergeEngine
from della_cli.plan_types import Source, TensorJob

MIB = 1 << 20
START = 1 << 26  # the block size the plan starts from in these tests (64M entries)


def big_plan(model_zoo, write_recipe, devices):
    """A della plan of the tiny Llama, with one 8192 x 4096 tensor added (bigger than the
    smallest block, so that the block size matters), spread over ``devices``."""
    recipe = write_recipe(
        {
            "merge_method": "della",
            "base_model": str(model_zoo("llama")),
            "models": [{"model": str(model_zoo("llama", expert=e))} for e in (1, 2)],
            "parameters": {"density": 0.7, "epsilon": 0.1},
        }
    )
    _, _, plan = prepare(recipe, MergeOptions())
    template = next(job for job in plan.jobs if job.action == "merge")
    big = TensorJob(
        "big.weight", "merge", (8192, 4096), "BF16", Source(-1, "big.weight"),
        template.experts, template.kernel,
    )  # fmt: skip
    return spread_jobs(dataclasses.replace(plan, jobs=[big, *plan.jobs]), devices)


def test_a_block_that_fits_is_kept(model_zoo, write_recipe):
    plan = big_plan(model_zoo, write_recipe, ["cuda:0", "cuda:1"])
    block, figures, problems = fit_device_blocks(plan, START, False, lambda device: 80 << 30)
    assert block == START and problems == []
    assert [figure["device"] for figure in figures] == ["cuda:0", "cuda:1"]
    assert figures[0]["needed_bytes"] == device_memory_bytes(plan, 0, block, False)
    assert figures[0]["free_bytes"] == 80 << 30


def test_the_block_is_halved_until_the_largest_job_fits(model_zoo, write_recipe):
    plan = big_plan(model_zoo, write_recipe, ["cuda:0", "cuda:1"])
    whole = device_memory_bytes(plan, 0, START, False)
    # the 32M-entry tensor (on cuda:0, the first job) in one block: 3 inputs stored (2 bytes)
    # twice (this block and the next, copied ahead) and 2 x 2 + 5 float32 temporaries
    assert whole == 8192 * 4096 * (2 * 3 * 2 + 9 * 4)
    free = {"cuda:0": whole // 5, "cuda:1": 80 << 30}
    block, figures, problems = fit_device_blocks(plan, START, False, free.__getitem__)
    assert problems == []
    # 64M and 32M entries: the whole tensor; 16M and 8M: a half and a quarter of it, too
    # much; 4M, an eighth, fits
    assert block == START // 16
    assert figures[0]["needed_bytes"] <= free["cuda:0"] < 2 * figures[0]["needed_bytes"]


def test_a_device_without_room_for_the_smallest_block_refuses_in_one_line(model_zoo, write_recipe):
    plan = big_plan(model_zoo, write_recipe, ["cuda:0", "cuda:1"])
    free = {"cuda:0": 3 * MIB, "cuda:1": 80 << 30}
    block, figures, problems = fit_device_blocks(plan, START, True, free.__getitem__)
    assert block == MIN_DEVICE_BLOCK_ELEMENTS
    assert figures[0]["needed_bytes"] > figures[0]["free_bytes"] == 3 * MIB
    assert len(problems) == 1
    assert problems[0].startswith("cuda:0 has 3.1 MB free but the merge needs about ")
    assert "blocks of 1,048,576 entries" in problems[0] and "--devices" in problems[0]


def test_the_cpu_is_not_measured(model_zoo, write_recipe):
    plan = big_plan(model_zoo, write_recipe, ["cpu", "cpu"])
    block, figures, problems = fit_device_blocks(plan, 1 << 22, False, lambda device: 0)
    assert (block, figures, problems) == (1 << 22, [], [])


def test_the_engine_merges_in_the_blocks_the_plan_chose(model_zoo, write_recipe):
    recipe_path = write_recipe(
        {
            "merge_method": "linear",
            "models": [{"model": str(model_zoo("llama", expert=e))} for e in (1, 2)],
        }
    )
    recipe, inputs, plan = prepare(recipe_path, MergeOptions())
    plan.block_elements = 4096
    assert MergeEngine(recipe, plan, inputs, "cpu").block_elements == 4096
    plan.block_elements = None
    assert MergeEngine(recipe, plan, inputs, "cpu").block_elements == 1 << 22


def cuda_session(model_zoo, write_recipe, devices: str):
    """A session planned for ``devices`` (CUDA names, on a machine without CUDA: the plan
    only names them; nothing here computes on them)."""
    from della_cli.session import MergeSession

    recipe = write_recipe(
        {
            "merge_method": "ties",
            "base_model": str(model_zoo("llama")),
            "models": [{"model": str(model_zoo("llama", expert=e))} for e in (1, 2)],
            "parameters": {"density": 0.5},
        }
    )
    session = MergeSession.open(recipe, MergeOptions(device="cpu", progress=False))
    session.device = devices
    return session


def test_the_preflight_measures_each_cuda_device_and_refuses_one_too_small(
    model_zoo, write_recipe, tmp_path, monkeypatch
):
    from della_cli import preflight
    from della_cli.api import run_merge
    from della_cli.errors import PlanError

    free = {"cuda:0": 80 << 30, "cuda:1": 1000, "cpu": 16 << 30}
    monkeypatch.setattr(preflight, "available_memory", free.__getitem__)
    session = cuda_session(model_zoo, write_recipe, "cuda:0,cuda:1")
    report, plan = preflight.assess(session, None)
    assert plan.devices == ("cuda:0", "cuda:1")
    assert [entry["device"] for entry in report.devices] == ["cuda:0", "cuda:1"]
    assert report.devices[1]["free_bytes"] == 1000
    assert report.problems == [
        f"cuda:1 has 1.0 kB free but the merge needs about "
        f"{preflight.human_size(report.devices[1]['needed_bytes'])} there even in blocks of "
        "1,048,576 entries; free the device, use another one or more of them (--devices), "
        "or --device cpu"
    ]
    assert report.available_memory_bytes == 16 << 30  # the host's, for the host's buffers
    assert "on the host" in " ".join(report.summary_lines())
    session.close()
    session = cuda_session(model_zoo, write_recipe, "cuda:0,cuda:1")
    with pytest.raises(PlanError, match=r"cuda:1 has 1\.0 kB free"):
        run_merge(session, tmp_path / "out", session.options)
    assert not (tmp_path / "out").exists()


def test_the_preflight_keeps_the_block_size_where_the_devices_have_room(
    model_zoo, write_recipe, monkeypatch
):
    from della_cli import preflight

    monkeypatch.setattr(preflight, "available_memory", lambda device: 80 << 30)
    session = cuda_session(model_zoo, write_recipe, "cuda:0")
    report, plan = preflight.assess(session, None)
    session.close()
    assert report.can_run and plan.block_elements == CUDA_BLOCK_ELEMENTS
    (line,) = [line for line in report.summary_lines() if line.startswith("device ")]
    assert line.startswith("device cuda:0: ") and "(85.9 GB free)" in line
    assert f"blocks of {CUDA_BLOCK_ELEMENTS:,} entries need about" in line
