"""Issue #19, writing MXFP4: gpt-oss expert weights quantized block by block, 32 values per
E8M0 scale, with triton_kernels' rounding (the scale is the smallest power of two at or above
amax / 6; values round to the nearest E2M1 value, ties away from zero), checked against
groups worked by hand, an exhaustive rounding rule, transformers' dequantizer and the
reader's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from quant_fixtures import mxfp4_experts

from della_cli.errors import ModelError
from della_cli.quant.mxfp4 import (
    FP4_VALUES,
    PackedExperts,
    dequantize_experts,
    e8m0_exponents,
    fp4_codes,
    quantize_experts,
)


def one_group(values: list[float]) -> tuple[np.ndarray, int]:
    """The 32 codes and the exponent byte of one group (a logical (1, 32, 1) tensor)."""
    row = np.zeros(32, np.float32)
    row[: len(values)] = values
    blocks, scales = quantize_experts((1, 32, 1), row.reshape(1, 32), "w")
    assert blocks.shape == (1, 16) and scales.shape == (1, 1)
    codes = np.empty(32, np.uint8)
    codes[0::2], codes[1::2] = blocks[0] & 0x0F, blocks[0] >> 4  # the low nibble first
    return codes, int(scales[0, 0])


def test_a_group_with_amax_six_keeps_scale_one_and_rounds_ties_away_from_zero():
    # amax 6 -> 6 / 6 = 1 = 2**0, exponent byte 127; every value is its own scaled value
    values = [6.0, -6.0, 0.25, 0.24, 2.5, 5.0, 4.9, -0.1, 0.75, 1.25, 1.75, 3.5, -2.5, 1.0]
    codes, exponent = one_group(values)
    assert exponent == 127
    # 0.25 -> 0.5 (a tie, away from zero); 0.24 -> 0; 2.5 -> 3; 5 -> 6; 4.9 -> 4;
    # -0.1 -> -0 (code 8, the sign kept); ties 0.75 -> 1, 1.25 -> 1.5, 1.75 -> 2, 3.5 -> 4
    expected = [6.0, -6.0, 0.5, 0.0, 3.0, 6.0, 4.0, -0.0, 1.0, 1.5, 2.0, 4.0, -3.0, 1.0]
    assert codes[7] == 8 and codes[3] == 0 and codes[1] == 15
    np.testing.assert_array_equal(FP4_VALUES[codes[: len(values)]], expected)
    assert not codes[len(values) :].any()  # padding zeros: code 0


def test_the_scale_is_the_smallest_power_of_two_that_needs_no_clamp():
    # amax exactly 6 * 2**3 keeps 2**3; a float32 step past it takes 2**4, and nothing of the
    # group is clamped (OCP's floor(log2(amax)) - 2 would give 2**3 and clamp 48.00001 to 48)
    assert one_group([48.0, 1.0])[1] == 127 + 3
    above = float(np.nextafter(np.float32(48.0), np.float32(100)))
    codes, exponent = one_group([above, 7.0])
    assert exponent == 127 + 4
    assert FP4_VALUES[codes[0]] * 16 == 48.0 and FP4_VALUES[codes[1]] * 16 == 8.0  # 7/16 -> 0.5
    # amax 7: OCP's 2**(2 - 2) = 1 would clamp 7 to 6; here 2**1, 7 / 2 = 3.5 -> 4 (a tie)
    # -0.5 / 2 = -0.25 -> -0.5 (a tie); -0.4 / 2 = -0.2 -> -0 (code 8)
    codes, exponent = one_group([7.0, -0.5, -0.4])
    assert exponent == 128 and list(FP4_VALUES[codes[:3]]) == [4.0, -0.5, -0.0] and codes[2] == 8


def test_zero_and_tiny_groups():
    codes, exponent = one_group([])  # all zero: the smallest exponent, codes 0
    assert exponent == 0 and not codes.any()
    codes, exponent = one_group([-0.0, 0.0])  # -0 keeps its sign bit, as the reference does
    assert exponent == 0 and codes[0] == 8 and codes[1] == 0
    # 2**-120: amax / 6 = 2**-122.58 rounds up to 2**-122 (byte 5); 2**-120 / 2**-122 = 4
    codes, exponent = one_group([2.0**-120, -(2.0**-123)])
    assert exponent == 5 and FP4_VALUES[codes[0]] == 4.0 and FP4_VALUES[codes[1]] == -0.5
    # float32 subnormals: amax / 6 is below 2**-126, the scale 2**-126 (byte 1), values flush
    codes, exponent = one_group([2.0**-130, 1e-40])
    assert exponent == 1 and not codes.any()


def test_every_scaled_value_rounds_to_the_nearest_e2m1_value_ties_away_from_zero():
    magnitudes = FP4_VALUES[:8].astype(np.float64)
    points = np.concatenate([magnitudes, (magnitudes[1:] + magnitudes[:-1]) / 2])
    near = [np.nextafter(np.float32(p), np.float32(s)) for p in points for s in (0, 7)]
    grid = np.linspace(0, 6, 2401, dtype=np.float32)
    values = np.concatenate([points.astype(np.float32), near, grid])
    values = np.concatenate([values, -values])
    codes = fp4_codes(values)
    distance = np.abs(np.abs(values)[:, None].astype(np.float64) - magnitudes[None, :])
    nearest = distance.min(axis=1, keepdims=True)
    # the largest of the nearest magnitudes: a tie goes away from zero
    expected = np.where(distance == nearest, np.arange(8), -1).max(axis=1)
    np.testing.assert_array_equal(codes & 7, expected)
    np.testing.assert_array_equal(codes >> 3, np.signbit(values))


def test_e8m0_exponents_round_amax_over_six_up_to_a_power_of_two():
    largest = np.finfo(np.float32).max  # / 6 = 2**125.4: 2**126, byte 253; 255 (NaN) unreachable
    amax = np.array([0.0, 6.0, 6.5, 12.0, 3.0, 3.0001, 6 * 2.0**-126, largest], np.float32)
    np.testing.assert_array_equal(e8m0_exponents(amax), [0, 127, 128, 128, 126, 127, 1, 253])


def random_experts(seed: int, shape=(3, 96, 5)) -> np.ndarray:
    """Float32 experts whose groups span many binades (each group its own magnitude)."""
    generator = np.random.default_rng(seed)
    values = generator.standard_normal(shape).astype(np.float32)
    spread = np.exp2(generator.integers(-20, 20, size=(shape[0], shape[1] // 32, shape[2])))
    return (values * np.repeat(spread, 32, axis=1)).astype(np.float32)


def test_requantized_experts_dequantize_within_half_an_mxfp4_step_per_element():
    values = random_experts(0)
    packed = PackedExperts("x_blocks", "x_scales", values.shape)
    blocks, scales = quantize_experts(values.shape, values.reshape(3, -1), "x")
    back = dequantize_experts(packed, blocks, scales, "m").reshape(values.shape)
    # the scale of each element's group, in the logical layout (experts, columns, rows)
    scale = np.exp2(scales.reshape(3, 5, 3).astype(np.float64) - 127)
    scale = np.repeat(scale.transpose(0, 2, 1), 32, axis=1)
    scaled = np.abs(values) / scale
    assert scaled.max() <= 6  # the scale rule never clamps
    gap = np.where(scaled < 2, 0.5, np.where(scaled < 4, 1.0, 2.0))  # E2M1's steps
    assert (np.abs(back - values) <= gap / 2 * scale).all()
    # requantizing what was read gives the same values (a group whose largest value fell to
    # 3 takes half the scale, its codes doubled): the grid is a fixed point
    again = dequantize_experts(
        packed, *quantize_experts(values.shape, back.reshape(3, -1), "x"), "m"
    )
    np.testing.assert_array_equal(again, back.reshape(3, -1))


def test_the_layout_is_the_one_transformers_and_the_fixtures_use():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    values = random_experts(1, (2, 64, 3))
    blocks, scales = quantize_experts(values.shape, values.reshape(2, -1), "x")
    stored_blocks, stored_scales = PackedExperts.stored_shapes(values.shape)
    blocks, scales = blocks.reshape(stored_blocks), scales.reshape(stored_scales)
    # the fixtures' quantizer (ceil(log2(amax / 6)), nearest value) agrees off ties
    theirs_blocks, theirs_scales = mxfp4_experts(torch.from_numpy(values))
    np.testing.assert_array_equal(scales, theirs_scales.numpy())
    np.testing.assert_array_equal(blocks, theirs_blocks.numpy())
    back = convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
    )
    assert tuple(back.shape) == values.shape
    packed = PackedExperts("x_blocks", "x_scales", values.shape)
    ours = dequantize_experts(packed, blocks.reshape(2, -1), scales.reshape(2, -1), "m")
    np.testing.assert_array_equal(back.numpy().reshape(2, -1), ours)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_merged_value_is_refused_naming_the_tensor(bad):
    values = np.ones((1, 64), np.float32)
    values[0, 40] = bad
    with pytest.raises(ModelError, match=r"merged tensor 'experts\.down_proj' holds NaN or inf"):
        quantize_experts((1, 32, 2), values, "experts.down_proj")
