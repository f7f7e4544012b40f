"""A sweep's candidates merged in batches, one pass over the inputs per batch: each output's
bytes are those of its candidate merged alone, the inputs are read once per batch, the memory
budget cuts the batches, and a batch killed midway resumes each candidate from its shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from killed_merges import Killed, make_model
from typer.testing import CliRunner

from della_cli.api import MergeOptions, run_merge
from della_cli.cli import app
from della_cli.io import reader as reader_module
from della_cli.io.journal import JOURNAL_NAME, Journal
from della_cli.io.output import staging_path
from della_cli.sweep import batch as sweep_batch
from della_cli.sweep import runner as sweep_runner
from della_cli.sweep.batch import batches, merge_batch, working_memory
from della_cli.sweep.runner import SweepRequest, plan_candidates, run_sweep

SCORE = "echo 1 {model} | cut -c1"  # every candidate scores 1: these tests look at the merges


def weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors*"))}


@pytest.fixture
def toy(tmp_path: Path, write_recipe):
    """A recipe over three toy models (12 float32 (128, 512) tensors each) for ``method``."""
    base = make_model(tmp_path / "base", 0)
    experts = [make_model(tmp_path / f"expert{i}", i) for i in (1, 2)]

    def recipe(method: str, parameters: dict, seed: int = 5) -> Path:
        return write_recipe(
            {
                "merge_method": method,
                "base_model": str(base),
                "models": [{"model": str(e)} for e in experts],
                "parameters": parameters,
                "seed": seed,
            },
            name=f"{method}.yaml",
        )

    return recipe


def sessions_of(recipe: Path, out: Path, grid: list[str], seeds: int = 1):
    """The sweep's candidates and their sessions, planned as ``run_sweep`` plans them."""
    request = SweepRequest(recipe, out, SCORE, grid=grid, seeds=seeds)
    planned, candidates = plan_candidates(request)
    shared, sessions = sweep_runner._planned_sessions(planned, candidates, request.options)
    return shared, candidates, sessions


@pytest.fixture
def input_reads(monkeypatch) -> list[int]:
    """Bytes read from model files by ``ModelReader``, one entry per read."""
    counted: list[int] = []
    real = reader_module.ModelReader._read_bytes

    def counting(self, info, begin, count, pool=None):
        counted.append(count)
        return real(self, info, begin, count, pool)

    monkeypatch.setattr(reader_module.ModelReader, "_read_bytes", counting)
    return counted


@pytest.mark.parametrize(
    ("method", "parameters", "grid", "seeds"),
    [
        ("task_arithmetic", {"weight": 0.5}, ["lambda=0.8,1.0,1.3"], 1),
        ("della", {"density": 0.5, "epsilon": 0.1}, ["density=0.4,0.7"], 3),
        ("ties", {"density": 0.5, "weight": 0.6}, ["density=0.3,0.8"], 1),
    ],
)
def test_each_output_of_a_batch_is_its_merge_run_alone(
    toy, tmp_path, method, parameters, grid, seeds
):
    shared, candidates, sessions = sessions_of(toy(method, parameters), tmp_path / "s", grid, seeds)
    outs = [tmp_path / "batch" / c.name for c in candidates]
    try:
        merge_batch(sessions, outs, lambda message: None)
    finally:
        shared.close()
    assert len(candidates) == len(grid[0].split(",")) * seeds
    for candidate, out in zip(candidates, outs, strict=True):
        alone = tmp_path / "alone" / candidate.name
        run_merge(candidate.recipe, alone, MergeOptions())
        assert weights(out) == weights(alone), candidate.name
        assert (out / "config.json").read_bytes() == (alone / "config.json").read_bytes()
    # the random draws differ by seed, so the candidates are not all one merge
    assert len({weights(out)["model.safetensors"] for out in outs}) == len(candidates)


def test_a_batch_reads_the_inputs_once(toy, tmp_path, input_reads):
    recipe = toy("della", {"density": 0.5, "epsilon": 0.1})
    run_merge(recipe, tmp_path / "alone", MergeOptions())  # the block kernel: reads via the reader
    alone = sum(input_reads)
    assert alone == 3 * 12 * 128 * 512 * 4  # base and two experts, each tensor once
    for grid, count in [(["density=0.4"], 1), (["density=0.3,0.5,0.7"], 3)]:
        input_reads.clear()
        shared, candidates, sessions = sessions_of(recipe, tmp_path / "s", grid)
        try:
            merge_batch(sessions, [tmp_path / f"b{count}" / c.name for c in candidates], print)
        finally:
            shared.close()
        assert len(candidates) == count and sum(input_reads) == alone


def test_weighted_sums_of_a_batch_read_through_the_shared_rows(toy, tmp_path, input_reads):
    """Task arithmetic alone reads straight from the files (``cpu/streamed_sum``), not through
    the reader; a batch reads each input tensor once, through it."""
    recipe = toy("task_arithmetic", {"weight": 0.5})
    shared, candidates, sessions = sessions_of(recipe, tmp_path / "s", ["lambda=0.5,1.0,1.5"])
    try:
        merge_batch(sessions, [tmp_path / "b" / c.name for c in candidates], print)
    finally:
        shared.close()
    assert sum(input_reads) == 3 * 12 * 128 * 512 * 4


def test_batches_hold_what_the_budget_allows():
    assert batches([5, 5, 5, 9, 1], 10) == [[0, 1], [2], [3, 4]]
    assert batches([20, 3], 10) == [[0], [1]]  # too big alone: a batch of its own
    assert batches([1, 1, 1], 100) == [[0, 1, 2]]


def test_the_memory_budget_cuts_the_sweep_into_batches(toy, tmp_path, monkeypatch):
    recipe = toy("task_arithmetic", {"weight": 0.5})
    shared, _, sessions = sessions_of(recipe, tmp_path / "probe", ["lambda=1.0"])
    cost = working_memory(sessions[0], sessions[0].plan)
    shared.close()
    sizes = []
    real = sweep_batch.merge_batch

    def recorded(sessions, outs, warn):
        sizes.append(len(sessions))
        return real(sessions, outs, warn)

    monkeypatch.setattr(sweep_runner, "merge_batch", recorded)
    grid = ["lambda=0.6,0.8,1.0,1.2,1.4"]
    request = SweepRequest(recipe, tmp_path / "sweep", SCORE, grid=grid, memory=2 * cost + 1)
    report = run_sweep(request)
    assert sizes == [2, 2, 1] and report.merged == 5


def test_a_batch_killed_midway_resumes_each_candidate_from_its_shards(toy, tmp_path, monkeypatch):
    recipe = toy("della", {"density": 0.5, "epsilon": 0.1})
    options = MergeOptions(out_shard_bytes=600_000)  # six shards per candidate
    request = SweepRequest(recipe, tmp_path / "sweep", SCORE, grid=["density=0.4,0.7"])
    request.options, request.keep_all = options, True
    saved = []
    real_save = Journal.save

    def save_then_die(self, folder):
        real_save(self, folder)
        saved.append(folder.name)
        if len(saved) == 5:
            raise Killed  # both candidates have shards done, neither is complete

    monkeypatch.setattr(Journal, "save", save_then_die)
    monkeypatch.setattr("della_cli.io.output.shutil.rmtree", lambda *args, **kwargs: None)
    with pytest.raises(Killed):
        run_sweep(request)
    monkeypatch.undo()
    outs = [tmp_path / "sweep" / "candidates" / name for name in ("c000-s5", "c001-s5")]
    journals = [json.loads((staging_path(out) / JOURNAL_NAME).read_text()) for out in outs]
    assert all(1 <= len(journal["shards"]) < 6 for journal in journals)

    resumed = []
    real_open = sweep_batch.open_writer

    def opened(*args):
        writer, done = real_open(*args)
        resumed.append(done)
        return writer, done

    monkeypatch.setattr(sweep_batch, "open_writer", opened)
    report = run_sweep(request)
    assert resumed == [len(journal["shards"]) for journal in journals]
    assert report.merged == 2
    for out, (_, candidate) in zip(outs, enumerate(plan_candidates(request)[1]), strict=True):
        alone = tmp_path / "alone" / candidate.name
        run_merge(candidate.recipe, alone, options)
        assert weights(out) == weights(alone)
        assert not staging_path(out).exists()


def test_a_memory_budget_that_is_no_size_is_refused_by_name(toy, tmp_path):
    recipe, out = toy("task_arithmetic", {"weight": 0.5}), tmp_path / "sweep"
    args = ["sweep", str(recipe), "--out", str(out), "--eval", SCORE, "--grid", "lambda=1.0"]
    result = CliRunner().invoke(app, [*args, "--memory", "lots"])
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == "error: --memory: 'lots' is not a size; use e.g. 5GB, 500MB or 2GiB"
    )
    assert not out.exists()
    result = CliRunner().invoke(app, [*args, "--memory", "1GiB", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["merged"] == 1
