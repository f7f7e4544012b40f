"""``della merge --threads N``: the merge's compute threads, the bytes unchanged."""

from __future__ import annotations

from typer.testing import CliRunner

from della_cli.cli import app
from della_cli.engine import threads as engine_threads


def test_threads_reach_the_engine_and_change_no_byte(bf16_recipe, tmp_path, monkeypatch):
    budgets = []
    budget_class = engine_threads.ThreadBudget

    class Recorded(budget_class):
        def __init__(self, threads=None):
            super().__init__(threads)
            budgets.append((threads, self.total))

    monkeypatch.setattr("della_cli.engine.ThreadBudget", Recorded)
    recipe = bf16_recipe("dare_ties", {"density": 0.5}, seed=4)
    runner = CliRunner()
    for threads in ("1", None):
        out = tmp_path / f"out-{threads}"
        args = ["merge", str(recipe), str(out), "--device", "cpu", "--quiet"]
        result = runner.invoke(app, [*args, "--threads", threads] if threads else args)
        assert result.exit_code == 0, result.output
    assert budgets[0] == (1, 1)
    assert budgets[1][0] is None and budgets[1][1] == engine_threads.usable_cores()
    first, second = (
        sorted((tmp_path / name).glob("*.safetensors")) for name in ("out-1", "out-None")
    )
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_threads_must_be_at_least_one(bf16_recipe, tmp_path):
    recipe = bf16_recipe("ties", {"density": 0.5})
    result = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "o"), "--threads", "0"])
    assert result.exit_code == 2
