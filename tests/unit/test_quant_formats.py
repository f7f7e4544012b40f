"""Issue #19: FP8 (fine-grained blocks, compressed-tensors) and MXFP4 checkpoints read as the
float32 weights they stand for, checked against blocks worked by hand and against
transformers' own dequantizers; malformed layouts and bad scales refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from quant_fixtures import fp8_blocks, fp8_dequantized, mxfp4_experts
from safetensors.torch import save_file
from typer.testing import CliRunner

from della_cli.cli import app
from della_cli.errors import ModelError
from della_cli.io.reader import ModelReader
from della_cli.quant import dequantizing
from della_cli.quant.view import DequantizedReader

W = "model.layers.0.mlp.down_proj.weight"
FINE_GRAINED = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
COMPRESSED = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}},
}
MXFP4 = {"quant_method": "mxfp4"}


def folder_of(path: Path, tensors: dict[str, torch.Tensor], quantization: dict | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    config = {"model_type": "toy"}
    if quantization is not None:
        config["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(config))
    return path


def opened(path: Path) -> ModelReader:
    return dequantizing(ModelReader(path, path.name))


def e4m3(values: np.ndarray) -> torch.Tensor:
    """Values already on the e4m3 grid, as torch float8_e4m3fn."""
    exact = values.astype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(exact.astype(np.float32), values)
    return torch.from_numpy(values.astype(np.float32)).to(torch.float8_e4m3fn)


def test_a_ragged_200x300_weight_in_128x128_blocks_reads_block_by_block(tmp_path):
    # Entry (i, j) is one of eight e4m3 values; block (r, c) scales by 2**r * 3**c / 4, so
    # each entry's expected value is worked out from its own block, with no dequantizer.
    grid_values = np.array([0.5, -1.0, 1.5, -2.0, 3.0, 0.25, -448.0, 0.0], dtype=np.float32)
    rows, columns = np.indices((200, 300))
    values = grid_values[(rows * 7 + columns * 3) % 8]
    scales = np.array([[2.0**r * 3.0**c / 4 for c in range(3)] for r in range(2)], np.float32)
    expected = values * scales[rows // 128, columns // 128]
    folder = folder_of(
        tmp_path / "m",
        {W: e4m3(values), W + "_scale_inv": torch.from_numpy(scales), "norm": torch.ones(3)},
        FINE_GRAINED,
    )
    reader = opened(folder)
    assert isinstance(reader, DequantizedReader)
    assert set(reader.tensors) == {W, "norm"}  # the scales are no weight of their own
    assert (reader.tensors[W].dtype, reader.tensors[W].shape) == ("F32", (200, 300))
    assert reader.config == {"model_type": "toy"}  # no longer quantized
    np.testing.assert_array_equal(reader.read(W), expected)
    for start, stop in [(0, 1), (100, 150), (127, 129), (128, 200), (199, 200)]:
        np.testing.assert_array_equal(reader.read_rows(W, start, stop), expected[start:stop])
    # transformers' own dequantizer agrees
    theirs = fp8_dequantized(e4m3(values), torch.from_numpy(scales), (128, 128))
    np.testing.assert_array_equal(theirs.numpy(), expected)


def test_stacked_experts_with_block_scales_read_one_expert_per_row(tmp_path):
    weight = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(0))
    values, scales = fp8_blocks(weight, (16, 16))
    assert scales.shape == (3, 3, 2)
    reader = opened(
        folder_of(
            tmp_path / "m",
            {W: values, W + "_scale_inv": scales},
            FINE_GRAINED | {"weight_block_size": [16, 16]},
        )
    )
    expected = fp8_dequantized(values, scales, (16, 16)).reshape(3, -1).numpy()
    np.testing.assert_array_equal(reader.read_rows(W, 1, 3), expected[1:3])


def test_the_deepseek_quantizer_round_trips_within_one_fp8_step(tmp_path):
    weight = torch.randn(200, 300, generator=torch.Generator().manual_seed(1))
    values, scales = fp8_blocks(weight, (128, 128))
    reader = opened(folder_of(tmp_path / "m", {W: values, W + "_scale_inv": scales}, FINE_GRAINED))
    read = reader.read(W)
    # e4m3 keeps 3 mantissa bits: round to nearest moves a value w / scale in the binade
    # [2**e, 2**(e+1)) by at most half its step 2**(e-3) (subnormals: half of 2**-9), and
    # the block's largest magnitude, which maps to 448 exactly, not at all.
    scale = np.repeat(np.repeat(scales.numpy(), 128, 0), 128, 1)[:200, :300]
    scaled = np.abs(weight.numpy()) / scale
    step = np.exp2(np.maximum(np.floor(np.log2(scaled)) - 3, -9))
    assert (np.abs(read - weight.numpy()) <= scale * step / 2 * (1 + 1e-6)).all()
    assert np.abs(read).max() == pytest.approx(np.abs(weight.numpy()).max(), rel=1e-6)


@pytest.mark.parametrize("per", ["tensor", "channel"])
def test_compressed_tensors_scales_per_tensor_and_per_channel(tmp_path, per):
    values = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.5]], dtype=np.float32)
    scale = np.array([0.5], np.float32) if per == "tensor" else np.array([[2.0], [0.125]])
    folder = folder_of(
        tmp_path / per,
        {
            W: e4m3(values),
            W + "_scale": torch.from_numpy(scale.astype(np.float32)).to(torch.bfloat16),
            W.replace("weight", "input_scale"): torch.ones(1),
        },
        COMPRESSED,
    )
    reader = opened(folder)
    assert set(reader.tensors) == {W}
    np.testing.assert_array_equal(reader.read(W), values * scale)


def test_mxfp4_experts_read_as_transformers_unpacks_them(tmp_path):
    # By hand: byte 0x21 holds codes 1 (0.5, low nibble first) and 2 (1.0); byte 0xF8 holds
    # 8 (-0.0) and 15 (-6.0); exponent 128 doubles them.
    blocks = np.zeros((1, 1, 1, 16), np.uint8)
    blocks[0, 0, 0, :2] = [0x21, 0xF8]
    scales = np.full((1, 1, 1), 128, np.uint8)
    name = "model.layers.0.mlp.experts.down_proj"
    reader = opened(
        folder_of(
            tmp_path / "hand",
            {
                name + "_blocks": torch.from_numpy(blocks),
                name + "_scales": torch.from_numpy(scales),
            },
            MXFP4,
        )
    )
    assert reader.tensors[name].shape == (1, 32, 1)
    np.testing.assert_array_equal(reader.read(name)[0, :4, 0], [1.0, 2.0, -0.0, -12.0])
    # random experts against transformers' convert_moe_packed_tensors
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    generator = torch.Generator().manual_seed(2)
    packed = torch.randint(0, 256, (3, 5, 2, 16), generator=generator, dtype=torch.uint8)
    exponents = torch.randint(117, 137, (3, 5, 2), generator=generator, dtype=torch.uint8)
    reader = opened(
        folder_of(
            tmp_path / "random",
            {name + "_blocks": packed, name + "_scales": exponents},
            MXFP4,
        )
    )
    theirs = convert_moe_packed_tensors(packed, exponents, dtype=torch.float32)
    assert reader.tensors[name].shape == tuple(theirs.shape) == (3, 64, 5)
    np.testing.assert_array_equal(reader.read(name), theirs.numpy())
    np.testing.assert_array_equal(reader.read_rows(name, 1, 2)[0], theirs[1].reshape(-1))


def test_the_mxfp4_fixture_quantizer_round_trips():
    weight = torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(3))
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = mxfp4_experts(weight)
    back = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    # FP4 has one mantissa bit: within a quarter of each group's largest magnitude
    groups = weight.transpose(1, 2).reshape(2, 3, 2, 32).abs().amax(-1)
    bound = groups.repeat_interleave(32, -1).reshape(2, 3, 64).transpose(1, 2) / 4
    assert ((back - weight).abs() <= bound + 1e-7).all()


BAD_LAYOUTS = {
    "scale of the wrong shape": (
        FINE_GRAINED | {"weight_block_size": [16, 16]},
        {W: ("fp8", (40, 24)), W + "_scale_inv": ("f32", (2, 2))},
        f"scale tensor '{W}_scale_inv' has shape (2, 2)",
    ),
    "weight without scale": (
        FINE_GRAINED,
        {W: ("fp8", (4, 4))},
        f"FP8 tensor '{W}' has no '{W}_scale_inv'",
    ),
    "scale without fp8 weight": (
        FINE_GRAINED,
        {W: ("f32", (4, 4)), W + "_scale_inv": ("f32", (1, 1))},
        f"'{W}_scale_inv' scales '{W}', which is F32",
    ),
    "block size not two integers": (
        FINE_GRAINED | {"weight_block_size": [128]},
        {W: ("fp8", (4, 4)), W + "_scale_inv": ("f32", (1, 1))},
        "weight_block_size must be two positive integers",
    ),
    "compressed-tensors int4": (
        COMPRESSED | {"format": "pack-quantized"},
        {W: ("f32", (4, 4))},
        "format 'pack-quantized' is not read",
    ),
    "mxfp4 scales of the wrong shape": (
        MXFP4,
        {"e.down_proj_blocks": ("u8", (2, 3, 1, 16)), "e.down_proj_scales": ("u8", (2, 3))},
        "'e.down_proj_scales' is U8 (2, 3); the blocks 'e.down_proj_blocks' need U8 (2, 3, 1)",
    ),
    "mxfp4 blocks not U8": (
        MXFP4,
        {"e.down_proj_blocks": ("f32", (2, 3, 1, 16)), "e.down_proj_scales": ("u8", (2, 3, 1))},
        "'e.down_proj_blocks' is F32 (2, 3, 1, 16); MXFP4 blocks are U8",
    ),
    "mxfp4 scales not U8": (
        MXFP4,
        {"e.down_proj_blocks": ("u8", (2, 3, 1, 16)), "e.down_proj_scales": ("f32", (2, 3, 1))},
        "'e.down_proj_scales' is F32 (2, 3, 1); the blocks 'e.down_proj_blocks' need U8",
    ),
}
MAKERS = {
    "fp8": lambda s: torch.zeros(s).to(torch.float8_e4m3fn),
    "f32": lambda s: torch.ones(s),
    "u8": lambda s: torch.full(s, 127, dtype=torch.uint8),
}


def model_of(path: Path, quantization: dict, layout: dict) -> Path:
    tensors = {name: MAKERS[kind](shape) for name, (kind, shape) in layout.items()}
    return folder_of(path, tensors, quantization)


def plan_of(tmp_path: Path, base: Path, expert: Path, out: Path | None = None):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {expert}\n"
    )
    command = ["plan", str(recipe)] if out is None else ["merge", str(recipe), str(out)]
    return CliRunner().invoke(app, command)


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    (line,) = result.stderr.strip().splitlines()
    assert fragment in line, line


@pytest.mark.parametrize(("config", "layout", "named"), BAD_LAYOUTS.values(), ids=BAD_LAYOUTS)
def test_a_malformed_layout_is_refused_before_anything_is_read(tmp_path, config, layout, named):
    base = model_of(tmp_path / "base", config, layout)
    expert = model_of(tmp_path / "expert", config, layout)
    one_line_error(plan_of(tmp_path, base, expert), named)


@pytest.mark.parametrize("bad", [float("nan"), 0.0, float("inf"), -1.0])
def test_a_bad_scale_fails_the_merge_naming_it_and_writes_nothing(tmp_path, bad):
    scales = torch.ones(2, 2)
    scales[1, 0] = bad
    config = FINE_GRAINED | {"weight_block_size": [16, 16]}
    base = folder_of(
        tmp_path / "base",
        {W: torch.ones(20, 24).to(torch.float8_e4m3fn), W + "_scale_inv": scales},
        config,
    )
    expert = folder_of(tmp_path / "expert", {W: torch.ones(20, 24)}, None)
    assert plan_of(tmp_path, base, expert).exit_code == 0  # values are not read by a plan
    out = tmp_path / "out"
    one_line_error(plan_of(tmp_path, base, expert, out), f"scale tensor '{W}_scale_inv' holds")
    assert not out.exists() and not any(tmp_path.glob(".out*"))


def test_a_nan_mxfp4_exponent_is_refused_naming_the_scales():
    from della_cli.quant.mxfp4 import PackedExperts, dequantize_experts

    packed = PackedExperts("x_blocks", "x_scales", (1, 32, 1))
    with pytest.raises(ModelError, match="'x_scales' holds the E8M0 NaN"):
        dequantize_experts(packed, np.zeros((1, 16), np.uint8), np.full((1, 1), 255, np.uint8), "m")


def test_a_nan_mxfp4_exponent_fails_the_merge_naming_it_and_writes_nothing(tmp_path):
    # E8M0 has no zero, infinity or negative scale: 0 is 2**-127, and 255 alone is NaN
    name = "model.layers.0.mlp.experts.down_proj"
    scales = torch.full((2, 3, 1), 127, dtype=torch.uint8)
    scales[1, 2, 0] = 255
    blocks = torch.full((2, 3, 1, 16), 0x21, dtype=torch.uint8)
    base = folder_of(tmp_path / "base", {name + "_blocks": blocks, name + "_scales": scales}, MXFP4)
    expert = folder_of(tmp_path / "expert", {name: torch.ones(2, 32, 3)}, None)
    out = tmp_path / "out"
    one_line_error(
        plan_of(tmp_path, base, expert, out),
        f"scale tensor '{name}_scales' holds the E8M0 NaN (255) at (expert, row, group) (1, 2, 0)",
    )
    assert not out.exists() and not any(tmp_path.glob(".out*"))
