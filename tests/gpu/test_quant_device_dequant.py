"""Issue #19 on a CUDA device (skipped without one): quantized rows dequantized on the device
by the torch rules give the CPU's numpy bits, a CUDA plan sends them there as stored, and an
MXFP4 gpt-oss merge on CUDA (written in bfloat16 and back in MXFP4) gives the CPU's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from quant_fixtures import quantize
from safetensors.torch import save_file

from della_cli.api import MergeOptions, prepare, run_merge
from della_cli.io.reader import ModelReader
from della_cli.quant import dequantizing
from della_cli.tiny import make_expert, random_delta, save_tokenizer

pytestmark = pytest.mark.gpu
E = "model.layers.0.mlp.experts.down_proj"
W = "model.layers.0.mlp.down_proj.weight"


def reader_of(path: Path, tensors: dict, quantization: dict):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    config = {"model_type": "toy", "quantization_config": quantization}
    (path / "config.json").write_text(json.dumps(config))
    return dequantizing(ModelReader(path, path.name))


def test_the_torch_rules_on_cuda_give_the_cpu_bits(tmp_path):
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (200, 300), generator=generator, dtype=torch.uint8)
    fp8 = reader_of(
        tmp_path / "fp8",
        {W: raw.view(torch.float8_e4m3fn), W + "_scale_inv": torch.rand(2, 3) + 1e-3},
        {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
    )
    blocks = torch.randint(0, 256, (4, 7, 3, 16), generator=generator, dtype=torch.uint8)
    exponents = torch.randint(0, 255, (4, 7, 3), generator=generator, dtype=torch.uint8)
    mxfp4 = reader_of(
        tmp_path / "mxfp4",
        {E + "_blocks": blocks, E + "_scales": exponents},
        {"quant_method": "mxfp4"},
    )
    for reader, name, (start, stop) in (
        (fp8, W, (100, 150)),
        (fp8, W, (0, 200)),
        (mxfp4, E, (1, 4)),
    ):
        on_cuda = reader.stored_rows(name, start, stop).on_device("cuda")
        assert on_cuda.device.type == "cuda"
        ours = on_cuda.cpu().numpy().view(np.uint32)
        np.testing.assert_array_equal(ours, reader.read_rows(name, start, stop).view(np.uint32))


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> Path:
    import transformers

    root = tmp_path_factory.mktemp("gpt-oss-cuda")
    torch.manual_seed(0)
    config = transformers.GptOssConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(root / "plain")
    save_tokenizer(root / "plain")
    quantize(root / "plain", root / "base", "mxfp4")
    for index in (1, 2):
        make_expert(root / "plain", root / f"e{index}", random_delta(index))
    return root


@pytest.mark.parametrize("out_dtype", ["bfloat16", "mxfp4"])
def test_an_mxfp4_merge_on_cuda_gives_the_cpu_bytes(gpt_oss, out_dtype):
    recipe = gpt_oss / f"{out_dtype}.yaml"
    recipe.write_text(
        f"merge_method: della\nbase_model: {gpt_oss / 'base'}\nout_dtype: {out_dtype}\nseed: 5\n"
        f"models:\n  - model: {gpt_oss / 'e1'}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
        f"  - model: {gpt_oss / 'e2'}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
    )
    _, _, plan = prepare(recipe, MergeOptions(device="cuda"))
    assert any(job.reference.on_device for job in plan.jobs)  # the experts go as stored
    outputs = {}
    for device in ("cpu", "cuda"):
        out = gpt_oss / f"{out_dtype}-{device}"
        run_merge(recipe, out, MergeOptions(device=device))
        outputs[device] = (out / "model.safetensors").read_bytes()
    assert outputs["cuda"] == outputs["cpu"]
