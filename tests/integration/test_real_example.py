"""The real-model example (recipes/hub/qwen2.5-0.5b.yaml) planned against header-only stand-ins of
its three Hub models: the plan a user with internet sees, checked line by line."""

from __future__ import annotations

import os
import re
from pathlib import Path

from stand_ins import QWEN25_05B, model_files
from typer.testing import CliRunner

from della_cli.cli import app

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "hub" / "qwen2.5-0.5b.yaml"
EXPECTED = ROOT / "tests" / "expected" / "qwen2.5-0.5b.plan.txt"
REPOS = ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct")


def stable_lines(output: str, commits: dict[str, str]) -> str:
    """The plan without what depends on the machine (free memory and disk) or on the fake
    Hub's commit hashes."""
    for repo, sha in commits.items():
        output = output.replace(sha, f"<commit of {repo}>")
    output = re.sub(r" \([\d.]+ [kMGT]?B available\)", "", output)
    output = re.sub(r"(?m)^disk: .*$", "disk: <free space here>", output)
    return output


def test_the_real_model_example_plans_as_documented(fake_hub, tmp_path, monkeypatch):
    commits = {repo: fake_hub.add_files(repo, model_files(QWEN25_05B), repo) for repo in REPOS}
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["plan", str(RECIPE), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    plan = stable_lines(result.stdout, commits)
    if os.environ.get("DELLA_UPDATE_EXPECTED"):  # after a deliberate change of the plan
        EXPECTED.write_text(plan)
    assert plan == EXPECTED.read_text()
    assert fake_hub.served(".safetensors") < 3 * (64 << 10), "headers only, no weights"
