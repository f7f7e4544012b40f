"""A tokenizer the merge builds (union, ``tokens:``, ``pad_to_multiple_of``): the output's
tokenizer, vocabulary rows and ``vocab_size`` agree, and each row is what mergekit's rules give,
checked in closed form on task arithmetic (where a token only one model has keeps that model's
row exactly)."""

from __future__ import annotations

import json

import pytest
import torch
from vocabularies import VOCAB_TENSORS, load_model, with_added_tokens, with_vocabulary

from della_cli.api import MergeOptions, run_merge
from della_cli.errors import PlanError
from della_cli.preflight import plan_merge
from della_cli.verify import verify_model

CHATML = (("<|im_start|>", True), ("<|im_end|>", True), ("hello", False))


@pytest.fixture(scope="module")
def models(model_zoo, tmp_path_factory):
    """The base (96 tokens); 'chat': expert 1 adding two special tokens and a word (99 rows);
    'grown': expert 2 with two more ordinary words (98 rows)."""
    folder = tmp_path_factory.mktemp("union")
    chat = with_added_tokens(model_zoo("llama", expert=1), folder / "chat", CHATML)
    grown = with_vocabulary(model_zoo("llama", expert=2), folder / "grown", 98)
    return model_zoo("llama"), chat, grown


def merge(write_recipe, tmp_path, models, tokenizer, method="task_arithmetic", name="out"):
    base, chat, grown = models
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(chat), "parameters": {"weight": 1.0}},
            {"model": str(grown), "parameters": {"weight": 0.5}},
        ],
        "tokenizer": tokenizer,
    }
    out = tmp_path / name
    report = run_merge(write_recipe(recipe, f"{name}.yaml"), out, MergeOptions(device="cpu"))
    return out, report


def test_union_gives_each_new_token_its_models_row(models, write_recipe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = merge(
        write_recipe, tmp_path, models, {"source": "union", "pad_to_multiple_of": 8}
    )
    b, c, g, merged = (load_model(folder) for folder in (*models, out))
    # Ordinary words of the other models first (grown's w92, w93), then added tokens.
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 101
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("w92", "w93")] == [96, 97]
    assert [tokenizer.convert_tokens_to_ids(t) for t, _ in CHATML] == [98, 99, 100]
    assert tokenizer("<|im_start|> w92 hello w1")["input_ids"] == [98, 96, 100, 5]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 104
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert decoder["98"]["content"] == "<|im_start|>" and decoder["98"]["special"]
    for name in VOCAB_TENSORS:
        assert merged[name].shape == (104, 32)
        shared = b[name].double() + (c[name][:96] - b[name]) + 0.5 * (g[name][:96] - b[name])
        assert (merged[name][:96] - shared).abs().max() <= 1e-6, name
        assert torch.equal(merged[name][96:98], g[name][96:98]), name  # only grown has them
        assert torch.equal(merged[name][98:101], c[name][96:99]), name  # only chat has them
        # Padding: each input's mean aligned row (the rows it lacks are the donors').
        aligned = {
            "base": torch.cat([b[name], g[name][96:98], c[name][96:99]]),
            "chat": torch.cat([c[name][:96], g[name][96:98], c[name][96:99]]),
            "grown": torch.cat([g[name], c[name][96:99]]),
        }
        means = {key: rows.double().mean(0) for key, rows in aligned.items()}
        padding = (
            means["base"] + (means["chat"] - means["base"]) + 0.5 * (means["grown"] - means["base"])
        )
        assert (merged[name][101:] - padding).abs().max() <= 1e-6, name
    summary = [w for w in report.warnings if w.startswith("tokenizer: a union")]
    assert summary == [
        f"tokenizer: a union of '{models[0]}' (96 tokens) and 2 from '{models[2]}', 3 from "
        f"'{models[1]}'; vocab_size 101, padded to 104 (new tokens take ids in recipe order of "
        "the models, each model's by id)"
    ]
    assert verify_model(out).healthy
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[98, 96, 100]])).logits
    assert logits.shape == (1, 3, 104) and torch.isfinite(logits).all()


def test_tokens_settings_give_the_rows_they_name(models, write_recipe, tmp_path):
    """Unforced zero: the models that lack the token get zero rows, which task arithmetic mixes
    with the own row of the one that has it; forced: every input takes the source's row."""
    tokens = {
        "<|im_start|>": {"source": {"kind": "zero"}},
        "<|im_end|>": {"source": {"kind": "model_token", "model": str(models[0]), "token_id": 2}},
        "w5": {"source": str(models[1]), "force": True},
        "<new>": {},
    }
    out, _ = merge(write_recipe, tmp_path, models, {"tokens": tokens})
    b, c, _, merged = (load_model(folder) for folder in (*models, out))
    for name in VOCAB_TENSORS:
        assert merged[name].shape[0] == 102  # the union and <new>
        # zero for base and grown: 0 + 1.0 (chat - 0) + 0.5 (0 - 0)
        assert torch.equal(merged[name][98], c[name][96]), name
        # base and grown take the base's </s> row: chat's own row is mixed in
        expected = b[name][2].double() + (c[name][97] - b[name][2])
        assert (merged[name][99] - expected).abs().max() <= 1e-6, name
        assert torch.equal(merged[name][9], c[name][9]), name  # forced for all: chat's w5
        assert not merged[name][101].any(), name  # no model has <new>: zero
    assert len(__import__("transformers").AutoTokenizer.from_pretrained(out)) == 102


def test_a_base_source_with_tokens_keeps_the_base_vocabulary(models, write_recipe, tmp_path):
    tokenizer = {
        "source": "base",
        "tokens": {"<|im_start|>": {"source": str(models[1])}},
        "pad_to_multiple_of": 64,
    }
    out, _ = merge(write_recipe, tmp_path, models, tokenizer)
    b, c, g, merged = (load_model(folder) for folder in (*models, out))
    for name in VOCAB_TENSORS:
        assert merged[name].shape[0] == 128
        assert torch.equal(merged[name][96], c[name][96]), name  # grown's extra words dropped
        means = [rows[:96].double().mean(0) for rows in (b[name], c[name], g[name])]
        means = [(mean * 96 + c[name][96]) / 97 for mean in means]  # with <|im_start|>'s row
        padding = means[0] + (means[1] - means[0]) + 0.5 * (means[2] - means[0])
        assert (merged[name][97:] - padding).abs().max() <= 1e-6, name
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            {"kind": "model_token", "model": "CHAT", "token": "<nope>"},
            "tokenizer.tokens.<|im_start|>.source.token: 'CHAT' has no token '<nope>'",
        ),
        (
            {"kind": "model_token", "model": "CHAT", "token_id": 99},
            "tokenizer.tokens.<|im_start|>.source.token_id: 99 is out of range for 'CHAT'",
        ),
        ("GROWN", "tokenizer.tokens.<|im_start|>.source: 'GROWN' has no token '<|im_start|>'"),
    ],
)
def test_a_bad_tokens_entry_is_a_plan_error_naming_it(
    models, write_recipe, tmp_path, source, message
):
    names = {"CHAT": str(models[1]), "GROWN": str(models[2])}
    if isinstance(source, dict):
        source = {**source, "model": names[source["model"]]}
    else:
        source = names[source]
    for key, value in names.items():
        message = message.replace(key, value)
    tokens = {"<|im_start|>": {"source": source, "force": True}}
    with pytest.raises(PlanError) as caught:
        merge(write_recipe, tmp_path, models, {"source": "union", "tokens": tokens})
    assert f"  - {message}" in str(caught.value), str(caught.value)
    assert not (tmp_path / "out").exists()


def test_the_plan_names_the_new_tokens(models, write_recipe, tmp_path):
    _, chat, grown = models
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(chat)}, {"model": str(grown)}],
        "tokenizer_source": "union",
    }
    report = plan_merge(write_recipe(recipe), None, MergeOptions(device="cpu", progress=False))
    assert report.can_run, report.problems
    summary = [w for w in report.warnings if w.startswith("tokenizer:")]
    assert summary == [
        f"tokenizer: a union of '{chat}' (99 tokens) and 2 from '{grown}'; vocab_size 101 "
        "(new tokens take ids in recipe order of the models, each model's by id)"
    ]


@pytest.mark.parametrize("method", ["della", "ties"])
def test_rows_built_block_by_block_equal_the_whole_tensors(models, write_recipe, method):
    """The re-indexed rows, their defaults and the padding mean's pass, gathered a few rows at a
    time, give the bytes of one block holding the whole tensor (the sparsified methods too)."""
    from della_cli.api import prepare
    from della_cli.engine import MergeEngine

    base, chat, grown = models
    recipe_path = write_recipe(
        {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(chat)}, {"model": str(grown), "parameters": {"weight": 0.5}}],
            "parameters": {"density": 0.6, "epsilon": 0.1}
            if method == "della"
            else {"density": 0.6},
            "tokenizer": {
                "tokens": {"w3": {"source": str(grown), "force": True}},
                "pad_to_multiple_of": 16,
            },
            "seed": 3,
        },
        f"{method}-blocks.yaml",
    )
    recipe, inputs, plan = prepare(recipe_path, MergeOptions())
    whole = MergeEngine(recipe, plan, inputs, "cpu", block_elements=1 << 30)
    blocked = MergeEngine(recipe, plan, inputs, "cpu", block_elements=100)
    vocabulary = [job for job in plan.jobs if job.reference.aligned]
    assert len(vocabulary) == 2 and all(len(blocked.row_blocks(job)) > 30 for job in vocabulary)
    for job in vocabulary:
        a, b = whole.compute(job), blocked.compute(job)
        assert a.shape == (112, 32) and a.tobytes() == b.tobytes(), job.name


def test_the_torch_backend_gives_the_cpu_kernels_bytes(models, write_recipe):
    """The torch backend (the CUDA path) gets the same re-indexed rows as the CPU kernels."""
    from kernel_check import on_backend

    from della_cli.api import prepare
    from della_cli.engine import MergeEngine

    base, chat, grown = models
    recipe_path = write_recipe(
        {
            "merge_method": "della",
            "base_model": str(base),
            "models": [{"model": str(chat)}, {"model": str(grown), "parameters": {"weight": 0.5}}],
            "parameters": {"density": 0.7, "epsilon": 0.07},
            "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
            "seed": 3,
        },
        "backends.yaml",
    )
    recipe, inputs, plan = prepare(recipe_path, MergeOptions())
    engines = {
        backend: MergeEngine(recipe, on_backend(plan, recipe, inputs, backend), inputs, "cpu")
        for backend in ("cpu", "torch")
    }
    for job in engines["cpu"].plan.jobs:
        if job.reference.aligned:
            torch_job = next(j for j in engines["torch"].plan.jobs if j.name == job.name)
            assert job.kernel.backend == "cpu" and torch_job.kernel.backend == "torch"
            cpu, reference = engines["cpu"].compute(job), engines["torch"].compute(torch_job)
            assert cpu.tobytes() == reference.tobytes(), job.name
