"""``tokenizer_source``: the output's tokenizer files, vocabulary rows and ``vocab_size`` all
come from the model it names, consistently; everything else still follows the base."""

from __future__ import annotations

import json

import pytest
import torch
from vocabularies import VOCAB_TENSORS, load_model, with_vocabulary

from della_cli.api import MergeOptions, run_merge
from della_cli.errors import RecipeError
from della_cli.verify import verify_model


def merge_with_source(write_recipe, tmp_path, base, experts, source, method="task_arithmetic"):
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(expert), "parameters": {"weight": weight}}
            for expert, weight in zip(experts, [1.0, 0.5], strict=False)
        ],
        "parameters": {"density": 0.7, "epsilon": 0.1} if method == "della" else {},
        "seed": 4,
    }
    if source is not None:
        recipe["tokenizer_source"] = source
    out = tmp_path / "out"
    return out, run_merge(write_recipe(recipe), out, MergeOptions(device="cpu"))


def test_a_model_with_added_tokens_gives_its_tokenizer_and_rows(model_zoo, write_recipe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = model_zoo("llama")
    grown = with_vocabulary(model_zoo("llama", expert=1), tmp_path / "grown", 98)
    other = model_zoo("llama", expert=2)
    out, report = merge_with_source(write_recipe, tmp_path, base, [grown, other], str(grown))

    b, g, o, merged = (load_model(f) for f in (base, grown, other, out))
    for name in VOCAB_TENSORS:
        assert merged[name].shape == (98, b[name].shape[1])
        # Shared rows: the usual task arithmetic; the other expert lacks the new rows (zero
        # delta there), and the grown model's own rows stand in for the base's missing ones.
        expected = b[name].double() + (g[name][:96].double() - b[name]) + 0.5 * (o[name] - b[name])
        assert (merged[name][:96].double() - expected).abs().max() <= 1e-6, name
        assert torch.equal(merged[name][96:], g[name][96:]), name
    for name in set(b) - set(VOCAB_TENSORS):
        assert merged[name].shape == b[name].shape

    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 98
    assert (out / "tokenizer.json").read_bytes() == (grown / "tokenizer.json").read_bytes()
    generation = (out / "generation_config.json").read_bytes()
    assert generation == (base / "generation_config.json").read_bytes()  # still the base's
    assert len(AutoTokenizer.from_pretrained(out)) == 98
    notes = [w for w in report.warnings if w.startswith("tokenizer_source")]
    assert len(notes) == 2 and all("98 rows" in w and "96" in w for w in notes), notes
    padded = [w for w in report.warnings if "padded" in w]
    assert len(padded) == 2 and all(str(other) in w for w in padded), padded
    assert verify_model(out).healthy
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 96, 97]])).logits  # the new tokens embed and score
    assert logits.shape == (1, 3, 98) and torch.isfinite(logits).all()


def test_a_model_with_fewer_tokens_crops_the_output(model_zoo, write_recipe, tmp_path):
    base = model_zoo("llama")
    small = with_vocabulary(model_zoo("llama", expert=1), tmp_path / "small", 90)
    other = model_zoo("llama", expert=2)
    out, _ = merge_with_source(write_recipe, tmp_path, base, [other, small], str(small), "della")
    merged = load_model(out)
    assert all(merged[name].shape[0] == 90 for name in VOCAB_TENSORS)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 90
    assert (out / "tokenizer.json").read_bytes() == (small / "tokenizer.json").read_bytes()
    assert verify_model(out).healthy


def test_the_crop_gives_the_rows_a_full_merge_would(model_zoo, write_recipe, tmp_path):
    """Cropping to the tokenizer's rows drops rows; it does not change the ones kept (the
    draws are keyed by position, so even DELLA's kept rows are the uncropped merge's)."""
    base = model_zoo("llama")
    small = with_vocabulary(model_zoo("llama", expert=1), tmp_path / "small", 90)
    other = model_zoo("llama", expert=2)
    cropped, _ = merge_with_source(
        write_recipe, tmp_path, base, [other, small], str(small), "della"
    )
    full_dir = tmp_path / "full"
    full_dir.mkdir()
    full, _ = merge_with_source(write_recipe, full_dir, base, [other, small], None, "della")
    a, b = load_model(cropped), load_model(full)
    for name in VOCAB_TENSORS:
        assert torch.equal(a[name], b[name][:90]), name
    assert all(torch.equal(a[n], b[n]) for n in set(a) - set(VOCAB_TENSORS))


def test_naming_the_base_is_the_default(model_zoo, write_recipe, tmp_path):
    base = model_zoo("llama")
    experts = [model_zoo("llama", expert=1), model_zoo("llama", expert=2)]
    named, _ = merge_with_source(write_recipe, tmp_path, base, experts, str(base))
    default_dir = tmp_path / "default"
    default_dir.mkdir()
    default, _ = merge_with_source(write_recipe, default_dir, base, experts, "base")
    for file in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (named / file).read_bytes() == (default / file).read_bytes(), file


def test_an_unknown_tokenizer_source_is_a_recipe_error(model_zoo, write_recipe, tmp_path):
    base, expert = model_zoo("llama"), model_zoo("llama", expert=1)
    with pytest.raises(RecipeError, match="tokenizer_source: 'elsewhere' is neither base nor"):
        merge_with_source(write_recipe, tmp_path, base, [expert], "elsewhere")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_block_is_tokenizer_source(model_zoo, write_recipe, tmp_path):
    """``tokenizer: {source: X}`` (mergekit's newer form) merges as ``tokenizer_source: X``."""
    base = model_zoo("llama")
    grown = with_vocabulary(model_zoo("llama", expert=1), tmp_path / "grown", 98)
    other = model_zoo("llama", expert=2)
    plain, _ = merge_with_source(write_recipe, tmp_path, base, [grown, other], str(grown))
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(grown), "parameters": {"weight": 1.0}},
            {"model": str(other), "parameters": {"weight": 0.5}},
        ],
        "tokenizer": {"source": str(grown)},
        "seed": 4,
    }
    out = tmp_path / "block"
    run_merge(write_recipe(recipe, "block.yaml"), out, MergeOptions(device="cpu"))
    a, b = load_model(plain), load_model(out)
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 98
    assert (out / "tokenizer.json").read_bytes() == (grown / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    "value", ["chatml", "auto", "{% for m in messages %}{{ m.content }}{% endfor %}"]
)
def test_chat_template_is_what_transformers_loads(model_zoo, write_recipe, tmp_path, value):
    from transformers import AutoTokenizer

    from della_cli.chat_template import template_text

    base = model_zoo("llama")
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(model_zoo("llama", expert=1))}],
        "chat_template": value,
    }
    out = tmp_path / "out"
    report = run_merge(write_recipe(recipe), out, MergeOptions(device="cpu"))
    expected = (
        AutoTokenizer.from_pretrained(base).chat_template.strip()
        if value == "auto"
        else template_text(value)
    )
    assert AutoTokenizer.from_pretrained(out).chat_template == expected
    assert json.loads((out / "tokenizer_config.json").read_text()).get("chat_template") in (
        None,
        expected,
    )
    auto_notes = [w for w in report.warnings if w.startswith("chat_template: auto")]
    assert len(auto_notes) == (value == "auto")
