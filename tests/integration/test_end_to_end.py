"""End-to-end merges of tiny real models through ``della_cli.api.run_merge``.

Expected outputs are computed here, independently of ``della_cli.methods``, from the input
safetensors files: closed forms for the deterministic methods, a hand-rolled TIES, and the
MAGPRUNE keep probabilities from the rank formula of ALGORITHMS.md for the random ones.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from della_cli.api import MergeOptions, prepare, run_merge, select_device
from della_cli.engine import MergeEngine
from della_cli.errors import PlanError
from della_cli.io.dtypes import to_torch

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2")
METADATA_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


# --- helpers ---------------------------------------------------------------------------------


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, whether it is one file or shards."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def derive_model(
    source: Path,
    folder: Path,
    edit_tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    edit_config: Callable[[dict], None] | None = None,
) -> Path:
    """A copy of ``source`` with its tensors and config edited in place by the callbacks."""
    folder.mkdir(parents=True)
    tensors = load_model(source)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith("model"):
            shutil.copy2(path, folder / path.name)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def recipe_for(method: str, base: Path | None, experts: list[Path], **fields) -> dict:
    """A recipe dict; ``weights`` (a list) sets per-model weights, other keys go at top level."""
    weights = fields.pop("weights", [1.0] * len(experts))
    recipe = {
        "merge_method": method,
        "models": [
            {"model": str(path), "parameters": {"weight": weight}}
            for path, weight in zip(experts, weights, strict=True)
        ],
        **fields,
    }
    if base is not None:
        recipe["base_model"] = str(base)
    return recipe


@pytest.fixture
def merge(write_recipe, tmp_path):
    """Write a recipe, merge it into ``tmp_path / out``; return (output folder, report)."""

    def run(recipe: dict, out: str = "out", **options):
        recipe_path = write_recipe(recipe, name=f"{out}.yaml")
        folder = tmp_path / out
        report = run_merge(recipe_path, folder, MergeOptions(device="cpu", **options))
        return folder, report

    return run


def deltas_of(base: dict, experts: list[dict], name: str) -> list[torch.Tensor]:
    """Task vectors computed in float32, as ALGORITHMS.md says, then widened for the reference."""
    return [(e[name].float() - base[name].float()).double() for e in experts]


def top_k_mask(delta: torch.Tensor, keep: int, skip_top: int = 0) -> torch.Tensor:
    """Keep the ``keep`` entries just below the ``skip_top`` largest |δ| (stable ascending ranks:
    equal magnitudes rank by position)."""
    order = torch.argsort(delta.abs().reshape(-1), stable=True)
    chosen = order[delta.numel() - skip_top - keep : delta.numel() - skip_top]
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[chosen] = True
    return mask.reshape(delta.shape)


def reference_merge(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    masks: list[torch.Tensor] | None,
    consensus: bool,
    normalize: bool,
    lam: float = 1.0,
) -> torch.Tensor:
    """The generalized pipeline written out plainly, in float64."""
    kept = deltas if masks is None else [d * m for d, m in zip(deltas, masks, strict=True)]
    weighted = [w * d for w, d in zip(weights, kept, strict=True)]
    if consensus:
        total = sum(weighted)
        signs = torch.where(total >= 0, 1.0, -1.0).double()
        agree = [torch.sign(u) == signs for u in weighted]
        numerator = sum(u * a for u, a in zip(weighted, agree, strict=True))
        denominator = sum(w * a.double() for w, a in zip(weights, agree, strict=True))
    else:
        numerator = sum(weighted)
        denominator = torch.full_like(base, float(sum(weights)))
    merged = numerator / torch.where(denominator == 0, 1.0, denominator) if normalize else numerator
    return base.double() + lam * merged


def magprune_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """k = (d − ε) + 2ε·(R − 1)/(n − 1) with R the stable ascending magnitude rank in the row."""
    rows = (
        delta.abs().reshape(1, -1) if delta.dim() == 1 else delta.abs().reshape(delta.shape[0], -1)
    )
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows, dim=1, stable=True), dim=1).double()
    q = ranks / (n - 1) if n > 1 else torch.full_like(rows, 0.5, dtype=torch.float64)
    return ((density - epsilon) + 2 * epsilon * q).reshape(delta.shape)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, atol: float = 1e-6):
    difference = (actual.double() - expected.double()).abs().max().item()
    assert difference <= atol, f"{name}: off by {difference:.3g}"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# --- deterministic methods against closed forms ----------------------------------------------


def test_linear_is_the_weighted_mean_of_the_models(model_zoo, merge):
    models = [model_zoo("llama"), model_zoo("llama", expert=1), model_zoo("llama", expert=2)]
    weights = [1.0, 2.0, 0.5]
    out, _ = merge(recipe_for("linear", None, models, weights=weights))
    inputs = [load_model(m) for m in models]
    merged = load_model(out)
    assert set(merged) == set(inputs[0])
    for name, tensor in merged.items():
        expected = sum(w * m[name].double() for w, m in zip(weights, inputs, strict=True))
        assert tensor.dtype == torch.float32
        assert_close(tensor, expected / sum(weights), name)


@pytest.mark.parametrize(
    ("method", "parameters", "normalize", "consensus"),
    [
        ("task_arithmetic", {"lambda": 0.8}, False, False),
        ("task_arithmetic", {"lambda": 1.3, "normalize": True}, True, False),
        ("ties", {"density": 0.4, "lambda": 0.9}, True, True),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.05}, False, False),
        ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}, False, True),
    ],
)
def test_delta_methods_match_the_closed_form(
    model_zoo, merge, method, parameters, normalize, consensus
):
    base = model_zoo("llama")
    experts = [model_zoo("llama", expert=1), model_zoo("llama", expert=2)]
    weights = [1.0, 0.6]
    out, _ = merge(recipe_for(method, base, experts, weights=weights, parameters=parameters))
    base_tensors = load_model(base)
    expert_tensors = [load_model(e) for e in experts]
    merged = load_model(out)
    assert set(merged) == set(base_tensors)
    density, gamma = parameters.get("density"), parameters.get("gamma", 0.0)
    for name, tensor in merged.items():
        deltas = deltas_of(base_tensors, expert_tensors, name)
        masks = None
        if density is not None:
            numel = deltas[0].numel()
            skip = int(gamma * numel)
            keep = min(int(density * numel), numel - skip)
            masks = [top_k_mask(d, keep, skip) for d in deltas]
        expected = reference_merge(
            base_tensors[name],
            deltas,
            weights,
            masks,
            consensus,
            normalize,
            parameters.get("lambda", 1.0),
        )
        assert_close(tensor, expected, name)


def test_ties_reference_reproduces_the_worked_example():
    """The test's own TIES agrees with ALGORITHMS.md E2, so it can be trusted as a reference."""
    deltas = [
        torch.tensor([0.9, -0.1, 0.4, -0.7, 0.05, 0.3]),
        torch.tensor([-0.5, 0.8, -0.2, -0.6, 0.1, -0.05]),
        torch.tensor([0.2, 0.3, 0.6, 0.1, -0.9, 0.0]),
    ]
    deltas = [d.double() for d in deltas]
    masks = [top_k_mask(d, 3) for d in deltas]
    result = reference_merge(torch.zeros(6), deltas, [1, 1, 1], masks, True, True)
    expected = torch.tensor([0.9, 0.55, 0.5, -0.65, -0.9, 0.0], dtype=torch.float64)
    assert torch.allclose(result, expected, atol=1e-12)
    result = reference_merge(torch.zeros(6), deltas, [1, 2, 1], masks, True, True)
    expected = torch.tensor([-0.5, 1.9 / 3, 0.5, -1.9 / 3, -0.9, 0.0], dtype=torch.float64)
    assert torch.allclose(result, expected, atol=1e-12)


# --- random methods with one expert ----------------------------------------------------------


def test_della_linear_survivors_are_divided_by_their_keep_probability(model_zoo, merge):
    density, epsilon = 0.6, 0.2
    base, expert = model_zoo("llama"), model_zoo("llama", expert=1)
    recipe = recipe_for(
        "della_linear", base, [expert], parameters={"density": density, "epsilon": epsilon}
    )
    out, _ = merge(recipe, seed=3)
    base_tensors, expert_tensors, merged = load_model(base), load_model(expert), load_model(out)
    kept_total = numel_total = 0
    low_rank_kept = high_rank_kept = 0
    for name, tensor in merged.items():
        (delta,) = deltas_of(base_tensors, [expert_tensors], name)
        keep_prob = magprune_keep_prob(delta, density, epsilon)
        out_delta = tensor.double() - base_tensors[name].double()
        kept = out_delta != 0
        expected = torch.where(kept, delta / keep_prob, 0.0)
        assert_close(out_delta, expected, name)
        kept_total += int(kept.sum())
        numel_total += kept.numel()
        low_rank_kept += int(kept[keep_prob < density].sum())
        high_rank_kept += int(kept[keep_prob > density].sum())
    assert abs(kept_total / numel_total - density) < 0.02
    # Larger magnitudes are kept more often (d + ε at the top of a row, d − ε at the bottom).
    assert high_rank_kept > low_rank_kept * 1.2


def test_dare_linear_survivors_are_divided_by_the_density(model_zoo, merge):
    density = 0.3
    base, expert = model_zoo("llama"), model_zoo("llama", expert=1)
    out, _ = merge(recipe_for("dare_linear", base, [expert], parameters={"density": density}))
    base_tensors, expert_tensors, merged = load_model(base), load_model(expert), load_model(out)
    kept_total = numel_total = 0
    for name, tensor in merged.items():
        (delta,) = deltas_of(base_tensors, [expert_tensors], name)
        out_delta = tensor.double() - base_tensors[name].double()
        kept = out_delta != 0
        assert_close(out_delta, torch.where(kept, delta / density, 0.0), name)
        kept_total += int(kept.sum())
        numel_total += kept.numel()
    assert abs(kept_total / numel_total - density) < 0.02


# --- reproducibility -------------------------------------------------------------------------


def della_recipe(model_zoo, architecture: str = "llama", **fields) -> dict:
    base = model_zoo(architecture)
    experts = [model_zoo(architecture, expert=1), model_zoo(architecture, expert=2)]
    parameters = {"density": 0.7, "epsilon": 0.07, "lambda": 1.1}
    return recipe_for("della", base, experts, parameters=parameters, **fields)


def test_same_seed_gives_the_same_bytes_and_another_seed_differs(model_zoo, merge):
    recipe = della_recipe(model_zoo)
    first, _ = merge(recipe, "first", seed=11)
    again, _ = merge(recipe, "again", seed=11)
    other, _ = merge(recipe, "other", seed=12)
    first_bytes = (first / "model.safetensors").read_bytes()
    assert first_bytes == (again / "model.safetensors").read_bytes()
    assert first_bytes != (other / "model.safetensors").read_bytes()


def test_recipe_seed_is_used_when_no_seed_option_is_given(model_zoo, merge):
    from_recipe, report = merge(della_recipe(model_zoo, seed=5), "from-recipe")
    from_option, _ = merge(della_recipe(model_zoo), "from-option", seed=5)
    assert report.seed == 5
    assert (from_recipe / "model.safetensors").read_bytes() == (
        from_option / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("method", ["della", "ties"])
def test_processing_order_and_blocking_do_not_change_the_result(
    model_zoo, merge, write_recipe, method
):
    """Each tensor's draws are keyed by its name and element index: computing the jobs in
    reverse order, a row or two at a time, gives the tensors of the normal merge exactly."""
    recipe = della_recipe(model_zoo, seed=21)
    if method == "ties":
        recipe.update(merge_method="ties", parameters={"density": 0.3})
    out, _ = merge(recipe)
    merged = load_model(out)
    recipe_object, inputs, plan = prepare(write_recipe(recipe, "again.yaml"), MergeOptions())
    engine = MergeEngine(recipe_object, plan, inputs, select_device("cpu"), block_elements=40)
    assert len(engine.row_blocks(plan.jobs[0])) > 1
    try:
        for job in reversed(plan.jobs):
            assert torch.equal(to_torch(engine.compute(job)), merged[job.name]), job.name
    finally:
        for reader in [inputs.base, *inputs.experts]:
            reader.close()


# --- real architectures: load, generate, metadata --------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("method", ["della", "ties"])
def test_merged_architectures_load_and_generate(model_zoo, merge, architecture, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = model_zoo(architecture)
    experts = [model_zoo(architecture, expert=1), model_zoo(architecture, expert=2)]
    parameters = {"density": 0.7, "epsilon": 0.07} if method == "della" else {"density": 0.5}
    # The della merges also exercise out_dtype; the ties merges keep the base's float32.
    out_dtype = "bfloat16" if method == "della" else None
    fields = {"out_dtype": out_dtype} if out_dtype else {}
    recipe = recipe_for(method, base, experts, parameters=parameters, seed=1, **fields)
    out, report = merge(recipe)
    assert report.method == method

    config = json.loads((out / "config.json").read_text())
    expected_dtype = out_dtype or "float32"
    assert config["dtype"] == expected_dtype
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[expected_dtype]
    assert {t.dtype for t in load_model(out).values()} == {torch_dtype}
    base_config = json.loads((base / "config.json").read_text())
    assert config["tie_word_embeddings"] == base_config["tie_word_embeddings"]
    assert ("lm_head.weight" in load_model(out)) == (not config["tie_word_embeddings"])

    for name in METADATA_FILES:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    recipe_text = (out.parent / "out.yaml").read_text()
    for folder in (base, *experts):  # absolute paths: folder names, locally and in the card
        recipe_text = recipe_text.replace(str(folder), folder.name)
    assert (out / "della_recipe.yaml").read_text() == recipe_text
    card = (out / "README.md").read_text()
    front = front_matter(card)
    assert "base_model" not in front, "base_model lists Hub inputs only; these are local"
    assert front["merge_inputs"] == [
        {"model": base.name, "role": "base", "source": "local folder"},
        {"model": experts[0].name, "role": "model", "source": "local folder"},
        {"model": experts[1].name, "role": "model", "source": "local folder"},
    ]
    assert front["tags"] == list(dict.fromkeys(["merge", "della", method]))
    assert front["library_name"] == "transformers"
    assert recipe_text.rstrip() in card
    assert str(base.parent) not in card, "no local path leaks into the card"

    tokenizer, base_tokenizer = (AutoTokenizer.from_pretrained(f) for f in (out, base))
    assert tokenizer.chat_template is not None
    assert tokenizer.chat_template == base_tokenizer.chat_template
    assert tokenizer("w1 w2 w3")["input_ids"] == base_tokenizer("w1 w2 w3")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch_dtype
    # Token ids directly: transformers 5 maps qwen2 to Qwen2Tokenizer, which does not keep the
    # tiny word-level vocabulary, so the text would encode to nothing there.
    input_ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        logits = model(input_ids).logits
        generated = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
        )
    assert torch.isfinite(logits.float()).all()
    assert generated.shape == (1, input_ids.shape[1] + 3)


def test_bfloat16_base_gives_bfloat16_output_by_default(model_zoo, merge):
    from transformers import AutoModelForCausalLM

    base = model_zoo("llama", dtype=torch.bfloat16)
    expert = model_zoo("llama", expert=1, dtype=torch.bfloat16)
    out, _ = merge(recipe_for("task_arithmetic", base, [expert], parameters={"lambda": 0.5}))
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    base_tensors, expert_tensors, merged = load_model(base), load_model(expert), load_model(out)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16, name
        (delta,) = deltas_of(base_tensors, [expert_tensors], name)
        expected = (base_tensors[name].float() + 0.5 * delta.float()).to(torch.bfloat16)
        assert torch.equal(tensor, expected), name
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


# --- sharding --------------------------------------------------------------------------------


def test_sharded_output_matches_the_unsharded_merge(model_zoo, merge):
    from transformers import AutoModelForCausalLM

    recipe = della_recipe(model_zoo, seed=4)
    whole, _ = merge(recipe, "whole")
    sharded, report = merge(recipe, "sharded", out_shard_bytes=20_000)
    count = report.shards
    assert count > 2
    names = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert names == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_tensors = {name: load_file(sharded / name) for name in names}
    all_tensors = load_model(sharded)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in all_tensors.values()
    )
    assert set(index["weight_map"]) == set(all_tensors)
    for tensor_name, file_name in index["weight_map"].items():
        assert tensor_name in shard_tensors[file_name]
    for shard in shard_tensors.values():
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= 20_000 or len(shard) == 1
    unsharded = load_model(whole)
    assert set(unsharded) == set(all_tensors)
    for name, tensor in unsharded.items():
        assert torch.equal(all_tensors[name], tensor), name
    AutoModelForCausalLM.from_pretrained(sharded)


# --- vocabulary, shape and presence mismatches -----------------------------------------------

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def resize_vocab(source: Path, folder: Path, rows: int) -> Path:
    """``source`` with ``rows`` more (or fewer, if negative) vocabulary rows."""

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        for name in VOCAB_TENSORS:
            tensor = tensors[name]
            if rows > 0:
                extra = torch.randn(
                    rows, tensor.shape[1], generator=torch.Generator().manual_seed(9)
                )
                tensors[name] = torch.cat([tensor, extra])
            else:
                tensors[name] = tensor[:rows].contiguous()

    def config(values: dict) -> None:
        values["vocab_size"] += rows

    return derive_model(source, folder, edit, config)


@pytest.mark.parametrize(("rows", "word"), [(1, "cropped"), (-1, "padded")])
def test_vocabulary_rows_follow_the_base(model_zoo, merge, tmp_path, rows, word):
    from transformers import AutoModelForCausalLM

    base = model_zoo("llama")
    expert = resize_vocab(model_zoo("llama", expert=1), tmp_path / "resized", rows)
    other = model_zoo("llama", expert=2)
    out, report = merge(recipe_for("task_arithmetic", base, [expert, other], weights=[1.0, 0.5]))
    base_tensors, merged = load_model(base), load_model(out)
    expert_tensors, other_tensors = load_model(expert), load_model(other)
    vocab = base_tensors["model.embed_tokens.weight"].shape[0]
    shared = min(vocab, vocab + rows)
    for name in VOCAB_TENSORS:
        assert merged[name].shape == base_tensors[name].shape
        base_rows = base_tensors[name].double()
        expert_delta = (expert_tensors[name][:shared] - base_tensors[name][:shared]).double()
        other_delta = (other_tensors[name] - base_tensors[name]).double()
        padded_delta = torch.zeros_like(base_rows)
        padded_delta[:shared] = expert_delta
        assert_close(merged[name], base_rows + padded_delta + 0.5 * other_delta, name)
    messages = [m for m in report.warnings if word in m and "rows" in m]
    assert len(messages) == len(VOCAB_TENSORS), report.warnings
    assert all(str(expert) in m for m in messages)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == vocab
    AutoModelForCausalLM.from_pretrained(out)


def test_della_merges_experts_with_other_vocabularies(model_zoo, merge, tmp_path):
    """Cropping and padding also work under sign consensus and random drops."""
    from transformers import AutoModelForCausalLM

    base, source = model_zoo("llama"), model_zoo("llama", expert=1)
    experts = [resize_vocab(source, tmp_path / f"rows{rows}", rows) for rows in (2, -3)]
    recipe = recipe_for("della", base, experts, parameters={"density": 0.7, "epsilon": 0.1})
    out, report = merge(recipe)
    base_tensors, merged = load_model(base), load_model(out)
    for name in VOCAB_TENSORS:
        assert merged[name].shape == base_tensors[name].shape
        # The last rows: the padded expert has a zero delta there, the cropped one does not.
        assert not torch.equal(merged[name][-3:], base_tensors[name][-3:])
    assert sum("cropped" in m for m in report.warnings) == 2
    assert sum("padded" in m for m in report.warnings) == 2
    AutoModelForCausalLM.from_pretrained(out)


def raw_model(folder: Path, rows: int, seed: int) -> Path:
    """A bare safetensors model with a 1-D vocabulary tensor (an lm_head bias, as in Phi)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(rows, 4, generator=generator),
        "lm_head.weight": torch.randn(rows, 4, generator=generator),
        "lm_head.bias": torch.randn(rows, generator=generator),
        "model.norm.weight": torch.randn(4, generator=generator),
    }
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"vocab_size": rows}))
    return folder


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_one_dimensional_vocabulary_tensors_are_cropped_and_padded(merge, tmp_path, method):
    base = raw_model(tmp_path / "base", 8, seed=0)
    experts = [raw_model(tmp_path / "wide", 10, seed=1), raw_model(tmp_path / "narrow", 6, seed=2)]
    weights = [1.0, 0.5]
    parameters = {"density": 0.5} if method == "ties" else {}
    out, report = merge(recipe_for(method, base, experts, weights=weights, parameters=parameters))
    base_tensors, merged = load_model(base), load_model(out)
    expert_tensors = [load_model(e) for e in experts]
    for name, tensor in merged.items():
        assert tensor.shape == base_tensors[name].shape, name
        deltas = []
        for expert in expert_tensors:
            fitted = base_tensors[name].clone()
            rows = min(len(fitted), len(expert[name]))
            fitted[:rows] = expert[name][:rows]
            deltas.append((fitted - base_tensors[name]).double())
        masks = None
        if method == "ties":
            masks = [top_k_mask(d, d.numel() // 2) for d in deltas]
        expected = reference_merge(
            base_tensors[name], deltas, weights, masks, method == "ties", method == "ties"
        )
        assert_close(tensor, expected, name)
    assert any("'lm_head.bias'" in m and "cropped" in m for m in report.warnings)
    assert any("'lm_head.bias'" in m and "padded" in m for m in report.warnings)


def test_other_shape_mismatch_is_a_plan_error_and_writes_nothing(model_zoo, tmp_path, write_recipe):
    name = "model.layers.0.mlp.up_proj.weight"

    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name][:48].contiguous()

    base = model_zoo("llama")
    expert = derive_model(model_zoo("llama", expert=1), tmp_path / "narrow", shrink)
    recipe = recipe_for("ties", base, [expert, model_zoo("llama", expert=2)])
    recipe["parameters"] = {"density": 0.5}
    out = tmp_path / "results" / "out"
    out.parent.mkdir()
    with pytest.raises(PlanError) as raised:
        run_merge(write_recipe(recipe), out, MergeOptions(device="cpu"))
    message = str(raised.value)
    assert name in message
    assert str(expert) in message
    assert "(48, 32)" in message and "(64, 32)" in message
    assert len(raised.value.problems) == 1
    assert list(out.parent.iterdir()) == []


def test_missing_tensor_leaves_that_expert_out(model_zoo, merge, tmp_path):
    name = "model.layers.1.self_attn.q_proj.weight"
    base, first = model_zoo("llama"), model_zoo("llama", expert=1)
    second = derive_model(
        model_zoo("llama", expert=2), tmp_path / "partial", lambda tensors: tensors.pop(name)
    )
    weights = [1.0, 3.0]
    recipe = recipe_for(
        "task_arithmetic", base, [first, second], weights=weights, parameters={"normalize": True}
    )
    out, report = merge(recipe)
    base_tensors, merged = load_model(base), load_model(out)
    experts = [load_model(first), load_model(second)]
    for tensor_name, tensor in merged.items():
        present = [i for i, e in enumerate(experts) if tensor_name in e]
        deltas = deltas_of(base_tensors, [experts[i] for i in present], tensor_name)
        expected = reference_merge(
            base_tensors[tensor_name], deltas, [weights[i] for i in present], None, False, True
        )
        assert_close(tensor, expected, tensor_name)
    # D counts only the expert that has it: the result is that expert's full delta.
    assert_close(merged[name], experts[0][name], name)
    assert any(name in m and str(second) in m for m in report.warnings), report.warnings


def test_non_floating_tensors_are_copied_from_the_base(model_zoo, merge, tmp_path):
    name = "model.step_counter"

    def with_buffer(values: torch.Tensor) -> Callable[[dict], None]:
        def edit(tensors: dict[str, torch.Tensor]) -> None:
            tensors[name] = values

        return edit

    base = derive_model(model_zoo("llama"), tmp_path / "base", with_buffer(torch.arange(6)))
    same = derive_model(
        model_zoo("llama", expert=1), tmp_path / "same", with_buffer(torch.arange(6))
    )
    differs = derive_model(
        model_zoo("llama", expert=2), tmp_path / "differs", with_buffer(torch.arange(6) * 7)
    )
    recipe = recipe_for(
        "ties", base, [same, differs], parameters={"density": 0.5}, out_dtype="bfloat16"
    )
    out, report = merge(recipe)
    merged = load_model(out)
    assert merged[name].dtype == torch.int64
    assert torch.equal(merged[name], torch.arange(6))
    assert merged["model.norm.weight"].dtype == torch.bfloat16
    about_buffer = [m for m in report.warnings if name in m]
    assert len(about_buffer) == 1 and str(differs) in about_buffer[0]


# --- tied embeddings -------------------------------------------------------------------------


def test_gpt2_stays_tied(model_zoo, merge):
    base = model_zoo("gpt2")
    out, _ = merge(recipe_for("task_arithmetic", base, [model_zoo("gpt2", expert=1)]))
    assert "lm_head.weight" not in load_model(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def untie(source: Path, folder: Path) -> Path:
    """A tied copy of an untied llama: no lm_head.weight, tie_word_embeddings true."""

    def drop_head(tensors: dict[str, torch.Tensor]) -> None:
        del tensors["lm_head.weight"]

    def tie(config: dict) -> None:
        config["tie_word_embeddings"] = True

    return derive_model(source, folder, drop_head, tie)


def test_tied_expert_contributes_its_embedding_as_lm_head(model_zoo, merge, tmp_path):
    from transformers import AutoModelForCausalLM

    base, untied = model_zoo("llama"), model_zoo("llama", expert=1)
    tied = untie(model_zoo("llama", expert=2), tmp_path / "tied")
    out, _ = merge(recipe_for("task_arithmetic", base, [untied, tied], weights=[1.0, 0.5]))
    base_tensors, merged = load_model(base), load_model(out)
    untied_tensors, tied_tensors = load_model(untied), load_model(tied)
    head = "lm_head.weight"
    expected = (
        base_tensors[head].double()
        + (untied_tensors[head].float() - base_tensors[head].float()).double()
        + 0.5 * (tied_tensors["model.embed_tokens.weight"].float() - base_tensors[head]).double()
    )
    assert_close(merged[head], expected, head)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    AutoModelForCausalLM.from_pretrained(out)


def test_tied_base_with_untied_expert_gets_an_lm_head(model_zoo, merge, tmp_path):
    from transformers import AutoModelForCausalLM

    base = untie(model_zoo("llama"), tmp_path / "tied-base")
    expert = model_zoo("llama", expert=1)
    out, report = merge(recipe_for("task_arithmetic", base, [expert]))
    merged, expert_tensors = load_model(out), load_model(expert)
    assert_close(merged["lm_head.weight"], expert_tensors["lm_head.weight"], "lm_head.weight")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert any("untied lm_head" in m for m in report.warnings)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight.detach(), merged["lm_head.weight"])


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("della", {"density": 0.5, "epsilon": 0.1}),
        ("ties", {"density": 0.5}),
        ("linear", {}),
        ("task_arithmetic", {"lambda": 0.8}),
    ],
)
def test_a_cpu_merge_of_bfloat16_models_never_imports_torch(
    bf16_recipe, tmp_path, monkeypatch, method, parameters
):
    """Importing torch costs more than merging a small model: the compiled CPU path and the
    IO around it run on numpy and numba alone (every CPU kernel is numba's since issue 15,
    the weighted sums of linear and task arithmetic too), and the output is the torch path's.
    Nor is pydantic imported (typer 0.29 would, to parse options; pyproject.toml keeps typer
    below it): its import alone costs a tenth of a second."""
    import subprocess
    import sys

    from kernel_check import without_cpu_backend

    recipe = bf16_recipe(method, parameters)
    out = tmp_path / "out"
    script = (
        "import sys\n"
        "from della_cli.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "print('torch' in sys.modules, 'numba' in sys.modules, 'pydantic' in sys.modules)\n"
    )
    command = [sys.executable, "-c", script, "merge", str(recipe), str(out), "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False True False"
    without_cpu_backend(monkeypatch)  # the torch backend, the reference
    run_merge(recipe, tmp_path / "torch", MergeOptions(device="cpu"))
    written = (out / "model.safetensors").read_bytes()
    assert written == (tmp_path / "torch" / "model.safetensors").read_bytes()
