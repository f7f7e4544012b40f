"""Issue #14, finding 9: local paths must not leak on push.

`della merge --seed` rewrote the recipe's text with a line-based edit that broke JSON and
flow-style recipes (and missed ``seed : 42``), so the ``della_recipe.yaml`` it wrote did not
load; `della push` then uploaded that file's raw text, absolute paths included. The seed
override must keep any valid recipe loadable, and push must never upload a recipe it could not
sanitise."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hostile_files import merge_inputs
from typer.testing import CliRunner

from della_cli import api
from della_cli.cli import app
from della_cli.recipe import parse_recipe

MODELS = {"merge_method": "linear", "models": [{"model": "/abs/one"}, {"model": "/abs/two"}]}

# name: a valid recipe text, in each syntax YAML allows for it
RECIPES = {
    "json, indented": json.dumps(MODELS, indent=2),
    "json, one line": json.dumps(MODELS),
    "json with a seed": json.dumps({**MODELS, "seed": 3}),
    "flow-style yaml": "{merge_method: linear, models: [{model: /abs/one}, {model: /abs/two}]}",
    "flow mapping over lines": "{\n  merge_method: linear,\n  models: [{model: /abs/one},\n"
    "    {model: /abs/two}]\n}\n",
    "spaced seed key": "merge_method: linear\nseed : 42\nmodels:\n  - model: /abs/one\n"
    "  - model: /abs/two\n",
    "quoted seed key": 'merge_method: linear\n"seed": 42\nmodels: [{model: /abs/one}, '
    "{model: /abs/two}]\n",
    "comments everywhere": "# a recipe\nmerge_method: linear  # the method\n# seed: 9\n"
    "models:\n  - model: /abs/one  # first\n  - model: /abs/two\nseed: 5 # old seed\n",
    "document markers": "---\nmerge_method: linear\nmodels:\n  - model: /abs/one\n"
    "  - model: /abs/two\n...\n",
    "indented mapping": "  merge_method: linear\n  models:\n    - model: /abs/one\n"
    "    - model: /abs/two\n",
    "seed in a nested mapping too": "merge_method: linear\nmodels:\n  - model: /abs/one\n"
    "    parameters: {weight: 1}\n  - model: /abs/two\nparameters:\n  normalize: true\n",
    "no final newline": "merge_method: linear\nmodels: [{model: /abs/one}, {model: /abs/two}]",
}


@pytest.mark.parametrize("text", RECIPES.values(), ids=RECIPES.keys())
def test_the_seed_override_keeps_every_syntax_loadable(text):
    recipe = parse_recipe(text)
    seeded = recipe.with_seed(1234)
    reloaded = parse_recipe(seeded.text)
    assert reloaded.seed == 1234
    assert reloaded.schema == dataclasses.replace(recipe.schema, seed=1234)
    assert seeded.schema == reloaded.schema


def test_the_seed_override_keeps_comments_in_a_block_recipe():
    seeded = parse_recipe(RECIPES["comments everywhere"]).with_seed(7)
    assert "# a recipe" in seeded.text and "# first" in seeded.text
    assert parse_recipe(seeded.text).seed == 7


def merge_with_seed(tmp_path: Path, text: str | None = None) -> Path:
    recipe_path, base = merge_inputs(tmp_path)
    if text is not None:
        recipe_path.write_text(text.replace("BASE", str(base)).replace("EXPERT", str(tmp_path)))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(recipe_path), str(out), "--seed", "9"])
    assert result.exit_code == 0, result.output
    return out


def pushed_files(monkeypatch, folder: Path) -> tuple[object, dict[str, bytes]]:
    """Push ``folder`` with the upload replaced by a capture of what would be sent."""
    captured: dict[str, bytes] = {}

    def capture(repo_id, files, **options):
        for name, content in files.items():
            captured[name] = content if isinstance(content, bytes) else content.read_bytes()
        return f"https://hub.example/{repo_id}"

    monkeypatch.setattr(api, "push_files", capture)
    result = CliRunner().invoke(app, ["push", str(folder), "me/model"])
    return result, captured


FLOW = "{merge_method: task_arithmetic, base_model: BASE, models: [{model: EXPERT/expert}]}"


@pytest.mark.parametrize("text", [None, FLOW], ids=["json", "flow"])
def test_merge_with_seed_then_push_uploads_no_local_path(tmp_path, monkeypatch, text):
    out = merge_with_seed(tmp_path, text)
    written = (out / "della_recipe.yaml").read_text()
    assert parse_recipe(written).seed == 9  # the file next to the model loads
    result, files = pushed_files(monkeypatch, out)
    assert result.exit_code == 0, result.output
    for name in ("della_recipe.yaml", "README.md"):
        assert str(tmp_path) not in files[name].decode(), name
    assert parse_recipe(files["della_recipe.yaml"].decode()).seed == 9


def test_push_refuses_a_recipe_file_it_cannot_sanitise(tmp_path, monkeypatch):
    out = merge_with_seed(tmp_path)
    (out / "della_recipe.yaml").write_text(
        f'{{"merge_method": "linear", "models": [{{"model": "{tmp_path}/x"}}]\nseed: 1\n'
    )
    result, files = pushed_files(monkeypatch, out)
    assert result.exit_code == 2, result.output
    assert files == {}, "nothing is uploaded"
    assert "della_recipe.yaml" in result.output and len(result.output.strip().splitlines()) == 1


def test_a_local_path_spelled_with_escapes_is_still_removed(tmp_path, monkeypatch):
    # "\u002f" is "/": a text replacement of the path misses it; the parsed value does not.
    escaped = "{merge_method: task_arithmetic, base_model: BASE, models: [{model: EXPERT}]}"
    out = merge_with_seed(
        tmp_path,
        escaped.replace("EXPERT", '"' + str(tmp_path / "expert").replace("/", "\\u002f") + '"'),
    )
    result, files = pushed_files(monkeypatch, out)
    assert result.exit_code == 0, result.output
    for name in ("della_recipe.yaml", "README.md"):
        assert str(tmp_path).replace("/", "\\u002f") not in files[name].decode(), name
    uploaded = parse_recipe(files["della_recipe.yaml"].decode())
    assert uploaded.model_refs == ["expert"] and uploaded.schema.base_model == "base"
