"""Weighted sums read straight from files a piece at a time (``io.streamed_sum`` and
``weighted_sum.merge_streamed``) give the bytes and flags of ``weighted_sum.merge_block`` on the
same values held in memory, wherever the entries sit in the files, and a file that ends early
is an error naming it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from kernel_check import require_streamed_reads

from della_cli.backends.cpu import weighted_sum
from della_cli.backends.cpu.weighted_sum import BFLOAT16, WeightedSum
from della_cli.errors import ModelError
from della_cli.io import streamed_sum
from della_cli.io.streamed_sum import FileSpan

F32 = np.dtype(np.float32)
CODES = {BFLOAT16: "BF16", F32: "F32"}
STEP = streamed_sum.STEP  # entries read per input at a time


@pytest.fixture(autouse=True)
def _built():
    require_streamed_reads()


def awkward(count: int, entries: int, seed: int) -> list[np.ndarray]:
    """A base and ``count`` experts near it, with zeros of both signs and values whose sums
    overflow float32."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(entries, dtype=np.float32)
    noise = [0.01 * rng.standard_normal(entries, dtype=np.float32) for _ in range(count)]
    arrays = [base, *(base + delta for delta in noise)]
    for index, array in enumerate(arrays):
        array[index::11] = 0.0
        array[index + 3 :: 13] = -0.0
        array[5::97] = 3.0e38 if index else -3.0e38
    return arrays


def spans_in_file(folder: Path, arrays: list[np.ndarray], lead: int) -> list[FileSpan]:
    """Write each array into its own file after ``lead`` bytes of padding; their spans."""
    spans = []
    for index, array in enumerate(arrays):
        path = folder / f"input-{index}.bin"
        path.write_bytes(b"\xab" * (lead + index * 6) + array.tobytes())
        descriptor = os.open(path, os.O_RDONLY)
        spans.append(FileSpan(descriptor, lead + index * 6, CODES[array.dtype], path, f"t{index}"))
    return spans


def close(spans: list[FileSpan]) -> None:
    for span in spans:
        os.close(span.descriptor)


@pytest.mark.parametrize(
    ("dtypes", "out_dtype"),
    [
        ((BFLOAT16,) * 4, BFLOAT16),
        ((F32,) * 4, F32),
        ((BFLOAT16, F32, BFLOAT16, F32), BFLOAT16),
        ((F32, BFLOAT16, BFLOAT16, BFLOAT16), F32),
    ],
    ids=["bf16", "f32", "mixed", "f32-base"],
)
@pytest.mark.parametrize("on_deltas", [True, False], ids=["deltas", "linear"])
def test_same_bytes_and_flags_as_the_kernel_on_arrays(dtypes, out_dtype, on_deltas, tmp_path):
    """Three steps and a ragged end (2 * STEP + 4001 entries), files whose entries start at
    odd offsets, a NaN in the last step of one expert and an Inf in the first of another."""
    entries = 2 * STEP + 4001
    arrays = [a.astype(d) for a, d in zip(awkward(3, entries, seed=7), dtypes, strict=True)]
    arrays[2][-3] = np.nan
    arrays[3][10] = -np.inf
    spec = WeightedSum(weights=(0.5, 1.0, -2.0), on_deltas=on_deltas, normalize=True, lambda_=0.7)
    expected, expected_flags = weighted_sum.merge_block(arrays[0], arrays[1:], spec, out_dtype)
    spans = spans_in_file(tmp_path, arrays, lead=1001)
    out = np.full(entries, 7, dtype=out_dtype)
    try:
        scratch = streamed_sum.Scratch()
        flags = weighted_sum.merge_streamed(out, spans[0], spans[1:], spec, scratch)
    finally:
        close(spans)
    same_nan = np.isnan(out.astype(np.float32)) == np.isnan(expected.astype(np.float32))
    assert same_nan.all()
    finite = ~np.isnan(expected.astype(np.float32))
    assert out[finite].tobytes() == expected[finite].tobytes()
    if out_dtype == BFLOAT16:  # one NaN pattern: every byte matches
        assert out.tobytes() == expected.tobytes()
    assert flags.tolist() == expected_flags.tolist() == [False, False, True, True]


def test_a_base_that_is_an_expert_is_read_once_and_flagged_as_the_base(tmp_path):
    """A linear merge without a base takes one of its models as the reference: its entries are
    read once, and its flag is the base's as well as its own."""
    arrays = [a.astype(BFLOAT16) for a in awkward(2, STEP + 17, seed=3)[1:]]
    arrays[1][STEP + 5] = np.inf
    spec = WeightedSum(weights=(1.0, 3.0), on_deltas=False, normalize=True, lambda_=1.0)
    expected, _ = weighted_sum.merge_block(arrays[1], arrays, spec, BFLOAT16)
    spans = spans_in_file(tmp_path, arrays, lead=0)
    out = np.empty(STEP + 17, dtype=BFLOAT16)
    try:
        scratch = streamed_sum.Scratch()
        flags = weighted_sum.merge_streamed(out, 1, spans, spec, scratch)
        positions = [os.lseek(span.descriptor, 0, os.SEEK_CUR) for span in spans]
    finally:
        close(spans)
    assert out.tobytes() == expected.tobytes()
    assert flags.tolist() == [True, False, True]
    assert positions == [0, 0]  # positioned reads: the descriptors' offsets never move


@pytest.mark.parametrize("base_is_an_expert", [False, True], ids=["base", "expert-as-base"])
def test_a_file_that_ends_early_names_the_file_and_the_tensor(base_is_an_expert, tmp_path):
    arrays = [np.ones(STEP + 100, dtype=BFLOAT16) for _ in range(3)]
    spans = spans_in_file(tmp_path, arrays, lead=64)
    os.truncate(spans[2].path, spans[2].offset + STEP * 2 + 50)  # 50 entries short
    out = np.empty(STEP + 100, dtype=BFLOAT16)
    base, experts = (0, spans) if base_is_an_expert else (spans[0], spans[1:])
    weights = (1.0,) * len(experts)
    try:
        with pytest.raises(ModelError) as caught:
            scratch = streamed_sum.Scratch()
            spec = WeightedSum(weights, on_deltas=True, normalize=False, lambda_=1.0)
            weighted_sum.merge_streamed(out, base, experts, spec, scratch)
    finally:
        close(spans)
    assert str(caught.value) == f"{spans[2].path}: ended early while reading 't2'"


def test_a_read_error_is_an_os_error_naming_the_file(tmp_path):
    arrays = [np.ones(64, dtype=F32) for _ in range(2)]
    spans = spans_in_file(tmp_path, arrays, lead=0)
    close(spans[1:])  # expert 0's descriptor is now invalid
    out = np.empty(64, dtype=F32)
    try:
        with pytest.raises(OSError) as caught:
            scratch = streamed_sum.Scratch()
            spec = WeightedSum((1.0,), on_deltas=True, normalize=False, lambda_=1.0)
            weighted_sum.merge_streamed(out, spans[0], spans[1:], spec, scratch)
    finally:
        close(spans[:1])
    assert caught.value.filename == str(spans[1].path)


def test_sixty_five_experts_read_from_files_give_the_bytes_and_flags_of_the_arrays(tmp_path):
    """More experts than the C reader took (63), each in its own file: one region each."""
    arrays = [a.astype(BFLOAT16) for a in awkward(65, STEP + 3, seed=9)]
    arrays[65][STEP + 1] = np.nan
    weights = tuple(1.0 / (index + 1) for index in range(65))
    spec = WeightedSum(weights, on_deltas=True, normalize=True, lambda_=1.0)
    expected, expected_flags = weighted_sum.merge_block(arrays[0], arrays[1:], spec, BFLOAT16)
    spans = spans_in_file(tmp_path, arrays, lead=10)
    out = np.empty(STEP + 3, dtype=BFLOAT16)
    try:
        flags = weighted_sum.merge_streamed(out, spans[0], spans[1:], spec, streamed_sum.Scratch())
    finally:
        close(spans)
    assert out.tobytes() == expected.tobytes()
    assert flags.tolist() == expected_flags.tolist()
    assert np.flatnonzero(flags).tolist() == [65]
