"""The path a newcomer walks: the demo, every example recipe on the demo's models, plan, merge,
verify, and a model card worth publishing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from della_cli.api import MergeOptions, run_merge
from della_cli.cli import app
from della_cli.demo import MARKER
from della_cli.methods.registry import RUNNING
from della_cli.recipe import load_recipe
from della_cli.tiny import make_demo_models
from della_cli.verify import verify_model

EXAMPLES = Path(__file__).resolve().parents[2] / "recipes" / "demo"


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """A working directory holding ``della-demo/`` as ``della demo`` leaves it."""
    root = tmp_path_factory.mktemp("newcomer")
    make_demo_models(root / "della-demo")
    return root


def test_demo_keeps_its_models_and_says_what_to_run_next(tmp_path):
    folder = tmp_path / "demo"
    result = invoke("demo", folder)
    assert result.exit_code == 0, result.output
    for name in ("base", "expert-math", "expert-code", "merged", "recipe.yaml", MARKER):
        assert (folder / name).exists(), name
    assert verify_model(folder / "merged").healthy
    assert f"della plan {folder}/recipe.yaml" in result.stdout
    assert f"della verify {folder}/merged" in result.stdout
    # The recipe names the models as a user would, relative to itself.
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    assert recipe["base_model"] == "./base"
    # Running it again rebuilds the same folder.
    again = invoke("demo", folder)
    assert again.exit_code == 0, again.output


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = invoke("demo", folder)
    assert result.exit_code == 2
    assert "did not make" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine"


# mergekit's other methods della runs, an example each.
CATALOG_EXAMPLES = RUNNING


def test_every_example_file_is_there():
    methods = {yaml.safe_load(p.read_text())["merge_method"] for p in EXAMPLES.glob("*.yaml")}
    assert methods == {
        "della",
        "della_linear",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "task_arithmetic",
        "linear",
        *CATALOG_EXAMPLES,
    }


@pytest.mark.parametrize("recipe", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_recipe_plans_merges_and_verifies(demo_root, monkeypatch, recipe):
    monkeypatch.chdir(demo_root)
    planned = invoke("plan", recipe)
    assert planned.exit_code == 0, planned.output
    assert "the merge can run" in planned.stdout
    out = demo_root / f"out-{recipe.stem}"
    report = run_merge(recipe, out, MergeOptions(device="cpu", progress=False))
    assert report.method == recipe.stem
    assert report.warnings == []
    assert verify_model(out).healthy
    merged, base = load_model(out), load_model(demo_root / "della-demo" / "base")
    assert set(merged) == set(base)
    assert any(not torch.equal(merged[n].float(), base[n].float()) for n in base)


def test_the_task_arithmetic_example_in_closed_form(demo_root, monkeypatch):
    monkeypatch.chdir(demo_root)
    out = demo_root / "ta-closed-form"
    run_merge(EXAMPLES / "task_arithmetic.yaml", out, MergeOptions(device="cpu", progress=False))
    models = demo_root / "della-demo"
    base, math, code = (load_model(models / n) for n in ("base", "expert-math", "expert-code"))
    for name, tensor in load_model(out).items():
        expected = base[name] + 0.7 * (math[name] - base[name]) + 0.3 * (code[name] - base[name])
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected.to(torch.bfloat16)), name


def test_the_card_is_worth_publishing(demo_root, monkeypatch):
    monkeypatch.chdir(demo_root)
    models = demo_root / "della-demo"
    (models / "base" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    out = demo_root / "carded"
    try:
        report = run_merge(models / "recipe.yaml", out, MergeOptions(device="cpu", progress=False))
    finally:
        (models / "base" / "README.md").unlink()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0"
    body = card.split("---\n", 2)[2]
    assert body.startswith("# carded\n")
    assert "merges 2 fine-tuned models, `expert-math` and `expert-code`, into their" in body
    assert "made with della using" not in body
    assert "| expert-math | model | 1 | 0.7 | 0.07 | local folder |" in body
    assert "not used" not in body
    assert "- seed: 42" in body
    assert "apache-2.0, the license of the base model." in body
    # The recipe exactly as written: relative paths kept as typed, here and next to the model.
    written = (models / "recipe.yaml").read_text()
    assert written.rstrip() in body
    assert (out / "della_recipe.yaml").read_text() == written
    assert report.warnings == []


def test_a_deterministic_method_lists_no_seed_or_rescale(demo_root, monkeypatch):
    monkeypatch.chdir(demo_root)
    out = demo_root / "ties-card"
    run_merge(EXAMPLES / "ties.yaml", out, MergeOptions(device="cpu", progress=False))
    body = (out / "README.md").read_text().split("---\n", 2)[2]
    assert "seed" not in body.split("## Recipe")[0]
    assert "rescale" not in body
    assert "- lambda: 1" in body


def test_differing_licenses_are_a_warning(demo_root, monkeypatch):
    monkeypatch.chdir(demo_root)
    models = demo_root / "della-demo"
    cards = {"base": "apache-2.0", "expert-code": "cc-by-nc-4.0"}
    for name, license in cards.items():
        (models / name / "README.md").write_text(f"---\nlicense: {license}\n---\n")
    try:
        out = demo_root / "licenses"
        report = run_merge(models / "recipe.yaml", out, MergeOptions(device="cpu", progress=False))
    finally:
        for name in cards:
            (models / name / "README.md").unlink()
    assert len(report.warnings) == 1
    assert "different licenses" in report.warnings[0]
    assert "cc-by-nc-4.0" in report.warnings[0]


def test_absolute_paths_never_reach_the_recipe_or_the_card(demo_root, tmp_path):
    models = demo_root / "della-demo"
    recipe = tmp_path / "absolute.yaml"
    text = (models / "recipe.yaml").read_text().replace("./", f"{models}/")
    recipe.write_text(text)
    out = tmp_path / "out"
    run_merge(recipe, out, MergeOptions(device="cpu", progress=False))
    for name in ("della_recipe.yaml", "README.md"):
        assert str(models) not in (out / name).read_text(), name
    assert load_recipe(out / "della_recipe.yaml").schema.base_model == "base"


def _resized_llama(folder: Path, **sizes) -> Path:
    """A tiny Llama like the zoo's, with some sizes changed (``hidden_size=48``)."""
    import transformers

    from della_cli.tiny import save_tokenizer, tiny_config

    config = tiny_config("llama")
    for name, value in sizes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


@pytest.mark.parametrize(
    ("sizes", "cause"),
    [
        ({"hidden_size": 48}, "the cause: hidden_size 48 vs 32 in its config.json"),
        ({"intermediate_size": 80}, "the cause: intermediate_size 80 vs 64 in its config.json"),
    ],
)
def test_a_size_mismatch_is_one_line_naming_its_cause(
    model_zoo, write_recipe, tmp_path, sizes, cause
):
    other = _resized_llama(tmp_path / "other", **sizes)
    base = model_zoo("llama")
    recipe = write_recipe(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(model_zoo("llama", expert=1))}, {"model": str(other)}],
            "parameters": {"density": 0.5},
        }
    )
    result = invoke("plan", recipe)
    assert result.exit_code == 2
    problems = [line for line in result.stderr.splitlines() if "other" in line]
    assert len(problems) == 1, result.stderr
    assert cause in problems[0]
    assert "more tensor(s) differ" in problems[0]


@pytest.mark.parametrize("layers", [1, 3])
def test_another_number_of_layers_is_an_error(model_zoo, write_recipe, tmp_path, layers):
    other = _resized_llama(tmp_path / "other", num_hidden_layers=layers)
    recipe = write_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(model_zoo("llama")),
            "models": [{"model": str(other)}],
        }
    )
    result = invoke("plan", recipe)
    assert result.exit_code == 2, result.output
    assert f"{layers} layers in 'model.layers' vs 2" in result.stderr
    assert "different depths" in result.stderr


def test_a_mistyped_model_path_names_the_field_and_the_likely_folder(demo_root, monkeypatch):
    monkeypatch.chdir(demo_root)
    recipe = demo_root / "typo.yaml"
    recipe.write_text(
        (EXAMPLES / "ties.yaml")
        .read_text()
        .replace("della-demo/expert-code", "della-demo/expert-cod")
    )
    result = invoke("plan", recipe)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: models.1.model: 'della-demo/expert-cod' is no folder here")
    assert line.endswith("did you mean the folder 'della-demo/expert-code'?")


def test_a_mistyped_relative_path_says_where_it_looked(demo_root, monkeypatch):
    monkeypatch.chdir(demo_root)
    recipe = demo_root / "della-demo" / "typo.yaml"
    recipe.write_text(
        (demo_root / "della-demo" / "recipe.yaml").read_text().replace("./base", "./bsae")
    )
    result = invoke("plan", recipe)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: base_model: model folder './bsae' does not exist (looked for ")
    assert str(demo_root / "della-demo" / "bsae") in line
    assert line.endswith("did you mean './base'?")


def test_every_missing_model_is_named_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "offline.yaml"
    recipe.write_text(
        "merge_method: task_arithmetic\nbase_model: org/base\n"
        "models:\n  - model: org/one\n  - model: org/two\n"
    )
    result = invoke("plan", recipe)
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert "3 models cannot be opened" in line
    for name in ("org/base", "org/one", "org/two"):
        assert name in line
