"""A merge spread over several torch devices: the plan gives each tensor a device by bytes,
one worker per device merges its tensors, and the output is byte for byte the one device's and
the CPU backend's. Several CPU torch devices (``cpu,cpu``) stand in for several GPUs here;
tests/gpu/test_gpupath_cuda.py runs the same on CUDA."""

from __future__ import annotations

import pytest

from della_cli.api import MergeOptions, prepare, run_merge
from della_cli.device_plan import device_loads, job_bytes, spread_jobs
from della_cli.devices import merge_devices, select_device
from della_cli.engine import MergeEngine
from della_cli.errors import UsageError
from della_cli.io.writer import ShardWriter

PARAMETERS = {
    "della": {"density": 0.7, "epsilon": 0.07, "lambda": 1.1},
    "dare_ties": {"density": 0.5},
    "ties": {"density": 0.3},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05},
    "task_arithmetic": {"lambda": 0.5},
    "linear": {},
    "slerp": {"t": 0.3},  # a catalog method: a statistics pass, then the merge
    "sce": {},
}


def recipe_of(method, model_zoo, write_recipe, **extra):
    models = [{"model": str(model_zoo("llama", expert=1))}]
    if method != "slerp":
        models.append({"model": str(model_zoo("llama", expert=2)), "parameters": {"weight": 0.5}})
    return write_recipe(
        {
            "merge_method": method,
            "base_model": str(model_zoo("llama")),
            "models": models,
            "parameters": PARAMETERS[method],
            "seed": 11,
            **extra,
        }
    )


def output_bytes(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("method", sorted(PARAMETERS))
def test_several_devices_write_the_bytes_of_one_and_of_the_cpu_backend(
    method, model_zoo, write_recipe, tmp_path
):
    recipe = recipe_of(method, model_zoo, write_recipe)
    outputs = {}
    for devices in ("cpu", "cpu,cpu", "cpu,cpu,cpu"):
        out = tmp_path / devices.replace(",", "-")
        report = run_merge(recipe, out, MergeOptions(device=devices, progress=False))
        assert report.device == devices
        outputs[devices] = output_bytes(out)
    assert outputs["cpu"]  # the CPU backend (numba, C), or torch for a catalog method
    assert outputs["cpu,cpu"] == outputs["cpu"]
    assert outputs["cpu,cpu,cpu"] == outputs["cpu"]


@pytest.mark.parametrize("method", ["della", "ties", "slerp"])
def test_several_devices_in_many_blocks_write_the_bytes_of_one(
    method, model_zoo, write_recipe, tmp_path
):
    """Blocks of 100 entries: most tensors span several blocks, so the devices' workers hand
    the writer results out of turn (and TIES's whole-tensor masks meet the blocks)."""
    recipe_path = recipe_of(method, model_zoo, write_recipe, out_dtype="float32")
    written = {}
    for devices in ("cpu", "cpu,cpu"):
        recipe, inputs, plan = prepare(recipe_path, MergeOptions(device=devices))
        engine = MergeEngine(recipe, plan, inputs, devices, block_elements=100)
        assert [jobs.device for jobs in engine.workers] == devices.split(",")
        assert any(len(engine.row_blocks(job)) > 1 for job in plan.jobs)
        folder = tmp_path / devices.replace(",", "-")
        folder.mkdir()
        writer = ShardWriter(folder, plan.shards)
        engine.run(writer)
        writer.close()
        written[devices] = output_bytes(folder)
    assert written["cpu,cpu"] == written["cpu"]


def test_the_plan_spreads_tensors_by_bytes_in_turn_and_always_alike(model_zoo, write_recipe):
    recipe_path = recipe_of("della", model_zoo, write_recipe)
    _, _, plan = prepare(recipe_path, MergeOptions(device="cpu,cpu"))
    _, _, again = prepare(recipe_path, MergeOptions(device="cpu,cpu"))
    assert plan.devices == ("cpu", "cpu")
    assert [job.device for job in plan.jobs] == [job.device for job in again.jobs]
    loads = [entry["bytes"] for entry in device_loads(plan)]
    assert sum(loads) == sum(job_bytes(job) for job in plan.jobs)
    assert abs(loads[0] - loads[1]) <= max(job_bytes(job) for job in plan.jobs)
    # each job to the device with the fewest bytes so far, the first on ties
    so_far = [0, 0]
    for job in plan.jobs:
        assert job.device == min((0, 1), key=lambda index: (so_far[index], index))
        so_far[job.device] += job_bytes(job)
    # every kernel is torch's: the CPU backend runs on one CPU "device" only
    assert all(job.kernel.backend == "torch" for job in plan.jobs if job.kernel)


def test_spreading_by_hand_over_three_devices(model_zoo, write_recipe):
    _, _, plan = prepare(recipe_of("linear", model_zoo, write_recipe), MergeOptions())
    assert plan.devices == ("cpu",) and {job.device for job in plan.jobs} == {0}
    spread = spread_jobs(plan, ["cuda:0", "cuda:1", "cuda:2"])
    assert spread.devices == ("cuda:0", "cuda:1", "cuda:2")
    assert [job.device for job in spread.jobs[:3]] == [0, 1, 2]
    assert {entry["device"] for entry in device_loads(spread)} == set(spread.devices)


def test_the_plan_shows_each_device(model_zoo, write_recipe):
    from della_cli.preflight import plan_merge

    report = plan_merge(recipe_of("ties", model_zoo, write_recipe), None, MergeOptions("cpu,cpu"))
    assert report.can_run
    assert [entry["device"] for entry in report.devices] == ["cpu", "cpu"]
    lines = [line for line in report.summary_lines() if line.startswith("device ")]
    assert len(lines) == 2 and "tensors" in lines[0] and "read and written" in lines[0]
    assert sum(entry["tensors"] for entry in report.devices) == report.tensors


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("cuda:0,cpu", "'cpu' in 'cuda:0,cpu' is not a numbered CUDA device"),
        ("cpu,cuda", "'cpu' in 'cpu,cuda' is not a numbered CUDA device"),
        ("cuda:0,cuda:0", "names a device twice"),
        ("cuda:0,cuda:1", "CUDA is not available"),
        ("gpu,cpu", "'gpu' in 'gpu,cpu' is not a device"),
        ("cuda,cuda:1", "'cuda' in 'cuda,cuda:1' is not a numbered CUDA device"),
    ],
)
def test_device_lists_are_checked(given, message):
    with pytest.raises(UsageError, match=message):
        select_device(given)


def test_device_lists_name_their_devices():
    assert select_device(" cpu,cpu ") == "cpu,cpu"
    assert merge_devices("cpu,cpu") == ["cpu", "cpu"]
    assert merge_devices("cpu") == ["cpu"]
    assert merge_devices("cuda:1") == ["cuda:1"]


def test_the_command_line_takes_a_list_of_devices(model_zoo, write_recipe, tmp_path):
    from typer.testing import CliRunner

    from della_cli.cli import app

    recipe = recipe_of("ties", model_zoo, write_recipe)
    runner = CliRunner()
    shown = runner.invoke(app, ["plan", str(recipe), "--devices", "cpu,cpu"])
    assert shown.exit_code == 0, shown.output
    assert [line.split(":")[0] for line in shown.stdout.splitlines() if "device " in line] == [
        "device cpu",
        "device cpu",
    ]
    refused = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "o"), "--devices", "cpu,x"])
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        "error: --devices: 'x' in 'cpu,x' is not a device; use auto, cpu, cuda or cuda:N, or a "
        "list such as cuda:0,cuda:1"
    ]
    assert not (tmp_path / "o").exists()
