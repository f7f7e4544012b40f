"""``tokenizer_source``: the output's tokenizer files, vocabulary rows and ``vocab_size`` all
come from the model it names, consistently; everything else still follows the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from della_cli.api import MergeOptions, run_merge
from della_cli.errors import RecipeError
from della_cli.tiny import save_tokenizer
from della_cli.verify import verify_model

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def with_vocabulary(source: Path, folder: Path, rows: int) -> Path:
    """A copy of ``source`` whose tokenizer and vocabulary tensors have ``rows`` tokens (new
    rows random, seeded; removed rows cut from the end), as a fine-tune that added or
    removed tokens would have."""
    tensors = load_model(source)
    generator = torch.Generator().manual_seed(rows)
    for name in VOCAB_TENSORS:
        tensor = tensors[name]
        extra = max(0, rows - tensor.shape[0])
        grown = torch.cat([tensor, torch.randn(extra, tensor.shape[1], generator=generator)])
        tensors[name] = grown[:rows].contiguous()
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    (folder / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    save_tokenizer(folder, rows)
    return folder


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
