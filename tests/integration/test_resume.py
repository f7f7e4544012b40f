"""Killed merges resume to the exact bytes of an uninterrupted run; concurrent merges refuse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from killed_merges import kill_after, make_model
from typer.testing import CliRunner

from della_cli.api import MergeOptions, run_merge
from della_cli.cli import app
from della_cli.io.journal import JOURNAL_NAME
from della_cli.io.output import staged_folder, staging_path


@pytest.fixture
def della_recipe(tmp_path, write_recipe) -> Path:
    base = make_model(tmp_path / "base", 0)
    experts = [make_model(tmp_path / f"expert{i}", i) for i in (1, 2)]
    return write_recipe(
        {
            "merge_method": "della",
            "base_model": str(base),
            "models": [{"model": str(e)} for e in experts],
            "parameters": {"density": 0.6, "epsilon": 0.1, "lambda": 1.1},
            "seed": 5,
        }
    )


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors*"))}


def test_resumed_merge_is_byte_identical(della_recipe, tmp_path, monkeypatch):
    options = MergeOptions(out_shard_bytes=600_000)
    reference = tmp_path / "uninterrupted"
    run_merge(della_recipe, reference, options)
    assert len(list(reference.glob("model-*.safetensors"))) == 6

    out = tmp_path / "merged"
    kill_after(7, della_recipe, out, options, monkeypatch)
    staging = staging_path(out)
    journal = json.loads((staging / JOURNAL_NAME).read_text())
    assert 1 <= len(journal["shards"]) < 7
    assert not out.exists()

    resumed_jobs = []
    report = run_merge(
        della_recipe,
        out,
        MergeOptions(out_shard_bytes=600_000, resume=True),
        on_progress=resumed_jobs.append,
    )
    assert report.resumed_shards == len(journal["shards"])
    assert len(resumed_jobs) < 12  # the verified shards were not recomputed
    assert shard_bytes(out) == shard_bytes(reference)
    assert not staging.exists()
    assert not (out / JOURNAL_NAME).exists()


def test_resume_recomputes_a_shard_that_was_corrupted(della_recipe, tmp_path, monkeypatch):
    options = MergeOptions(out_shard_bytes=600_000)
    reference = tmp_path / "uninterrupted"
    run_merge(della_recipe, reference, options)
    out = tmp_path / "merged"
    kill_after(9, della_recipe, out, options, monkeypatch)
    first = staging_path(out) / "model-00001-of-00006.safetensors"
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF  # a bit flipped on disk after the shard was recorded
    first.write_bytes(bytes(data))
    report = run_merge(della_recipe, out, MergeOptions(out_shard_bytes=600_000, resume=True))
    assert report.resumed_shards == 0
    assert shard_bytes(out) == shard_bytes(reference)


def test_a_journal_of_another_digest_is_not_trusted(della_recipe, tmp_path, monkeypatch):
    """Journals of version 1 recorded SHA-256 digests: their shards are recomputed."""
    options = MergeOptions(out_shard_bytes=600_000)
    reference = tmp_path / "uninterrupted"
    run_merge(della_recipe, reference, options)
    out = tmp_path / "merged"
    kill_after(9, della_recipe, out, options, monkeypatch)
    journal_path = staging_path(out) / JOURNAL_NAME
    journal = json.loads(journal_path.read_text())
    assert journal["version"] == 2 and journal["shards"]
    journal_path.write_text(json.dumps({**journal, "version": 1}))
    report = run_merge(della_recipe, out, MergeOptions(out_shard_bytes=600_000, resume=True))
    assert report.resumed_shards == 0
    assert shard_bytes(out) == shard_bytes(reference)


def test_resume_with_another_seed_starts_over(della_recipe, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    options = MergeOptions(out_shard_bytes=600_000)
    kill_after(7, della_recipe, out, options, monkeypatch)
    warnings = []
    resumed = MergeOptions(out_shard_bytes=600_000, resume=True, seed=6)
    report = run_merge(della_recipe, out, resumed, on_warning=warnings.append)
    assert report.resumed_shards == 0
    assert any("different recipe, seed or inputs" in w for w in warnings)
    expected = tmp_path / "seed6"
    run_merge(della_recipe, expected, MergeOptions(out_shard_bytes=600_000, seed=6))
    assert shard_bytes(out) == shard_bytes(expected)


def test_sigkilled_process_resumes_to_identical_bytes(della_recipe, tmp_path):
    """A real SIGKILL of a running `della merge`, then `--resume`."""
    reference = tmp_path / "uninterrupted"
    run_merge(della_recipe, reference, MergeOptions(out_shard_bytes=400_000))
    out = tmp_path / "merged"
    command = [
        sys.executable,
        "-m",
        "della_cli",
        "merge",
        str(della_recipe),
        str(out),
        "--out-shard-size",
        "400000",
        "--quiet",
    ]
    process = subprocess.Popen(command)
    journal = staging_path(out) / JOURNAL_NAME
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and len(json.loads(journal.read_text() or "{}").get("shards", {})):
            break
        time.sleep(0.001)
    assert process.poll() is None, "the merge finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists() and staging_path(out).exists()
    result = subprocess.run([*command, "--resume", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["resumed_shards"] >= 1
    assert shard_bytes(out) == shard_bytes(reference)


def test_second_merge_into_the_same_output_refuses(della_recipe, tmp_path):
    out = tmp_path / "merged"
    with staged_folder(out) as staging:  # a merge in progress holds the lock
        (staging / "model.safetensors").write_bytes(b"in progress")
        result = CliRunner().invoke(app, ["merge", str(della_recipe), str(out)])
        assert result.exit_code == 2
        assert "another della merge is writing" in result.output
        assert (staging / "model.safetensors").read_bytes() == b"in progress"
    assert out.exists()
