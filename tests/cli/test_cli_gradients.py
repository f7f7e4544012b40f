"""Gradients and filters through the command line: ``della plan`` states what each model gets
per tensor group, ``della merge`` merges with those values, and a bad gradient or filter is one
line naming the field and the element, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from della_cli.cli import app

runner = CliRunner()
LAYERS = 5


@pytest.fixture(scope="module")
def deep(model_zoo) -> tuple[Path, Path, Path]:
    return tuple(model_zoo("llama", expert=e, layers=LAYERS) for e in (None, 1, 2))


def write(folder: Path, deep, own: dict, top: dict | None = None, method="task_arithmetic") -> Path:
    base, one, two = deep
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(one), "parameters": own}, {"model": str(two)}],
    }
    if top:
        recipe["parameters"] = top
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def plan(path: Path, *options: str):
    result = runner.invoke(app, ["plan", str(path), *options])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def test_plan_states_per_group_what_gradients_and_filters_give(deep, tmp_path):
    filters = [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]
    path = write(tmp_path, deep, {"weight": [0, 0.5, 1]}, {"lambda": filters})
    text = plan(path)
    lines = text.splitlines()

    def group(name: str) -> int:  # the group's line, whatever kernel it names after
        return next(i for i, line in enumerate(lines) if line.startswith(f"  merged  {name}"))

    at = group("model.layers.*.mlp.up_proj.weight (5)")
    assert lines[at + 1].strip() == f"{deep[1]}: weight 0 → 1 over layers"
    assert lines[at + 2].startswith("  merged  ")  # lambda 0.7, its plain value: unsaid
    at = group("model.layers.*.self_attn.q_proj.weight (5)")
    assert lines[at + 2].strip() == "merge-wide: lambda 0.3"
    # outside the layers: t = 0 and no filter, the plain values: nothing to say
    at = group("model.embed_tokens.weight")
    assert lines[at + 1].startswith("  merged  ")
    groups = {g["tensors"]: g for g in json.loads(plan(path, "--json"))["groups"]}
    up = groups["model.layers.*.mlp.up_proj.weight"]["parameters"]
    assert up[str(deep[1])]["weight"] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert "merge-wide" not in up
    q_proj = groups["model.layers.*.self_attn.q_proj.weight"]["parameters"]
    assert q_proj["merge-wide"] == {"lambda": 0.3}
    assert "parameters" not in groups["lm_head.weight"]


def test_plan_lists_a_gradient_that_does_not_change_steadily(deep, tmp_path):
    path = write(tmp_path, deep, {"density": [0.2, 0.9, 0.4]}, {"weight": 0.5}, method="ties")
    assert f"{deep[1]}: density [0.2, 0.55, 0.9, 0.65, 0.4] per layer" in plan(path)


def test_plan_of_a_plain_recipe_is_unchanged(deep, tmp_path):
    path = write(tmp_path, deep, {"weight": 0.5})
    text = plan(path)
    assert "merge-wide" not in text and "over layers" not in text
    groups = json.loads(plan(path, "--json"))["groups"]
    assert all(set(group) == {"tensors", "action", "count", "kernel"} for group in groups)


def test_merge_applies_the_gradient_per_layer(deep, tmp_path):
    path = write(tmp_path, deep, {"weight": [0, 1]}, {"weight": 0.0})  # model 2 adds nothing
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(path), str(out)])
    assert result.exit_code == 0, result.stderr
    merged = load_file(out / "model.safetensors")
    base, one = (load_file(folder / "model.safetensors") for folder in deep[:2])
    for layer in range(LAYERS):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        t = layer / (LAYERS - 1)
        expected = base[name] + t * (one[name] - base[name])
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    name = "model.embed_tokens.weight"  # t = 0: weight 0
    torch.testing.assert_close(merged[name], base[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("own", "top", "message"),
    [
        (
            {"density": [0.5, 0.9, 1.3]},
            None,
            "models.0.parameters.density[2]: must be in (0, 1], got 1.3",
        ),
        (
            {"weight": [{"filter": "mlp", "value": [0, "x"]}]},
            None,
            "models.0.parameters.weight[0].value[1]: must be a number, got 'x'",
        ),
        ({"weight": {"filtr": "mlp", "value": 1}}, None, "models.0.parameters.weight.filtr"),
        (None, {"lambda": [1, None]}, "parameters.lambda[1]: must be a value, got null"),
    ],
)
def test_a_bad_gradient_or_filter_is_one_line_naming_the_element(deep, tmp_path, own, top, message):
    path = write(tmp_path, deep, own or {"weight": 1.0}, top, method="ties")
    for command in ("plan", "merge"):
        args = [command, str(path)] + ([str(tmp_path / "out")] if command == "merge" else [])
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (result.stdout, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert not (tmp_path / "out").exists()
