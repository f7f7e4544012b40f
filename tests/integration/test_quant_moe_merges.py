"""Issue #19: quantized MoE bases merged with bfloat16 fine-tunes, on tiny random models of
transformers' own MoE architectures: DeepSeek-V3 (MLA attention, shared and routed experts)
in fine-grained FP8, Qwen3-MoE in compressed-tensors FP8 per channel, Llama 4 with its
stacked experts in FP8 blocks, gpt-oss with MXFP4 experts. Each merge must equal, tensor by
tensor, the merge of the base's dequantized twin (dequantized by transformers' own code), and
the output must load in transformers as an unquantized model and run."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from quant_fixtures import dequantized_twin, quantize, read_tensors
from typer.testing import CliRunner

from della_cli.cli import app
from della_cli.tiny import make_expert, random_delta, save_tokenizer

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# architecture: (config class, its own fields, the quantized format of its base)
MOE = {
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(
            intermediate_size=64,
            moe_intermediate_size=16,
            num_key_value_heads=4,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_group=2,
            topk_group=1,
        ),
        "fp8",
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            intermediate_size=32,
            moe_intermediate_size=16,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
        ),
        "compressed",
    ),
    "llama4_text": (
        "Llama4TextConfig",
        dict(
            intermediate_size=32,
            intermediate_size_mlp=64,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=1,
            head_dim=8,
            interleave_moe_layer_step=1,
            no_rope_layers=[1, 1],
        ),
        "fp8",
    ),
    "gpt_oss": (
        "GptOssConfig",
        dict(
            intermediate_size=32,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "mxfp4",
    ),
}


def tiny_moe(architecture: str, folder: Path) -> Path:
    """A random bfloat16 model of ``architecture``, saved as transformers saves it."""
    import transformers

    class_name, fields, _ = MOE[architecture]
    torch.manual_seed(0)
    config = getattr(transformers, class_name)(**COMMON, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def merged(tmp_path: Path, base: Path, experts: list[Path], out: str, extra: str = "") -> Path:
    """Task arithmetic of ``experts`` on ``base``, each with weight 1/2, into ``out``."""
    recipe = tmp_path / f"{out}.yaml"
    models = "".join(f"  - model: {e}\n    parameters: {{weight: 0.5}}\n" for e in experts)
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\n{extra}models:\n{models}"
    )
    result = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / out)])
    assert result.exit_code == 0, (result.output, result.exception)
    return tmp_path / out


@pytest.mark.parametrize("architecture", MOE)
def test_a_quantized_moe_base_merges_as_its_dequantized_twin_and_loads(tmp_path, architecture):
    import transformers

    form = MOE[architecture][2]
    plain = tiny_moe(architecture, tmp_path / "plain")
    base = quantize(plain, tmp_path / "base", form)
    twin = dequantized_twin(base, tmp_path / "twin")
    experts = [make_expert(plain, tmp_path / f"e{i}", random_delta(i)) for i in (1, 2)]
    if form == "fp8":  # experts in different formats: one fine-tune is FP8 too
        experts[1] = quantize(experts[1], tmp_path / "e2-fp8", form, block=(8, 16))
        twins = [experts[0], dequantized_twin(experts[1], tmp_path / "e2-twin")]
    else:
        twins = experts

    out = merged(tmp_path, base, experts, "out")  # bfloat16, the default for quantized bases
    twin_out = merged(tmp_path, twin, twins, "expected", "out_dtype: bfloat16\n")
    expected = read_tensors(twin_out)
    got = read_tensors(out)
    assert sorted(got) == sorted(expected)  # no scale, block or packed tensor left
    for name, values in expected.items():
        # A float32 tensor of the base (DeepSeek's e_score_correction_bias) stays float32;
        # the twin's merge wrote it in bfloat16.
        rounded = got[name].astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(rounded, values, err_msg=name)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()
