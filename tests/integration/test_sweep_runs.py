"""della sweep end to end on tiny models whose merges are known in closed form: the base is 0,
the experts 1 and 2 everywhere, so task arithmetic gives lambda * (w_a + 2 w_b) in every entry,
and the evaluation command (a python one-liner) prints how close that is to 3.3."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from della_cli.cli import app
from della_cli.sweep import runner as sweep_runner
from della_cli.sweep.runner import SweepRequest, run_sweep

SCORE = (
    f'{sys.executable} -c "import sys; from safetensors.numpy import load_file; '
    "w = load_file(sys.argv[1] + '/model.safetensors')['w']; print(-abs(float(w.mean()) - 3.3))\" "
    "{model}"
)
GRID = ["--grid", "lambda=1.0,1.1", "--grid", "weight@b=0.5,1.0"]


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """base (0), a (1) and b (2): (4, 8) float32 tensors named w, and a recipe of each kind."""
    for name, value in [("base", 0.0), ("a", 1.0), ("b", 2.0)]:
        folder = tmp_path / name
        folder.mkdir()
        tensors = {"w": np.full((4, 8), value, np.float32)}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    head = "base_model: base\nmodels:\n  - model: a\n  - model: b\n"
    (tmp_path / "ta.yaml").write_text("merge_method: task_arithmetic\n" + head)
    (tmp_path / "dare.yaml").write_text("merge_method: dare_linear\n" + head + "seed: 5\n")
    return tmp_path


def sweep(*args: object):
    return CliRunner().invoke(app, ["sweep", *map(str, args)])


def test_the_best_merge_is_kept_and_the_others_deleted(models):
    out = models / "sweep"
    result = sweep(models / "ta.yaml", "--out", out, "--eval", SCORE, *GRID, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    # lambda (w_a + 2 w_b) for (1, .5), (1, 1), (1.1, .5), (1.1, 1): 2, 3, 2.2, 3.3
    means = [row["mean"] for row in summary["settings"]]
    assert means == pytest.approx([-1.3, -0.3, -1.1, 0.0], abs=1e-6)
    assert summary["best"]["values"] == {"lambda": 1.1, "weight@b": 1.0}
    assert sorted(p.name for p in (out / "candidates").iterdir()) == ["c003-s0"]
    assert summary["kept"] == str(out / "candidates" / "c003-s0")
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "lambda,weight@b,mean,spread,seeds,scores"
    assert csv_lines[1].startswith("1.0,0.5,-1.3,0,1,")
    assert json.loads((out / "results.json").read_text())["kept"] == "c003-s0"
    assert (out / "sweep.png").stat().st_size > 1000
    # run again: everything is done, nothing merged or scored
    again = sweep(models / "ta.yaml", "--out", out, "--eval", SCORE, *GRID, "--json")
    assert json.loads(again.stdout)["resumed"] == 4 and json.loads(again.stdout)["merged"] == 0


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_killed_sweep_resumes_without_redoing_what_was_finished(models, monkeypatch):
    # a budget of one byte: each candidate is a batch of its own, merged then scored
    request = SweepRequest(models / "ta.yaml", models / "sweep", SCORE, grid=GRID[1::2], memory=1)
    merged, scored = [], []
    real_merge, real_evaluate = sweep_runner.merge_batch, sweep_runner.evaluate

    def merge(sessions, outs, warn):
        merged.extend(out.name for out in outs)
        return real_merge(sessions, outs, warn)

    def evaluate(command, model, *args):
        if len(scored) == 2 and not resumed:
            raise Killed  # while scoring the third candidate, after its merge
        scored.append(model.name)
        return real_evaluate(command, model, *args)

    monkeypatch.setattr(sweep_runner, "merge_batch", merge)
    monkeypatch.setattr(sweep_runner, "evaluate", evaluate)
    resumed = False
    with pytest.raises(Killed):
        run_sweep(request)
    assert merged == ["c000-s0", "c001-s0", "c002-s0"] and scored == ["c000-s0", "c001-s0"]
    merged.clear(), scored.clear()
    resumed = True
    report = run_sweep(request)
    assert merged == ["c003-s0"]  # c002's merge was published before the kill
    assert scored == ["c002-s0", "c003-s0"]
    assert (report.resumed, report.merged, report.evaluated) == (2, 1, 2)
    assert report.kept == models / "sweep" / "candidates" / "c003-s0"


def test_random_methods_are_merged_with_each_seed_and_their_spread_shown(models):
    out = models / "sweep"
    grid = ["--grid", "density=0.5,1.0"]
    result = sweep(
        models / "dare.yaml",
        "--out",
        out,
        "--eval",
        SCORE,
        *grid,
        "--seeds",
        2,
        "--keep-all",
        "--json",
    )
    assert result.exit_code == 0, result.output
    halved, whole = json.loads(result.stdout)["settings"]
    assert halved["seeds"] == whole["seeds"] == [5, 6]
    assert whole["spread"] == 0.0  # density 1 drops nothing: every seed merges the same
    assert halved["spread"] > 0  # a different half of 32 entries dropped by each seed
    kept = ["c000-s5", "c000-s6", "c001-s5", "c001-s6"]  # --keep-all
    assert sorted(p.name for p in (out / "candidates").iterdir()) == kept


@pytest.mark.parametrize(
    ("recipe", "args", "named"),
    [
        ("ta.yaml", ["--grid", "epsilon=0.1"], "--grid epsilon: task_arithmetic does not take"),
        ("dare.yaml", ["--grid", "density=0.5,1.5"], "--grid density=1.5: parameters.density"),
        ("ta.yaml", ["--grid", "weight@c=1"], "--grid weight@c: no model of the recipe named"),
        ("ta.yaml", ["--random", "lambda=0.5:1.5"], "--random lambda=0.5:1.5: a random search"),
        ("ta.yaml", ["--grid", "lambda=1", "--eval", "echo 1"], "--eval: the command must name"),
    ],
)
def test_a_bad_grid_is_refused_in_one_line_with_exit_2_and_nothing_written(
    models, recipe, args, named
):
    out = models / "sweep"
    result = sweep(models / recipe, "--out", out, "--eval", SCORE, *args)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {named}") and result.stderr.count("\n") == 1
    assert not out.exists()


def test_another_sweep_in_the_same_folder_is_refused(models):
    out = models / "sweep"
    assert sweep(models / "ta.yaml", "--out", out, "--eval", SCORE, *GRID[:2]).exit_code == 0
    before = sorted(p.name for p in out.rglob("*"))
    result = sweep(models / "ta.yaml", "--out", out, "--eval", SCORE, *GRID)
    assert result.exit_code == 2 and "holds a sweep of another recipe" in result.stderr
    assert sorted(p.name for p in out.rglob("*")) == before


def test_a_sweep_folder_inside_an_input_model_is_refused_before_anything_is_written(models):
    out = models / "a" / "sweep"
    result = sweep(models / "ta.yaml", "--out", out, "--eval", SCORE, *GRID[:2])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert not out.exists()


def test_a_failed_evaluation_marks_its_candidate_and_a_rerun_tries_it_again(models):
    out = models / "sweep"
    fails_above_3 = SCORE.replace("print(", "sys.exit(3) if w.mean() > 3.2 else print(")
    args = [models / "ta.yaml", "--out", out, "--eval", fails_above_3, *GRID, "--json"]
    result = sweep(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["failures"] == {"c003-s0": "the evaluation command exited with status 3"}
    assert summary["settings"][3]["scores"] == [] and summary["settings"][3]["mean"] is None
    assert summary["best"]["values"] == {"lambda": 1.0, "weight@b": 1.0}  # 3.0, the closest left
    assert "warning: c003-s0: the evaluation command exited with status 3" in result.stderr
    again = json.loads(sweep(*args).stdout)
    assert (again["resumed"], again["merged"], again["failures"]) == (3, 1, {"c003-s0": ANY})
