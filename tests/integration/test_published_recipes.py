"""The recipes of tests/recipes/, shaped like published ones: each is read with the notes its
header lists and planned; the deterministic ones are merged by della and by mergekit 0.1.5 and
compared; those in refused/ give the one-line error their header states.

The recipes name real Hub models; a workspace maps each name to a tiny local stand-in (a
folder of that name, which both tools read before looking at the Hub).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from lora_factory import write_adapter
from oracle import assert_same_model, assert_same_tokenizer
from vocabularies import with_added_tokens, with_vocabulary

from della_cli.api import MergeOptions, run_merge
from della_cli.chat_template import template_text
from della_cli.errors import RecipeError
from della_cli.preflight import plan_merge
from della_cli.recipe import load_recipe

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
ACCEPTED = sorted(RECIPES_DIR.glob("*.yaml"))
REFUSED = sorted((RECIPES_DIR / "refused").glob("*.yaml"))
# The Hub names the recipes use, and the tiny stand-in of each.
STAND_INS = {
    "meta-llama/Meta-Llama-3-8B": "base",
    "NousResearch/Hermes-2-Pro-Llama-3-8B": "expert-1",
    "cognitivecomputations/dolphin-2.9-llama3-8b": "expert-2",
    "example-org/Llama-3-8B-extended-vocab": "grown",
    "teknium/OpenHermes-2.5-Llama-3-8B": "chatml-1",
    "example-org/chatml-tune-Llama-3-8B": "chatml-2",
    "example-org/another-chatml-tune-Llama-3-8B": "chatml-1",
    "mistralai/Mistral-7B-v0.1": "base",
    "teknium/OpenHermes-2.5-Mistral-7B": "chatml-tokens",
    "HuggingFaceH4/zephyr-7b-beta": "expert-2",
}
# The LoRA adapters the recipes name (model+adapter), made for the base's stand-in.
ADAPTERS = {"example-org/Llama-3-8B-math-lora": ("q_proj", "v_proj", "down_proj")}
# Where mergekit computes in a 16-bit dtype and della in float32: a unit in the last place.
TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2}


def header(path: Path, label: str) -> list[str]:
    """The ``# label: text`` lines of a recipe's header comment."""
    return re.findall(rf"(?m)^# {label}: (.*)$", path.read_text())


def is_deterministic(path: Path) -> bool:
    return not load_recipe(path).method.is_random


@pytest.fixture(scope="module")
def workspace(model_zoo, tmp_path_factory) -> Path:
    """A folder holding each stand-in under its Hub name, and a copy of every recipe."""
    folder = tmp_path_factory.mktemp("published")
    expert_1, expert_2 = model_zoo("llama", expert=1), model_zoo("llama", expert=2)
    built = {"base": model_zoo("llama"), "expert-1": expert_1, "expert-2": expert_2}
    built["grown"] = with_vocabulary(expert_1, folder / "grown", 98)
    chatml_tokens = (("<|im_end|>", True), ("<|im_start|>", True))
    built["chatml-tokens"] = with_added_tokens(expert_1, folder / "chatml-tokens", chatml_tokens)
    for index, expert in enumerate((expert_1, expert_2), start=1):
        built[f"chatml-{index}"] = shutil.copytree(expert, folder / f"chatml-{index}")
        (built[f"chatml-{index}"] / "chat_template.jinja").write_text(template_text("chatml"))
    for name, stand_in in STAND_INS.items():
        shutil.copytree(built[stand_in], folder / name)
    for name, targets in ADAPTERS.items():
        write_adapter(folder / name, built["base"], targets)
    for path in ACCEPTED:
        shutil.copy(path, folder / path.name)
    return folder


def test_the_folder_covers_every_feature():
    texts = "".join(path.read_text() for path in ACCEPTED)
    features = ("tokenizer:", "tokenizer_source:", "chat_template: auto", "name:", "lambda:")
    layers = ("slices:", "layer_range:", "modules:")
    for feature in (*features, *layers, "- filter:", "weight: [", "density: [", "value: ["):
        assert feature in texts, feature
    assert len(ACCEPTED) >= 10 and len(REFUSED) >= 1
    assert all(header(path, "refused") for path in REFUSED)


@pytest.mark.parametrize("path", ACCEPTED, ids=lambda p: p.stem)
def test_published_recipe_is_read_with_its_notes_and_planned(path, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    recipe = load_recipe(workspace / path.name)
    expected = header(path, "note")
    assert len(recipe.schema.notes) == len(expected), recipe.schema.notes
    for note, start in zip(recipe.schema.notes, expected, strict=True):
        assert note.startswith(start), (note, start)
    report = plan_merge(workspace / path.name, None, MergeOptions(device="cpu", progress=False))
    assert report.can_run, report.problems
    assert report.warnings[: len(expected)] == list(recipe.schema.notes)


@pytest.mark.parametrize("path", REFUSED, ids=lambda p: p.stem)
def test_refused_recipe_says_why_in_one_line(path):
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value).removeprefix(f"{path}: ")  # YAML errors name the file
    assert message.startswith(header(path, "refused")[0]), message
    assert "\n" not in message


@pytest.fixture(scope="module")
def mergekit_outputs(mergekit, workspace, tmp_path_factory) -> dict[str, Path]:
    recipes = {p.stem: workspace / p.name for p in ACCEPTED if is_deterministic(p)}
    return mergekit.merge_many(recipes, tmp_path_factory.mktemp("mergekit-published"))


@pytest.mark.oracle
@pytest.mark.parametrize("path", [p for p in ACCEPTED if is_deterministic(p)], ids=lambda p: p.stem)
def test_published_recipe_matches_mergekit(
    path, workspace, mergekit_outputs, tmp_path, monkeypatch
):
    monkeypatch.chdir(workspace)
    ours = tmp_path / "della-out"
    run_merge(workspace / path.name, ours, MergeOptions(device="cpu", progress=False))
    dtype = load_recipe(path).schema.dtype
    assert_same_model(ours, mergekit_outputs[path.stem], TOLERANCE.get(dtype or "", 1e-6))
    assert_same_tokenizer(ours, mergekit_outputs[path.stem])
