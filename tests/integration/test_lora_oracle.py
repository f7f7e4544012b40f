"""``model+adapter`` experts against mergekit 0.1.5 (tests/oracle.py), with adapters made by
peft itself (``get_peft_model`` + ``save_pretrained``, in mergekit's environment, which has
peft): mergekit merges each adapter (DoRA's included) into its model with peft's
``merge_and_unload`` and then merges; della applies the adapter tensor by tensor. The outputs
must agree within float32 rounding, and della's must load in transformers and run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from oracle import assert_same_model

from della_cli.api import MergeOptions, run_merge

pytestmark = pytest.mark.oracle

# Run by mergekit's interpreter: one adapter per (model folder, adapter folder, settings), its
# factors drawn from a seeded generator so that B is not peft's zero initialisation.
MAKE_ADAPTERS = """
import json, sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
for model, folder, settings in json.loads(sys.argv[1]):
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model), LoraConfig(**settings))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, tensor in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(folder)
"""
# Every feature at once on the Llama: per-module ranks and alphas, an embedding LoRA (its
# base layer saved whole), lm_head saved whole (modules_to_save); rsLoRA and the transposed
# Conv1D weights of GPT-2.
LLAMA_LORA = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "modules_to_save": ["lm_head"],
    "rank_pattern": {"v_proj": 2},
    "alpha_pattern": {"down_proj": 3},
}
GPT2_LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"], "use_rslora": True}
GPT2_LORA["fan_in_fan_out"] = True
# DoRA: the seeded noise also moves each magnitude away from its initial row norm, so that a
# merge that skipped the rescaling, or normed the wrong axis, would differ.
LLAMA_DORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj", "up_proj"]}
LLAMA_DORA["use_dora"] = True


@pytest.fixture(scope="module")
def cases(mergekit, model_zoo, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lora-oracle")
    llama, gpt2 = model_zoo("llama"), model_zoo("gpt2")
    adapters = [
        (str(llama), str(folder / "llama-lora"), LLAMA_LORA),
        (str(gpt2), str(folder / "gpt2-lora"), GPT2_LORA),
        (str(llama), str(folder / "llama-dora"), LLAMA_DORA),
    ]
    command = [str(mergekit.python), "-c", MAKE_ADAPTERS, json.dumps(adapters)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    expert = str(model_zoo("llama", expert=2))
    recipes = {
        "ties": {
            "merge_method": "ties",
            "base_model": str(llama),
            "models": [
                {"model": f"{llama}+{folder / 'llama-lora'}", "parameters": {"weight": 0.7}},
                {"model": expert, "parameters": {"weight": 0.4}},
            ],
            "parameters": {"density": 0.6},
        },
        "linear-gpt2": {
            "merge_method": "linear",
            "models": [
                {"model": f"{gpt2}+{folder / 'gpt2-lora'}", "parameters": {"weight": 0.5}},
                {"model": str(model_zoo("gpt2", expert=1)), "parameters": {"weight": 0.5}},
            ],
        },
        "dora-task-arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": str(llama),
            "models": [
                {"model": f"{llama}+{folder / 'llama-dora'}", "parameters": {"weight": 0.8}},
                {"model": expert, "parameters": {"weight": 0.5}},
            ],
        },
    }
    paths = {}
    for name, recipe in recipes.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(recipe))
    return paths


@pytest.fixture(scope="module")
def mergekit_outputs(mergekit, cases, tmp_path_factory) -> dict[str, Path]:
    return mergekit.merge_many(cases, tmp_path_factory.mktemp("lora-mergekit"))


@pytest.mark.parametrize("case", ["ties", "linear-gpt2", "dora-task-arithmetic"])
def test_lora_expert_matches_mergekit_and_runs(case, cases, mergekit_outputs, tmp_path):
    ours = tmp_path / "della-out"
    run_merge(cases[case], ours, MergeOptions(device="cpu", progress=False))
    assert_same_model(ours, mergekit_outputs[case], 1e-6)

    from transformers import AutoModelForCausalLM

    logits = AutoModelForCausalLM.from_pretrained(ours)(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 96) and torch.isfinite(logits).all()
