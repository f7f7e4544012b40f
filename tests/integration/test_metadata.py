"""What a merged folder carries over from its base besides weights: generation config (EOS
lists included), the chat template in whichever form the base keeps it, special and added
tokens, and every config field, with only ``dtype`` following ``out_dtype``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from della_cli.api import MergeOptions, run_merge

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"


def older_style_base(source: Path, folder: Path, template_form: str) -> Path:
    """A copy of ``source`` dressed as models published with older tooling: the chat template
    inside tokenizer_config.json (or in chat_template.json, as processors keep it), a special
    tokens map, added tokens, a generation config with two EOS ids and sampling settings, and
    config fields della has no reason to know."""
    shutil.copytree(source, folder)
    (folder / "chat_template.jinja").unlink()
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    if template_form == "tokenizer_config":
        tokenizer_config["chat_template"] = TEMPLATE
    else:
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "added_tokens.json").write_text(json.dumps({}))
    generation = {
        "bos_token_id": 1,
        "eos_token_id": [2, 5],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    config = json.loads((folder / "config.json").read_text())
    config.update(
        {"eos_token_id": [2, 5], "rope_scaling": None, "della_test_field": {"kept": [1, 2]}}
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("template_form", ["tokenizer_config", "chat_template_json"])
def test_metadata_files_and_config_fields_are_carried_over(
    model_zoo, write_recipe, tmp_path, template_form
):
    from transformers import AutoTokenizer, GenerationConfig

    base = older_style_base(model_zoo("llama"), tmp_path / "base", template_form)
    expert = model_zoo("llama", expert=1)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(expert)}],
        "out_dtype": "bfloat16",
    }
    out = tmp_path / "out"
    run_merge(write_recipe(recipe), out, MergeOptions(device="cpu"))

    carried = [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    ]
    if template_form == "chat_template_json":
        carried.append("chat_template.json")
    for name in carried:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert not (out / "chat_template.jinja").exists()  # no template form the base lacks

    config, base_config = (json.loads((f / "config.json").read_text()) for f in (out, base))
    assert config.pop("dtype") == "bfloat16" and base_config.pop("dtype") == "float32"
    assert config == base_config

    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [2, 5]
    assert (generation.temperature, generation.top_p) == (0.6, 0.9)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "<pad>")
    if template_form == "chat_template_json":  # a processor's file: AutoProcessor reads it
        assert json.loads((out / "chat_template.json").read_text())["chat_template"] == TEMPLATE
        return
    assert tokenizer.chat_template == TEMPLATE
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False)
    assert rendered == "<|user|>w1</s>"
