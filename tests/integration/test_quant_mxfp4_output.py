"""Issue #19, writing MXFP4: a gpt-oss base in MXFP4 merged with bfloat16 fine-tunes and
written back in its own format (``out_dtype: mxfp4``): each expert element within half an
MXFP4 step of the float32 merge, every other tensor as a bfloat16 merge writes it, the base's
quantization_config, transformers reloading and running it, the same bytes made in parts."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from quant_fixtures import dequantized_twin, quantize, read_tensors
from safetensors import safe_open
from typer.testing import CliRunner

from della_cli.cli import app
from della_cli.io.reader import ModelReader
from della_cli.quant import dequantizing
from della_cli.tiny import make_expert, random_delta, save_tokenizer

EXPERTS = ("gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> Path:
    """A tiny gpt-oss in bfloat16, its MXFP4 copy (the base), that copy's float32 twin and
    two bfloat16 fine-tunes."""
    import transformers

    root = tmp_path_factory.mktemp("gpt-oss")
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
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(root / "plain")
    save_tokenizer(root / "plain")
    quantize(root / "plain", root / "base", "mxfp4")
    dequantized_twin(root / "base", root / "twin")
    for index in (1, 2):
        make_expert(root / "plain", root / f"e{index}", random_delta(index))
    return root


def merge(root: Path, base: str, out: str, out_dtype: str, *options: str):
    recipe = root / f"{out}.yaml"
    recipe.write_text(
        f"merge_method: della\nbase_model: {root / base}\nout_dtype: {out_dtype}\nseed: 5\n"
        f"models:\n  - model: {root / 'e1'}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
        f"  - model: {root / 'e2'}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
    )
    return CliRunner().invoke(app, ["merge", str(recipe), str(root / out), *options])


def test_an_mxfp4_output_is_the_float32_merge_within_half_a_step_and_loads(gpt_oss):
    import transformers

    result = merge(gpt_oss, "base", "mxfp4-out", "mxfp4")
    assert result.exit_code == 0, (result.output, result.exception)
    assert merge(gpt_oss, "twin", "f32-out", "float32").exit_code == 0
    out = gpt_oss / "mxfp4-out"
    base_config = json.loads((gpt_oss / "base" / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == base_config["quantization_config"]
    base = gpt_oss / "base" / "model.safetensors"
    with safe_open(out / "model.safetensors", "pt") as written, safe_open(base, "pt") as theirs:
        assert sorted(written.keys()) == sorted(theirs.keys())  # blocks and scales, by name
        for name in theirs.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            ours, stored = written.get_slice(name), theirs.get_slice(name)
            assert ours.get_dtype() == stored.get_dtype(), name
            assert ours.get_shape() == stored.get_shape(), name

    read = dequantizing(ModelReader(out, "out"))
    expected = read_tensors(gpt_oss / "f32-out")
    assert sorted(read.tensors) == sorted(expected)
    packed = 0
    for name, values in expected.items():
        got = read.read(name)
        if not name.endswith(EXPERTS):  # not quantized: written in its own bf16
            np.testing.assert_array_equal(got, values.astype(ml_dtypes.bfloat16).astype(np.float32))
            continue
        packed += 1
        scales = read.raw.read(name + "_scales").astype(np.float64)  # (experts, rows, groups)
        scale = np.repeat(np.exp2(scales - 127).transpose(0, 2, 1), 32, axis=1)
        scaled = np.abs(values) / scale
        assert scaled.max() <= 6, name
        gap = np.where(scaled < 2, 0.5, np.where(scaled < 4, 1.0, 2.0))
        assert (np.abs(got - values) <= gap / 2 * scale).all(), name
    assert packed == 4

    # transformers reads the MXFP4 experts and dequantizes them (on the CPU, with no kernels)
    dequantize = transformers.Mxfp4Config(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, quantization_config=dequantize)
    experts = model.model.layers[1].mlp.experts
    name = "model.layers.1.mlp.experts.down_proj"
    np.testing.assert_array_equal(experts.down_proj.detach().float().numpy(), read.read(name))
    logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()


def test_an_mxfp4_output_made_in_parts_or_in_small_blocks_has_the_same_bytes(gpt_oss, monkeypatch):
    from parts_models import files_of

    whole = merge(gpt_oss, "base", "whole", "mxfp4", "--out-shard-size", "20kB")
    assert whole.exit_code == 0, (whole.output, whole.exception)
    assert len(list((gpt_oss / "whole").glob("*.safetensors"))) >= 3
    index = json.loads((gpt_oss / "whole" / "model.safetensors.index.json").read_text())
    shard_of = index["weight_map"]
    packed = [name for name in shard_of if name.endswith("_blocks")]
    assert len(packed) == 4  # each with its scales, in one shard
    assert all(shard_of[name] == shard_of[name.replace("_blocks", "_scales")] for name in packed)
    recipe, out = gpt_oss / "whole.yaml", gpt_oss / "parts"
    runner = CliRunner()
    for number in (2, 1):
        args = ["merge", str(recipe), str(out), "--part", f"{number}/2", "--out-shard-size", "20kB"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (result.output, result.exception)
    args = ["merge", str(recipe), str(out), "--assemble", "--out-shard-size", "20kB"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    ours, theirs = files_of(out), files_of(gpt_oss / "whole")
    assert ours.pop("README.md") != b"" and theirs.pop("README.md") != b""  # titled by folder
    assert ours == theirs

    monkeypatch.setattr("della_cli.engine.shared.CPU_BLOCK_ELEMENTS", 200)
    small = merge(gpt_oss, "base", "small", "mxfp4", "--out-shard-size", "20kB")
    assert small.exit_code == 0, small.output
    blocks = files_of(gpt_oss / "small")
    assert blocks.pop("README.md") != b""
    assert blocks == theirs


def test_a_killed_mxfp4_merge_resumes_to_the_same_bytes(gpt_oss, monkeypatch):
    from killed_merges import kill_after

    from della_cli.api import MergeOptions, run_merge

    whole = merge(gpt_oss, "base", "to-kill", "mxfp4", "--out-shard-size", "9kB")
    assert whole.exit_code == 0, whole.output
    recipe, out = gpt_oss / "to-kill.yaml", gpt_oss / "resumed"
    options = MergeOptions(out_shard_bytes=9_000, device="cpu")
    kill_after(30, recipe, out, options, monkeypatch)  # 4 of 6 shards kept, MXFP4 in the 4th
    partial = next(gpt_oss.glob(".resumed*"))
    kept = sorted(p.name for p in partial.glob("model-*.safetensors"))
    run_merge(recipe, out, MergeOptions(out_shard_bytes=9_000, device="cpu", resume=True))
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > len(kept) > 0
    for shard in shards:
        assert shard.read_bytes() == (gpt_oss / "to-kill" / shard.name).read_bytes(), shard


@pytest.mark.parametrize(
    ("base", "out_dtype", "named"),
    [
        ("twin", "mxfp4", "/twin' is not quantized"),
        ("e1", "mxfp4", "/e1' is not quantized"),
        ("base", "fp8", "/base' is mxfp4"),
    ],
)
def test_a_quantized_output_needs_a_base_in_that_format(gpt_oss, base, out_dtype, named):
    result = merge(gpt_oss, base, f"refused-{out_dtype}-{base}", out_dtype)
    assert result.exit_code == 2
    head, line = result.stderr.strip().splitlines()
    assert head.endswith("(1 problem):"), head
    wanted = f"out_dtype {out_dtype} writes the base's own {out_dtype.upper()} format"
    assert wanted in line and named in line, line
    assert not (gpt_oss / f"refused-{out_dtype}-{base}").exists()


def test_a_nan_in_a_merged_expert_stops_an_mxfp4_merge_naming_it(gpt_oss):
    from quant_fixtures import copy_metadata
    from safetensors.torch import load_file, save_file

    name = "model.layers.0.mlp.experts.gate_up_proj"
    tensors = load_file(gpt_oss / "e1" / "model.safetensors")
    tensors[name][2, 5, 7] = float("nan")
    copy_metadata(gpt_oss / "e1", gpt_oss / "e-nan", None)
    save_file(tensors, gpt_oss / "e-nan" / "model.safetensors", metadata={"format": "pt"})
    recipe = gpt_oss / "nan.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {gpt_oss / 'base'}\nout_dtype: mxfp4\n"
        f"models:\n  - model: {gpt_oss / 'e-nan'}\n    parameters: {{weight: 1.0}}\n"
    )
    result = CliRunner().invoke(app, ["merge", str(recipe), str(gpt_oss / "nan-out")])
    assert result.exit_code == 2, (result.output, result.exception)
    line = result.stderr.strip().splitlines()[-1]
    assert f"merged tensor '{name}' holds NaN or infinity, which MXFP4 cannot store" in line
    assert not (gpt_oss / "nan-out").exists() and not list(gpt_oss.glob(".nan-out*"))
