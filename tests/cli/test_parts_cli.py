"""``della merge --part I/N``, ``--assemble`` and ``della plan --parts N`` on the command line:
parts run at once in separate processes, an assembly that refuses missing or altered shards
(one line, exit 2, nothing written), ``--assemble --resume``, and the option checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner, Result

from della_cli.cli import app
from della_cli.io.parts_folder import lock_part, manifest_name, open_parts_folder

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
SHARD = "6kB"


def invoke(*args: object) -> Result:
    return runner.invoke(app, [str(arg) for arg in args])


def refused(result: Result, *fragments: str) -> str:
    """Exit 2 with one ``error:`` line holding every fragment, and no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """A DELLA recipe over a float32 base and two experts of eight (32, 48) tensors: eight
    shards of 6 kB."""
    root = tmp_path_factory.mktemp("parts-cli")
    folders = []
    for index in range(3):
        generator = torch.Generator().manual_seed(index)
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
            {"model": str(f), "parameters": {"weight": 0.5, "density": 0.4, "epsilon": 0.1}}
            for f in folders[1:]
        ],
        "seed": 5,
    }
    path = root / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture(scope="module")
def whole(recipe, tmp_path_factory) -> dict[str, bytes]:
    """The files of the merge on one machine."""
    out = tmp_path_factory.mktemp("whole") / "out"
    result = invoke("merge", recipe, out, "--out-shard-size", SHARD, "--quiet")
    assert result.exit_code == 0, result.output
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def run_parts(recipe: Path, out: Path, count: int, numbers=None, *extra) -> None:
    for number in numbers or range(1, count + 1):
        result = invoke(
            "merge", recipe, out, "--out-shard-size", SHARD, "--part", f"{number}/{count}", *extra
        )
        assert result.exit_code == 0, result.output


def test_parts_in_separate_processes_at_once_then_assemble(recipe, whole, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "della_cli",
        "merge",
        str(recipe),
        str(out),
        "--out-shard-size",
        SHARD,
        "--quiet",
        "--part",
    ]
    processes = [
        subprocess.Popen([*command, f"{n}/3"], env=env, stderr=subprocess.PIPE) for n in (1, 2, 3)
    ]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read().decode()
        process.stderr.close()
    result = invoke("merge", recipe, out, "--out-shard-size", SHARD, "--assemble", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shards"] == 8
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_assembly_refuses_missing_and_altered_shards_naming_them(recipe, whole, tmp_path):
    out = tmp_path / "out"
    run_parts(recipe, out, 4, [1, 3, 4])
    line = refused(
        invoke("merge", recipe, out, "--out-shard-size", SHARD, "--assemble"),
        "2 of 8 shards cannot be assembled",
        "model-00003-of-00008.safetensors (missing)",
        "--part 2/4",
        "nothing was written",
    )
    assert "model-00004-of-00008.safetensors (missing)" in line
    run_parts(recipe, out, 4, [2])
    shard = open_parts_folder(out, create=False) / "model-00007-of-00008.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    refused(
        invoke("merge", recipe, out, "--out-shard-size", SHARD, "--assemble"),
        "model-00007-of-00008.safetensors (corrupt)",
        "--part 4/4",
    )
    assert not out.exists()
    # --resume: the assembly computes the altered shard itself.
    result = invoke("merge", recipe, out, "--out-shard-size", SHARD, "--assemble", "--resume")
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == whole


def test_parts_of_another_merge_are_not_assembled(recipe, tmp_path):
    out = tmp_path / "out"
    run_parts(recipe, out, 2, None, "--seed", "6")
    refused(
        invoke("merge", recipe, out, "--out-shard-size", SHARD, "--assemble"),
        "8 of 8 shards cannot be assembled",
    )
    refused(invoke("merge", recipe, tmp_path / "none", "--assemble"), "no parts of")


def test_a_part_computed_twice_at_once_is_refused(recipe, tmp_path):
    out = tmp_path / "out"
    folder = open_parts_folder(out, create=True)
    lock = lock_part(folder, manifest_name(2, 3), "2/3")
    try:
        refused(
            invoke("merge", recipe, out, "--out-shard-size", SHARD, "--part", "2/3"),
            "part 2/3 of this merge is being computed by another process",
        )
    finally:
        os.close(lock)


def test_a_parts_folder_della_did_not_make_is_refused(recipe, tmp_path):
    (tmp_path / ".out.della-parts").mkdir()
    refused(invoke("merge", recipe, tmp_path / "out", "--part", "1/2"), "was not made by della")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--part", "0/3"], "the part must be 1 to N"),
        (["--part", "4/3"], "the part must be 1 to N"),
        (["--part", "two"], "expected I/N"),
        (["--part", "1/2", "--assemble"], "--part and --assemble cannot be combined"),
        (["--assemble", "--ray"], "--assemble and --ray cannot be combined"),
        (["--parts", "2"], "--parts goes with --ray"),
        (["--part", "1/2", "--dry-run"], "della plan --parts N"),
        (["--part", "1/2", "--push-to-hub", "org/x"], "--push-to-hub goes with --assemble"),
    ],
)
def test_part_options_that_mean_nothing_are_refused(recipe, tmp_path, args, fragment):
    refused(invoke("merge", recipe, tmp_path / "out", *args), fragment)
    assert list(tmp_path.iterdir()) == []


def test_ray_without_ray_installed_says_how_to_install_it(recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    refused(
        invoke("merge", recipe, tmp_path / "out", "--ray", "--parts", "2"),
        "pip install 'della-cli[ray]'",
    )


def test_plan_parts_shows_each_part_and_covers_every_shard_once(recipe):
    result = invoke("plan", recipe, "--out-shard-size", SHARD, "--parts", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    parts = report["parts"]
    assert [p["part"] for p in parts] == ["1/3", "2/3", "3/3"]
    covered = [k for p in parts for k in range(p["shards"][0], p["shards"][1] + 1)]
    assert covered == list(range(1, 9))
    assert sum(p["output_bytes"] for p in parts) == report["output_bytes"] == 8 * 32 * 48 * 4
    # Eight equal shards in three parts: 3, 3 and 2 (or another split within one shard).
    assert sorted(p["output_bytes"] for p in parts) == [2 * 6144, 3 * 6144, 3 * 6144]
    # Each part reads its tensors from the base and both experts.
    assert all(p["read_bytes"] == 3 * p["output_bytes"] for p in parts)
    assert all(p["download_bytes"] == 0 and p["disk_bytes"] == p["output_bytes"] for p in parts)
    text = invoke("plan", recipe, "--out-shard-size", SHARD, "--parts", "3")
    assert text.exit_code == 0, text.output
    assert "in 3 part(s):" in text.stdout and "     3/3" in text.stdout
    refused(invoke("plan", recipe, "--parts", "0"), "--parts: must be at least 1")
