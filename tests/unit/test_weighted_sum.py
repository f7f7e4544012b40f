"""The weighted sum (task arithmetic, linear) against hand-computed values and the torch
reference, byte for byte, including the non-finite flags and the bits of its NaNs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest
import torch
from kernel_check import require_kernel

from della_cli.backends.cpu import sum_kernel, weighted_sum
from della_cli.backends.cpu.weighted_sum import BFLOAT16, CHUNK, WeightedSum
from della_cli.io.dtypes import from_torch, to_torch
from della_cli.methods import METHODS, ExpertParams, GlobalParams, merge_tensor

F32 = np.dtype(np.float32)
PIECE_ENTRIES = sum_kernel.PIECE  # entries the kernel merges at a time


@pytest.fixture
def merge_block():
    """``weighted_sum.merge_block``, where the kernel is built."""
    require_kernel()
    return weighted_sum.merge_block


def as_bf16(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).astype(BFLOAT16)


def test_task_arithmetic_golden_values(merge_block):
    base = np.array([[1.0, -2.0, 0.5, 0.0]], dtype=np.float32)
    first = np.array([[2.0, -2.0, 1.5, 4.0]], dtype=np.float32)  # δ = 1, 0, 1, 4
    second = np.array([[0.0, 0.0, 0.5, -2.0]], dtype=np.float32)  # δ = -1, 2, 0, -2
    spec = WeightedSum(weights=(1.0, 0.5), on_deltas=True, normalize=False, lambda_=2.0)
    merged, flags = merge_block(base, [first, second], spec, F32)
    # θ₀ + λ(δ₁ + 0.5 δ₂) = [1 + 2(0.5), -2 + 2(1), 0.5 + 2(1), 0 + 2(3)]
    np.testing.assert_array_equal(merged, [[2.0, 0.0, 2.5, 6.0]])
    assert flags.tolist() == [False, False, False]


def test_linear_golden_values_normalized_by_the_weight_sum(merge_block):
    base = np.full((2, 2), 100.0, dtype=np.float32)  # linear ignores the base's values
    first = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    second = np.array([[4.0, 8.0], [0.0, -4.0]], dtype=np.float32)
    spec = WeightedSum(weights=(3.0, 1.0), on_deltas=False, normalize=True, lambda_=1.0)
    merged, _ = merge_block(base, [first, second], spec, F32)
    np.testing.assert_array_equal(merged, [[7 / 4, 14 / 4], [9 / 4, 8 / 4]])


def test_weights_summing_to_zero_divide_by_one(merge_block):
    base = np.zeros((1, 2), dtype=np.float32)
    first = np.array([[2.0, 4.0]], dtype=np.float32)
    spec = WeightedSum(weights=(1.0, -1.0), on_deltas=True, normalize=True, lambda_=1.0)
    merged, _ = merge_block(base, [first, first], spec, F32)
    np.testing.assert_array_equal(merged, [[0.0, 0.0]])
    assert not np.signbit(merged).any()  # 2 - 2 = +0, not NaN


def test_a_sum_of_negative_zeros_starts_from_positive_zero_as_the_reference(merge_block):
    base = np.array([[0.0, -0.0]], dtype=np.float32)
    first = np.array([[-0.0, -0.0]], dtype=np.float32)  # δ = -0 - 0 = -0, and -0 - -0 = +0
    spec = WeightedSum(weights=(1.0,), on_deltas=True, normalize=False, lambda_=1.0)
    merged, _ = merge_block(base, [first], spec, F32)
    # Σ = +0 + δ = +0 in both entries, so θ = θ₀ + 0 = +0 and -0 + +0 = +0.
    assert merged.view(np.uint32).tolist() == [[0, 0]]


def reference(method: str, arrays, weights, out_dtype: torch.dtype, **global_values):
    tensors = [to_torch(np.ascontiguousarray(a)).float() for a in arrays]
    merged = merge_tensor(
        METHODS[method],
        tensors[0],
        tensors[1:],
        [ExpertParams(weight=w) for w in weights],
        GlobalParams(**global_values),
    )
    return from_torch(merged.to(out_dtype))


def awkward_inputs(shape, count, dtype, seed):
    """bfloat16-valued inputs with exact ties, zeros of both signs and large values."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape, dtype=np.float32)
    experts = [base + 0.01 * rng.standard_normal(shape, dtype=np.float32) for _ in range(count)]
    arrays = [a.astype(BFLOAT16).astype(np.float32) for a in (base, *experts)]
    for index, array in enumerate(arrays):
        flat = array.reshape(-1)
        flat[index::11] = 0.0
        flat[index + 3 :: 13] = -0.0
        flat[5::97] = 3.0e38 if index else -3.0e38  # task vectors and sums overflow to Inf
    return [a.astype(dtype) for a in arrays]


@pytest.mark.parametrize(
    ("dtype", "out_dtype"), [(BFLOAT16, BFLOAT16), (F32, F32), (BFLOAT16, F32)]
)
@pytest.mark.parametrize(
    ("method", "global_values"),
    [
        ("task_arithmetic", {}),
        ("task_arithmetic", {"normalize": True}),
        ("task_arithmetic", {"lambda_": 0.7}),
        ("task_arithmetic", {"normalize": True, "lambda_": 1.3}),
        ("linear", {}),
        ("linear", {"normalize": True}),
    ],
)
def test_same_bytes_as_the_torch_reference(method, global_values, dtype, out_dtype, merge_block):
    arrays = awkward_inputs((37, 300), 3, dtype, seed=3)
    weights = (1.0, 0.5, -0.25)
    torch_out = torch.bfloat16 if out_dtype == BFLOAT16 else torch.float32
    global_values = {"normalize": False, **global_values}
    expected = reference(method, arrays, weights, torch_out, **global_values)
    spec = WeightedSum(
        weights=weights,
        on_deltas=METHODS[method].on_deltas,
        normalize=global_values["normalize"],
        lambda_=global_values.get("lambda_", 1.0),
    )
    merged, _ = merge_block(arrays[0], arrays[1:], spec, out_dtype)
    assert merged.dtype == out_dtype and merged.shape == arrays[0].shape
    assert not np.isfinite(expected.astype(np.float32)).all()  # the data reach Inf or NaN
    same_nan = np.isnan(merged.astype(np.float32)) == np.isnan(expected.astype(np.float32))
    assert same_nan.all()
    assert merged.tobytes() == expected.tobytes()


def test_nan_results_get_the_bits_of_torchs_vectorized_bfloat16_conversion(merge_block):
    base = as_bf16([[1.0, 2.0, 3.0, 4.0]])
    expert = as_bf16([[np.nan, 2.0, -np.nan, np.inf]])
    spec = WeightedSum(weights=(1.0,), on_deltas=True, normalize=False, lambda_=1.0)
    merged, flags = merge_block(base, [expert], spec, BFLOAT16)
    assert merged.view(np.uint16).tolist() == [[0xFFFF, 0x4000, 0xFFFF, 0x7F80]]
    assert flags.tolist() == [False, True]


def test_non_finite_inputs_are_flagged_by_input_and_only_where_present(merge_block):
    shape = (4, CHUNK // 2)  # two chunks' worth of entries
    base = np.ones(shape, dtype=BFLOAT16)
    clean = np.full(shape, 2.0, dtype=BFLOAT16)
    spiked = clean.copy()
    spiked[3, -1] = np.inf
    spec = WeightedSum(weights=(1.0, 1.0), on_deltas=True, normalize=False, lambda_=1.0)
    _, flags = merge_block(base, [clean, spiked], spec, BFLOAT16)
    assert flags.tolist() == [False, False, True]
    # Finite inputs whose sum overflows float32 are not flagged.
    huge = np.full((1, 8), 3.0e38, dtype=np.float32)
    merged, flags = merge_block(huge, [huge * 0, huge * 0], spec, F32)
    assert np.isinf(merged).all() and not flags.any()


def test_linear_flags_a_non_finite_base_it_does_not_otherwise_read(merge_block):
    base = np.zeros((2, 8), dtype=BFLOAT16)
    base[1, 2] = np.nan
    expert = np.ones((2, 8), dtype=BFLOAT16)
    spec = WeightedSum(weights=(1.0,), on_deltas=False, normalize=True, lambda_=1.0)
    merged, flags = merge_block(base, [expert], spec, BFLOAT16)
    assert flags.tolist() == [True, False]
    assert (merged.astype(np.float32) == 1.0).all()


def test_threads_split_a_block_without_changing_a_byte(merge_block):
    arrays = awkward_inputs((9, CHUNK // 3 + 7), 3, BFLOAT16, seed=5)  # spans cross chunks
    arrays[2][4, 17] = np.nan
    spec = WeightedSum(weights=(0.3, 1.0, 0.9), on_deltas=True, normalize=True, lambda_=0.8)
    serial, serial_flags = merge_block(arrays[0], arrays[1:], spec, BFLOAT16)
    with ThreadPoolExecutor(3) as helpers:
        split, split_flags = merge_block(arrays[0], arrays[1:], spec, BFLOAT16, helpers, 3)
    assert split.tobytes() == serial.tobytes()
    assert split_flags.tolist() == serial_flags.tolist() == [False, False, True, False]


def test_an_empty_block_merges_to_an_empty_result(merge_block):
    empty = np.zeros((0, 8), dtype=ml_dtypes.bfloat16)
    spec = WeightedSum(weights=(1.0,), on_deltas=True, normalize=False, lambda_=1.0)
    merged, flags = merge_block(empty, [empty], spec, BFLOAT16)
    assert merged.shape == (0, 8) and flags.tolist() == [False, False]


def test_mixed_input_dtypes_give_the_reference_bytes(merge_block):
    arrays = awkward_inputs((5, 1500), 3, F32, seed=8)
    arrays[1] = arrays[1].astype(BFLOAT16)
    arrays[3] = arrays[3].astype(BFLOAT16)
    arrays[3][4, 1499] = -np.inf
    weights = (0.5, 1.0, 2.0)
    expected = reference("task_arithmetic", arrays, weights, torch.bfloat16, normalize=True)
    spec = WeightedSum(weights=weights, on_deltas=True, normalize=True, lambda_=1.0)
    merged, flags = merge_block(arrays[0], arrays[1:], spec, BFLOAT16)
    assert merged.tobytes() == expected.tobytes()
    assert flags.tolist() == [False, False, False, True]


def test_float32_nans_fall_where_the_references_do_and_every_other_byte_matches(merge_block):
    """Inputs with NaNs of several payloads and both signs. Where two NaNs meet, IEEE 754 leaves
    open whose payload survives (numpy and torch differ on these very inputs, and so does the
    kernel, whose compiler may order an addition's operands either way), so NaNs are compared
    by position; every other byte must match. bfloat16 outputs have one NaN, 0xFFFF."""
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal((3, 2051), dtype=np.float32) for _ in range(3)]
    payloads = np.array([0x7FC00001, 0xFFC00002, 0x7FA00003, 0xFF800000], dtype=np.uint32)
    for index, array in enumerate(arrays):
        flat = array.reshape(-1).view(np.uint32)
        flat[index::7] = payloads[index % len(payloads)]
        flat[index + 1 :: 9] = payloads[(index + 1) % len(payloads)]
    for method, weights in (("task_arithmetic", (1.0, -0.5)), ("linear", (0.25, 3.0))):
        spec = WeightedSum(weights, METHODS[method].on_deltas, normalize=True, lambda_=0.5)
        kernel, kernel_flags = merge_block(arrays[0], arrays[1:], spec, F32)
        expected = reference(method, arrays, weights, torch.float32, normalize=True, lambda_=0.5)
        nan = np.isnan(expected)
        assert 0 < nan.sum() < nan.size
        assert (np.isnan(kernel) == nan).all()
        assert kernel[~nan].tobytes() == expected[~nan].tobytes()
        assert kernel_flags.tolist() == [True, True, True]


@pytest.mark.parametrize(
    "kinds",
    ["b", "bb", "bbbbb", "ffffffff", "bbfbbbbbb", "fbfbf"],
    ids=lambda kinds: kinds,
)
def test_experts_summed_in_groups_give_the_reference_bytes_and_flags(kinds, merge_block):
    """The kernel adds up to four experts of one dtype in a pass: every split into groups
    (sizes 1 to 4, a first group and later ones, float32 and bfloat16 experts) keeps the
    reference's order of additions, and a non-finite entry in any group is flagged."""
    count = len(kinds)
    arrays = awkward_inputs((3, PIECE_ENTRIES + 300), count, F32, seed=count)
    for index, kind in enumerate(kinds, start=1):
        if kind == "b":
            arrays[index] = arrays[index].astype(BFLOAT16)
    arrays[count][2, -5] = np.nan  # the last expert, in the last piece
    weights = tuple(0.25 * (index + 1) * (-1) ** index for index in range(count))
    for method, normalize in (("task_arithmetic", False), ("linear", True)):
        expected = reference(method, arrays, weights, torch.bfloat16, normalize=normalize)
        spec = WeightedSum(weights, METHODS[method].on_deltas, normalize, lambda_=1.0)
        merged, flags = merge_block(arrays[0], arrays[1:], spec, BFLOAT16)
        assert merged.tobytes() == expected.tobytes(), method
        assert flags.tolist() == [False] * count + [True], method


@pytest.mark.parametrize(
    ("method", "normalize", "lambda_"),
    [("task_arithmetic", True, 0.6), ("task_arithmetic", False, 1.0), ("linear", False, 1.0)],
)
def test_seventy_experts_of_both_dtypes_give_the_reference_bytes_and_flags(
    method, normalize, lambda_, merge_block
):
    """More experts than the C kernel's 63 (its flags were 64 bits): one compilation takes any
    count and any mix of dtypes, on a length that is no multiple of a piece."""
    count = 70
    arrays = awkward_inputs((3, PIECE_ENTRIES + 77), count, F32, seed=11)
    for index in range(1, count + 1, 3):
        arrays[index] = arrays[index].astype(BFLOAT16)
    arrays[66][1, 5] = np.nan  # expert 65: past the 64th bit
    arrays[2][2, -1] = -np.inf
    weights = tuple(0.1 * ((index % 7) - 3) for index in range(count))
    spec = WeightedSum(weights, METHODS[method].on_deltas, normalize, lambda_)
    expected = reference(
        method, arrays, weights, torch.bfloat16, normalize=normalize, lambda_=lambda_
    )
    merged, flags = merge_block(arrays[0], arrays[1:], spec, BFLOAT16)
    assert merged.tobytes() == expected.tobytes()
    assert np.flatnonzero(flags).tolist() == [2, 66]


def test_a_non_finite_base_is_flagged_on_deltas_and_spreads_to_the_result(merge_block):
    base = np.zeros((1, PIECE_ENTRIES + 3), dtype=F32)
    base[0, -2] = np.inf
    expert = np.ones_like(base)
    spec = WeightedSum(weights=(1.0,), on_deltas=True, normalize=False, lambda_=1.0)
    merged, flags = merge_block(base, [expert], spec, F32)
    assert flags.tolist() == [True, False]
    assert np.isnan(merged[0, -2])  # θ₀ + (θ₁ - θ₀) = Inf + -Inf
    assert (merged[0, :-2] == 1.0).all() and merged[0, -1] == 1.0
