"""Issue #19, writing: ``out_dtype: fp8`` writes merged weights in the base's FP8 format,
quantized as the format's reference quantizers do, block by block as rows stream; each
weight's scales in its shard; config.json saying so."""

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
from della_cli.quant.requantize import quantize_blocks, quantize_channels
from della_cli.tiny import make_base, make_expert, random_delta


def test_a_block_quantizes_by_hand():
    # one 2x3 block (the block is 4x4, ragged): amax 2 gives scale 448/2 = 224; 1.0 -> 224
    # exactly; 0.3 -> 67.2, between e4m3's 64 and 72, rounds to 64; -2 -> -448
    values = np.array([[1.0, 0.3, -2.0], [0.0, 0.5, 0.01]], np.float32)
    quantized, inverse = quantize_blocks(values, (4, 4))
    assert inverse.shape == (1, 1) and inverse[0, 0] == np.float32(1) / np.float32(224)
    expected = [[224.0, 64.0, -448.0], [0.0, 112.0, 2.25]]  # 2.24 -> 2.25 (step 0.125)
    np.testing.assert_array_equal(quantized.astype(np.float32), expected)
    zeros, inverse = quantize_blocks(np.zeros((2, 2), np.float32), (4, 4))
    assert inverse[0, 0] == 1 and not zeros.astype(np.float32).any()  # an all-zero block


def test_channels_quantize_by_hand():
    values = np.array([[0.5, -1.0], [8.96, 0.0]], np.float32)
    quantized, scales = quantize_channels(values, "BF16")
    assert scales.dtype == ml_dtypes.bfloat16 and scales.shape == (2, 1)
    expected = np.array([[1 / 448], [8.96 / 448]], np.float32).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(scales, expected)
    back = quantized.astype(np.float32) * scales.astype(np.float32)
    np.testing.assert_allclose(back, values, rtol=2**-4)


def test_a_ragged_200x300_weight_round_trips_within_half_an_fp8_step():
    weight = np.random.default_rng(0).standard_normal((200, 300)).astype(np.float32)
    quantized, inverse = quantize_blocks(weight, (128, 128))
    assert inverse.shape == (2, 3)
    scale = np.repeat(np.repeat(inverse, 128, 0), 128, 1)[:200, :300]
    back = quantized.astype(np.float32) * scale
    scaled = np.abs(weight) / scale
    step = np.exp2(np.maximum(np.floor(np.log2(scaled)) - 3, -9))
    assert (np.abs(back - weight) <= scale * step / 2 * (1 + 1e-6)).all()
    # the fixtures' quantizer (DeepSeek's division by amax / 448) writes the same bytes here
    from quant_fixtures import fp8_blocks

    theirs, their_scales = fp8_blocks(torch.from_numpy(weight[:128, :256]), (128, 128))
    ours, our_scales = quantize_blocks(weight[:128, :256], (128, 128))
    np.testing.assert_array_equal(ours.view(np.uint8), theirs.view(torch.uint8).numpy())
    np.testing.assert_allclose(our_scales, their_scales.numpy(), rtol=1e-6)


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fp8")
    plain = make_base(root / "plain", "llama", dtype=torch.bfloat16)
    quantize(plain, root / "base", "fp8", block=(16, 16))
    dequantized_twin(root / "base", root / "twin")
    quantize(plain, root / "base-ct", "compressed")
    dequantized_twin(root / "base-ct", root / "twin-ct")
    for index in (1, 2):
        make_expert(plain, root / f"e{index}", random_delta(index))
    return root


def merge(root: Path, base: str, out: str, out_dtype: str, *options: str, method="task_arithmetic"):
    recipe = root / f"{out}.yaml"
    density = ", density: 0.6" if method == "della" else ""
    recipe.write_text(
        f"merge_method: {method}\nbase_model: {root / base}\nout_dtype: {out_dtype}\n"
        f"models:\n  - model: {root / 'e1'}\n    parameters: {{weight: 0.5{density}}}\n"
        f"  - model: {root / 'e2'}\n    parameters: {{weight: 0.5{density}}}\nseed: 3\n"
    )
    return CliRunner().invoke(app, ["merge", str(recipe), str(root / out), *options])


def test_an_fp8_output_is_the_float32_merge_within_half_an_fp8_step(fp8_models):
    result = merge(fp8_models, "base", "fp8-out", "fp8", "--out-shard-size", "9kB")
    assert result.exit_code == 0, (result.output, result.exception)
    exact = merge(fp8_models, "twin", "f32-out", "float32")
    assert exact.exit_code == 0, exact.output
    out = fp8_models / "fp8-out"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [16, 16]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    scaled = [name for name in index if name.endswith("_scale_inv")]
    assert len(scaled) == 14 and len(set(index.values())) > 2  # several shards
    for scale in scaled:  # each weight in its scales' shard
        assert index[scale.removesuffix("_scale_inv")] == index[scale]
        with safe_open(out / index[scale], "pt") as handle:
            assert handle.get_slice(scale.removesuffix("_scale_inv")).get_dtype() == "F8_E4M3"

    read = dequantizing(ModelReader(out, "out"))
    expected = read_tensors(fp8_models / "f32-out")
    assert sorted(read.tensors) == sorted(expected)
    for name, values in expected.items():
        got = read.read(name)
        if name + "_scale_inv" not in index:  # not quantized: written in its own bf16
            np.testing.assert_array_equal(got, values.astype(ml_dtypes.bfloat16).astype(np.float32))
            continue
        inverse = read.raw.read(name + "_scale_inv")
        scale = np.repeat(np.repeat(inverse, 16, 0), 16, 1)[: values.shape[0], : values.shape[1]]
        magnitude = np.maximum(np.abs(values) / scale, 2.0**-9)  # e4m3's subnormal step
        step = np.exp2(np.maximum(np.floor(np.log2(magnitude)) - 3, -9))
        assert (np.abs(got - values) <= scale * step / 2 * (1 + 1e-5) + 1e-12).all(), name


@pytest.mark.parametrize("out_dtype", ["fp8", "bfloat16"])
@pytest.mark.parametrize("method", ["task_arithmetic", "della"])
def test_blocks_of_rows_that_cut_through_fp8_blocks_write_the_same_bytes(
    fp8_models, monkeypatch, method, out_dtype
):
    # rows are read and arrive a few at a time (6 rows of 32, 3 of 64), in recycled buffers:
    # read across the 16-row bands of scales, and held until a band is complete to write
    run = f"{method}-{out_dtype}"
    first = merge(fp8_models, "base", f"{run}-whole", out_dtype, method=method)
    assert first.exit_code == 0, first.output
    monkeypatch.setattr("della_cli.engine.shared.CPU_BLOCK_ELEMENTS", 200)
    second = merge(fp8_models, "base", f"{run}-blocks", out_dtype, method=method)
    assert second.exit_code == 0, second.output
    whole, blocks = (fp8_models / f"{run}-{k}" / "model.safetensors" for k in ("whole", "blocks"))
    assert blocks.read_bytes() == whole.read_bytes()


def test_a_compressed_tensors_output_keeps_its_per_channel_scales(fp8_models):
    assert merge(fp8_models, "base-ct", "ct-out", "fp8").exit_code == 0
    assert merge(fp8_models, "twin-ct", "ct-f32", "float32").exit_code == 0
    out = fp8_models / "ct-out"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "float-quantized"
    with safe_open(out / "model.safetensors", "pt") as handle:
        names = handle.keys()
        scales = [n for n in names if n.endswith(".weight_scale")]
        assert len(scales) == 14
        for name in scales:
            weight = handle.get_slice(name.removesuffix("_scale"))
            assert weight.get_dtype() == "F8_E4M3"
            assert handle.get_slice(name).get_dtype() == "BF16"  # as the base stores them
            assert handle.get_slice(name).get_shape() == [weight.get_shape()[0], 1]
    read = dequantizing(ModelReader(out, "out"))
    for name, values in read_tensors(fp8_models / "ct-f32").items():
        if name + "_scale" not in read.raw.tensors:
            continue
        scale = read.raw.read(name + "_scale").astype(np.float32)
        # a bfloat16 scale can put a row's largest value a little past 448: clamped there
        bound = np.maximum(np.abs(values), scale) * 2.0**-4 + scale * 2.0**-9
        assert (np.abs(read.read(name) - values) <= bound).all(), name


def test_a_killed_fp8_merge_resumes_to_the_same_bytes(fp8_models, monkeypatch):
    from killed_merges import kill_after

    from della_cli.api import MergeOptions, run_merge

    whole = merge(fp8_models, "base", "whole", "fp8", "--out-shard-size", "9kB")
    assert whole.exit_code == 0, whole.output
    recipe, out = fp8_models / "whole.yaml", fp8_models / "resumed"
    options = MergeOptions(out_shard_bytes=9000, device="cpu")
    kill_after(12, recipe, out, options, monkeypatch)  # after several shards, some FP8
    partial = next(fp8_models.glob(".resumed*"))
    kept = sorted(p.name for p in partial.glob("model-*.safetensors"))
    run_merge(recipe, out, MergeOptions(out_shard_bytes=9000, device="cpu", resume=True))
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > len(kept) > 0
    for shard in shards:
        assert shard.read_bytes() == (fp8_models / "whole" / shard.name).read_bytes(), shard


@pytest.mark.parametrize(
    ("base", "named"),
    [("e1", "is not quantized"), ("twin", "is not quantized")],
)
def test_fp8_output_needs_an_fp8_base(fp8_models, base, named):
    result = merge(fp8_models, base, f"refused-{base}", "fp8")
    assert result.exit_code == 2
    head, line = result.stderr.strip().splitlines()  # the plan's problem list, of one
    assert head.endswith("(1 problem):"), head
    assert "out_dtype fp8 writes the base's own FP8 format" in line and named in line, line
    assert not (fp8_models / f"refused-{base}").exists()


def test_an_fp8_output_made_in_parts_has_the_bytes_of_one_machine(fp8_models):
    """Parts write their shards through the same requantizing writer as a merge alone, and
    assembly writes the same quantization_config."""
    from parts_models import files_of

    whole = merge(fp8_models, "base", "fp8-whole", "fp8", "--out-shard-size", "9kB")
    assert whole.exit_code == 0, (whole.output, whole.exception)
    recipe, out = fp8_models / "fp8-whole.yaml", fp8_models / "fp8-parts"
    runner = CliRunner()
    for number in (2, 1, 3):
        args = ["merge", str(recipe), str(out), "--part", f"{number}/3", "--out-shard-size", "9kB"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (result.output, result.exception)
    args = ["merge", str(recipe), str(out), "--assemble", "--out-shard-size", "9kB"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    ours, theirs = files_of(out), files_of(fp8_models / "fp8-whole")
    assert ours.pop("README.md") != b"" and theirs.pop("README.md") != b""  # titled by folder
    assert ours == theirs
    assert sum(name.endswith(".safetensors") for name in ours) >= 3  # several shards, 3 parts
