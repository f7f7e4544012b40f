"""The architecture matrix: merging is by tensor name, with no per-architecture table.

Each architecture is a tiny random-weight ``transformers`` model saved with ``save_pretrained``,
so its files (names, layouts, tied embeddings, MoE experts, a vision tower) are what the real
model's are. For each: a deterministic merge against its closed form, a DELLA merge against
the rescaling law of ALGORITHMS.md, and a reload with the matching Auto class and a forward
pass with finite outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from della_cli.api import MergeOptions, run_merge
from della_cli.tiny import ARCHITECTURES, auto_class_name, save_tokenizer
from della_cli.verify import verify_model

TIED = {"gemma", "gemma2", "gpt2"}  # tied by default in their transformers configs


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def merge(write_recipe, tmp_path: Path, recipe: dict, out: str = "out") -> tuple[Path, object]:
    folder = tmp_path / out
    report = run_merge(write_recipe(recipe, f"{out}.yaml"), folder, MergeOptions(device="cpu"))
    return folder, report


def forward_logits(folder: Path, architecture: str) -> torch.Tensor:
    """Load ``folder`` with the Auto class that matches the architecture and run five tokens."""
    import transformers

    model = getattr(transformers, auto_class_name(architecture)).from_pretrained(folder)
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 6, 7, 8]])).logits


def magprune_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """k = (d − ε) + 2ε·R/(n − 1), R the stable ascending rank of |δ| in its row (rows: a 1-D
    tensor is one row, otherwise shape[0] rows), written out independently of the package."""
    rows = delta.abs().reshape(1, -1) if delta.dim() == 1 else delta.abs().reshape(len(delta), -1)
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows, dim=1, stable=True), dim=1).double()
    q = ranks / (n - 1) if n > 1 else torch.full_like(rows, 0.5, dtype=torch.float64)
    return ((density - epsilon) + 2 * epsilon * q).reshape(delta.shape)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_task_arithmetic_matches_the_closed_form_and_loads(
    architecture, model_zoo, write_recipe, tmp_path
):
    base = model_zoo(architecture)
    experts = [model_zoo(architecture, expert=1), model_zoo(architecture, expert=2)]
    weights, lam = [1.0, 0.5], 0.8
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(e), "parameters": {"weight": w}}
            for e, w in zip(experts, weights, strict=True)
        ],
        "parameters": {"lambda": lam},
    }
    out, report = merge(write_recipe, tmp_path, recipe)
    base_tensors, merged = load_model(base), load_model(out)
    expert_tensors = [load_model(e) for e in experts]
    assert merged.keys() == base_tensors.keys()
    for name, tensor in merged.items():
        b = base_tensors[name].double()
        if not base_tensors[name].is_floating_point():
            assert torch.equal(tensor, base_tensors[name]), name
            continue
        delta = sum(
            w * (e[name].double() - b) for w, e in zip(weights, expert_tensors, strict=True)
        )
        difference = (tensor.double() - (b + lam * delta)).abs().max().item()
        assert difference <= 1e-6, f"{architecture} {name}: off by {difference:.3g}"

    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == base_config["model_type"]
    tied = architecture in TIED
    has_lm_head = any(n.endswith("lm_head.weight") for n in merged)
    assert has_lm_head == (not tied)
    if "tie_word_embeddings" in base_config:
        assert config["tie_word_embeddings"] == tied
    assert verify_model(out).healthy
    logits = forward_logits(out, architecture)
    assert logits.shape[:2] == (1, 5)
    assert torch.isfinite(logits).all()
    assert report.warnings == []


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_della_survivors_follow_the_rescaling_law_and_load(
    architecture, model_zoo, write_recipe, tmp_path
):
    """One expert: sign election agrees with it and the disjoint mean is the identity, so every
    merged entry is b + λ·δ/k (kept) or b (dropped), and the kept share is about the density."""
    base, expert = model_zoo(architecture), model_zoo(architecture, expert=1)
    density, epsilon, lam = 0.6, 0.1, 1.2
    recipe = {
        "merge_method": "della",
        "base_model": str(base),
        "models": [{"model": str(expert)}],
        "parameters": {"density": density, "epsilon": epsilon, "lambda": lam},
        "seed": 11,
    }
    out, _ = merge(write_recipe, tmp_path, recipe)
    base_tensors, expert_tensors, merged = load_model(base), load_model(expert), load_model(out)
    kept_total = counted = 0
    for name, tensor in merged.items():
        if not tensor.is_floating_point():
            continue
        b = base_tensors[name].double()
        delta = expert_tensors[name].float().double() - b
        moved = (tensor.double() - b) / lam
        kept = moved != 0
        expected = delta / magprune_keep_prob(delta.float(), density, epsilon)
        error = (moved - expected).abs().where(kept, torch.zeros_like(moved)).max().item()
        assert error <= 1e-5, f"{architecture} {name}: survivor off by {error:.3g}"
        kept_total += int(kept.sum())
        counted += int((delta != 0).sum())
    assert abs(kept_total / counted - density) < 0.03, kept_total / counted
    assert torch.isfinite(forward_logits(out, architecture)).all()


def test_qwen2_padded_vocabulary_keeps_its_padding(model_zoo, write_recipe, tmp_path):
    """Qwen2 checkpoints pad the embedding rows past the tokenizer: 128 rows for 96 tokens
    here. An expert with 2 added tokens (130 rows) is cropped to the base's 128 rows, with a
    warning, and the output keeps 128 rows, ``vocab_size: 128`` and the 96-token tokenizer."""
    base = shutil.copytree(model_zoo("qwen2", vocab_size=128), tmp_path / "base")
    save_tokenizer(base, 96)
    grown = tmp_path / "grown"
    tensors = load_model(model_zoo("qwen2", expert=1, vocab_size=128))
    extra = torch.randn(2, tensors["model.embed_tokens.weight"].shape[1])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], extra])
    grown.mkdir()
    save_file(tensors, grown / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    (grown / "config.json").write_text(json.dumps({**config, "vocab_size": 130}))
    recipe = {
        "merge_method": "della",
        "base_model": str(base),
        "models": [
            {"model": str(grown)},
            {"model": str(model_zoo("qwen2", expert=2, vocab_size=128))},
        ],
        "parameters": {"density": 0.7, "epsilon": 0.05},
        "seed": 3,
    }
    out, report = merge(write_recipe, tmp_path, recipe)
    merged = load_model(out)
    assert merged["model.embed_tokens.weight"].shape[0] == 128
    assert merged["lm_head.weight"].shape[0] == 128
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128
    cropped = [w for w in report.warnings if "cropped" in w]
    assert len(cropped) == 2 and all("130" in w and "128" in w for w in cropped), cropped
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    result = verify_model(out)
    assert result.healthy, result
    assert torch.isfinite(forward_logits(out, "qwen2")).all()


def _with_rows(source: Path, folder: Path, rows: int) -> Path:
    """``source`` with its vocabulary tensors cut or grown (seeded rows) to ``rows``."""
    tensors = load_model(source)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensor = tensors[name]
        extra = torch.randn(max(0, rows - len(tensor)), tensor.shape[1])
        tensors[name] = torch.cat([tensor, extra])[:rows].contiguous()
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    return folder


@pytest.mark.parametrize(("base_rows", "expert_rows"), [(32000, 32001), (32001, 32000)])
def test_llama_32000_and_32001_row_vocabularies_merge_to_the_base(
    base_rows, expert_rows, model_zoo, write_recipe, tmp_path
):
    """The most common mismatch in the wild: a fine-tune that added a pad token."""
    base = _with_rows(model_zoo("llama", vocab_size=32000), tmp_path / "base", base_rows)
    shutil.copy2(model_zoo("llama", vocab_size=32000) / "tokenizer.json", base)
    expert_source = model_zoo("llama", expert=1, vocab_size=32000)
    expert = _with_rows(expert_source, tmp_path / "expert", expert_rows)
    recipe = {
        "merge_method": "della",
        "base_model": str(base),
        "models": [{"model": str(expert)}],
        "parameters": {"density": 0.7, "epsilon": 0.1},
    }
    out, report = merge(write_recipe, tmp_path, recipe)
    merged = load_model(out)
    assert merged["model.embed_tokens.weight"].shape[0] == base_rows
    assert merged["lm_head.weight"].shape[0] == base_rows
    assert json.loads((out / "config.json").read_text())["vocab_size"] == base_rows
    how = "cropped" if expert_rows > base_rows else "padded with zero deltas"
    expected = f"has {expert_rows} rows in 'model.embed_tokens.weight', the output {base_rows}"
    assert any(expected in w and how in w for w in report.warnings), report.warnings
    assert torch.isfinite(forward_logits(out, "llama")).all()
