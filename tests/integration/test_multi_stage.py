"""Multi-stage files: della merge runs the stages in dependency order, the final one into OUT,
the intermediates removed (or kept with --keep-intermediates); della plan plans every stage;
the result is mergekit-multi's (mergekit 0.1.5, within float32 rounding); bad files are one
line naming the stage, exit 2; an interrupt or a failure leaves no intermediate behind."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from oracle import assert_same_model
from typer.testing import CliRunner

from della_cli import api
from della_cli.cli import app
from della_cli.errors import RecipeError
from della_cli.recipe_yaml import MAX_EXPANDED_SIZE
from della_cli.stages import INTERMEDIATES_MARK, read_stages

runner = CliRunner()


@pytest.fixture(scope="module")
def deep(model_zoo) -> tuple[Path, Path, Path]:
    return tuple(model_zoo("llama", expert=e, layers=5) for e in (None, 1, 2))


def stages_text(deep, final_first: bool = False) -> str:
    """Two named stages (each from the base and one expert) and an unnamed final stage that
    merges their outputs with gradients and filters; the final stage comes first if asked
    (the order in the file is not the order they run)."""
    base, one, two = map(str, deep)
    attn = {
        "name": "stage-attn",
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": one, "parameters": {"weight": [0.5, 1.0]}}],
    }
    mlp = {
        "name": "stage-mlp",
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": two, "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": one, "parameters": {"weight": 0.3, "density": 0.7}},
        ],
    }
    final = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [
            {
                "model": "stage-attn",
                "parameters": {"weight": [{"filter": "self_attn", "value": 1.0}, {"value": 0.2}]},
            },
            {"model": "stage-mlp", "parameters": {"weight": [0.2, 1.0]}},
        ],
    }
    documents = [final, attn, mlp] if final_first else [attn, mlp, final]
    return "\n---\n".join(yaml.safe_dump(d, sort_keys=False) for d in documents)


def strays(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if INTERMEDIATES_MARK in p.name or ".della-tmp-" in p.name
    )


def test_stages_run_in_dependency_order_and_the_intermediates_go(deep, tmp_path):
    path = tmp_path / "multi.yaml"
    path.write_text("# a comment before the first stage\n" + stages_text(deep, final_first=True))
    stages = read_stages(path)
    assert [s.name for s in stages] == ["stage-attn", "stage-mlp", None]
    assert stages[-1].depends_on == ("stage-attn", "stage-mlp")
    assert "stage-attn" in stages[0].recipe.text and "stage-mlp" not in stages[0].recipe.text
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(path), str(out)])
    assert result.exit_code == 0, result.stderr
    assert "stage 'stage-attn': merged 48 tensors" in result.stderr
    assert (out / "model.safetensors").is_file()
    assert strays(tmp_path) == []


@pytest.mark.oracle
def test_multi_stage_matches_mergekit_multi(deep, tmp_path, mergekit):
    path = tmp_path / "multi.yaml"
    path.write_text(stages_text(deep))
    ours, kept = tmp_path / "della-out", tmp_path / "della-stages"
    args = ["merge", str(path), str(ours), "--keep-intermediates", str(kept)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    theirs, theirs_stages = tmp_path / "mergekit-out", tmp_path / "mergekit-stages"
    mergekit.merge_file(path, theirs_stages, theirs)
    for name in ("stage-attn", "stage-mlp"):
        assert_same_model(kept / name, theirs_stages / name, 1e-6)
    assert assert_same_model(ours, theirs, 1e-6) <= 1e-6
    assert strays(tmp_path) == []


def test_plan_plans_every_stage_and_says_what_waits_for_an_earlier_one(deep, tmp_path):
    path = tmp_path / "multi.yaml"
    path.write_text(stages_text(deep))
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "stage 'stage-attn' → intermediate 'stage-attn'"
    final = "the unnamed stage (document 3) → OUT, reads 'stage-attn', 'stage-mlp'"
    at = lines.index(final)
    assert lines[at + 1].startswith("  planned from the plan of stages 'stage-attn', 'stage-mlp'")
    assert lines[-1] == "the 3 stages can run; nothing downloaded, nothing written"
    assert "stage-mlp: weight 0.2 → 1 over layers" in result.stdout  # named, not a folder
    result = runner.invoke(app, ["plan", str(path), "--json"])
    report = json.loads(result.stdout)
    assert report["can_run"] is True
    assert [s["name"] for s in report["stages"]] == ["stage-attn", "stage-mlp", None]
    assert report["stages"][0]["plan"]["merged"] == 48
    final_plan = report["stages"][2]["plan"]
    assert final_plan["merged"] == 48 and report["stages"][2]["note"]
    assert not list(Path(tempfile.gettempdir()).glob("della-plan-stages-*"))


def test_plan_finds_a_later_stage_problem_before_anything_runs(deep, model_zoo, tmp_path):
    other = model_zoo("llama", layers=3)  # another depth than the stage it is merged with
    text = stages_text(deep).replace("model: stage-mlp", f"model: {other}")
    path = tmp_path / "multi.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 2
    assert "the unnamed stage (document 3): " in result.stderr
    assert "has 3 layers in 'model.layers' vs 5" in result.stderr
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2 and strays(tmp_path) == []
    assert "merged 48 tensors" not in result.stderr  # refused before the first stage ran


def test_an_existing_out_is_refused_before_any_stage_runs(deep, tmp_path):
    path = tmp_path / "multi.yaml"
    path.write_text(stages_text(deep))
    (tmp_path / "out").mkdir()
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert "merged" not in result.stderr and strays(tmp_path) == []


def test_without_an_unnamed_stage_the_last_goes_to_out(deep, tmp_path):
    text = stages_text(deep).rsplit("\n---\n", 1)[0]  # the two named stages
    path = tmp_path / "multi.yaml"
    path.write_text(text)
    out, kept = tmp_path / "out", tmp_path / "kept"
    args = ["merge", str(path), str(out), "--keep-intermediates", str(kept)]
    assert runner.invoke(app, args).exit_code == 0
    assert sorted(p.name for p in kept.iterdir()) == ["stage-attn"]
    assert (out / "model.safetensors").is_file()


def named(text: str, old: str, new: str) -> str:
    return text.replace(f"name: {old}", f"name: {new}", 1)


BAD = {
    "duplicate": (
        lambda t: named(t, "stage-mlp", "stage-attn"),
        "stage 'stage-attn': the name is given twice (documents 1 and 2)",
    ),
    "two-unnamed": (
        lambda t: named(t, "stage-mlp", "").replace("name: \n", ""),
        "stages 2 and 3 both have no name",
    ),
    "cycle": (  # stage-mlp reads the final stage, named, which reads stage-mlp
        lambda t: (
            re.sub(r"(merge_method: ties\nbase_model: ).*", r"\1stage-final", t, count=1)
            + "name: stage-final\n"
        ),
        "its inputs depend on its own output (stage-mlp → stage-final → stage-mlp)",
    ),
    "bad-parameter": (
        lambda t: t.replace("density: 0.5", "density: [0.5, 1.5]"),
        "stage 'stage-mlp': models.0.parameters.density[1]: must be in (0, 1], got 1.5",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_multi_stage_file_is_one_line_naming_the_stage(deep, tmp_path, case):
    edit, message = BAD[case]
    path = tmp_path / "multi.yaml"
    path.write_text(edit(stages_text(deep)))
    for command in ("plan", "merge"):
        args = [command, str(path)] + ([str(tmp_path / "out")] if command == "merge" else [])
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (case, result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert strays(tmp_path) == [] and not (tmp_path / "out").exists()


def test_a_self_cycle_and_a_recipe_command_name_the_problem(deep, tmp_path):
    path = tmp_path / "multi.yaml"
    path.write_text(
        stages_text(deep).replace("base_model: " + str(deep[0]), "base_model: stage-attn", 1)
    )
    with pytest.raises(
        RecipeError, match="stage 'stage-attn': its inputs depend on its own output"
    ):
        read_stages(path)
    path.write_text(stages_text(deep))
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2
    assert "a multi-stage file, which only della merge and della plan run" in result.stderr


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_an_interrupt_or_failure_in_a_later_stage_leaves_nothing(
    deep, tmp_path, monkeypatch, failure
):
    original, calls = api.run_merge, []

    def run_merge(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise failure("stopped")
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "run_merge", run_merge)
    path = tmp_path / "multi.yaml"
    path.write_text(stages_text(deep))
    result = runner.invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert result.exit_code == (130 if failure is KeyboardInterrupt else 1), result.stderr
    assert len(calls) == 3 and INTERMEDIATES_MARK in str(calls[0])
    assert strays(tmp_path) == [] and not (tmp_path / "out").exists()


def test_the_yaml_bounds_hold_for_all_documents_together(tmp_path):
    # each document stays under the bound; together they pass it
    bomb = "a: &a [" + ",".join(["x" * 60] * 64) + "]\nb: [" + ",".join(["*a"] * 40) + "]\n"
    per_document = 40 * 64 * 61
    assert per_document < MAX_EXPANDED_SIZE
    count = MAX_EXPANDED_SIZE // per_document + 1
    path = tmp_path / "bomb.yaml"
    path.write_text("\n---\n".join([bomb] * count))
    with pytest.raises(RecipeError, match="expands to over"):
        read_stages(path)
    path.write_text("\n---\n".join(["merge_method: linear\nmodels: [{model: a}]"] * 65))
    with pytest.raises(RecipeError, match="more than 64 documents"):
        read_stages(path)
