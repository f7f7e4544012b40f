"""A merge in parts on a local multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and
two worker nodes, processes on this machine) gives exactly the bytes of the merge on one
machine: every method (each in 1, 2, 3 or 7 parts, in turn), with the parts folder shared, with
every shard pulled through Ray's object store, with 7 parts on 3 nodes, and with a part's
worker killed (SIGKILL) midway, which Ray runs again and which keeps the shards its killed
attempt finished.

Ray is an optional extra (``pip install della-cli[ray]``): these tests skip without it, and
fail under CI (``CI=true``), where ``.ci/run`` installs it. One cluster serves the module: it
takes 15-20 s to start on two cores.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from parts_models import build_toy_models, method_recipe
from parts_models import options as toy_options
from safetensors.torch import save_file
from typer.testing import CliRunner

from della_cli.api import MergeOptions, run_merge
from della_cli.cli import app
from della_cli.methods import METHODS

SHARD_BYTES = 6000
PART_COUNTS = (1, 2, 3, 7)


def _ray():
    try:
        import ray
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("Ray is not installed; .ci/run installs it (pip install -e '.[ray]')")
        pytest.skip("Ray is not installed (pip install 'della-cli[ray]')")
    return ray


@pytest.fixture(scope="module")
def cluster():
    """Three Ray nodes of one CPU each on this machine, this process connected as driver."""
    ray = _ray()
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        nodes.add_node(num_cpus=1)
    ray.init(address=nodes.address, log_to_driver=False)
    nodes.wait_for_nodes()
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """DELLA (random drops) over a base and two experts of eight (32, 48) float32 tensors."""
    root = tmp_path_factory.mktemp("parts-ray")
    folders = []
    for index in range(3):
        generator = torch.Generator().manual_seed(10 + index)
        tensors = {f"layers.{k}.weight": torch.randn(32, 48, generator=generator) for k in range(8)}
        folder = root / f"m{index}"
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
        folders.append(folder)
    recipe = {
        "merge_method": "della",
        "base_model": str(folders[0]),
        "models": [
            {"model": str(f), "parameters": {"weight": 0.7, "density": 0.5, "epsilon": 0.2}}
            for f in folders[1:]
        ],
        "seed": 9,
    }
    path = root / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


def options() -> MergeOptions:
    return MergeOptions(device="cpu", out_shard_bytes=SHARD_BYTES, progress=False)


@pytest.fixture(scope="module")
def whole(recipe, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ray-whole") / "out"
    assert run_merge(recipe, out, options()).shards == 8
    return files_of(out)


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize(("count", "gather"), [(3, "pull"), (7, "auto")])
def test_parts_on_a_ray_cluster_give_the_bytes_of_one_machine(
    cluster, recipe, whole, tmp_path, count, gather
):
    from della_cli.ray_runner import run_on_ray

    events = []
    out = tmp_path / "out"
    run_on_ray(recipe, out, options(), None, count, on_event=events.append, gather=gather)
    assert files_of(out) == whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    finished = sorted(e.part for e in events if e.kind == "finished")
    assert finished == sorted(f"{n}/{count}" for n in range(1, count + 1))
    pulled = {e.part for e in events if e.kind == "pulled"}
    assert pulled == (set(finished) if gather == "pull" else set())
    # more parts than one node holds at once: Ray spreads them
    assert len({e.node for e in events if e.kind == "started"}) >= 2


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory) -> list[Path]:
    return build_toy_models(tmp_path_factory.mktemp("ray-toy-models"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_the_cluster_gives_the_bytes_of_one_machine(
    cluster, method, toy_models, tmp_path
):
    """Each method in one of 1, 2, 3 and 7 parts, in turn: every method runs on the
    cluster, and every part count for several methods (in-process, every method runs in
    every part count: test_parts_same_bytes.py)."""
    from della_cli.ray_runner import run_on_ray

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(method_recipe(method, toy_models)))
    run_merge(recipe, tmp_path / "one" / "out", toy_options())
    count = PART_COUNTS[sorted(METHODS).index(method) % len(PART_COUNTS)]
    run_on_ray(recipe, tmp_path / "ray" / "out", toy_options(), None, count)
    assert files_of(tmp_path / "ray" / "out") == files_of(tmp_path / "one" / "out")


def test_a_part_whose_worker_is_killed_is_run_again_and_keeps_its_shards(
    cluster, recipe, whole, tmp_path
):
    """The kill lands while the part runs: with one progress slot, a part cannot finish
    before the driver has read its messages, and the driver kills it on reading the first."""
    from della_cli.ray_runner import run_on_ray

    events, killed = [], []

    def on_event(event) -> None:
        events.append(event)
        started = [e.pid for e in events if e.kind == "started" and e.part == "2/3"]
        if event.kind == "merged" and event.part == "2/3" and not killed:
            os.kill(started[-1], signal.SIGKILL)
            killed.append(started[-1])

    out = tmp_path / "out"
    run_on_ray(recipe, out, options(), None, 3, on_event=on_event, progress_slots=1)
    assert files_of(out) == whole
    attempts = [e.pid for e in events if e.kind == "started" and e.part == "2/3"]
    assert len(attempts) == 2 and attempts[0] == killed[0] != attempts[1]
    (retry,) = [e.message for e in events if e.kind == "finished" and e.part == "2/3"]
    kept = int(retry.split(", ")[1].split()[0])
    assert kept >= 1, retry  # the shard finished before the kill was not computed again


def test_cli_ray_with_an_address(cluster, recipe, whole, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "merge",
            str(recipe),
            str(out),
            "--out-shard-size",
            "6kB",
            "--ray",
            cluster.address,
            "--parts",
            "3",
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "part 3/3 finished" in result.stderr
    assert files_of(out) == whole
