"""Issue #19, dequantizing on the device: the torch rules (``quant.torch_rules``) give the bits
of the CPU's numpy rules for every format, over ragged edge blocks and rows read across
bands of scales; a plan on CUDA sends quantized rows to the device as stored, and a merge
that dequantizes them in torch writes the bytes of one that dequantizes them on read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_check import on_backend
from quant_fixtures import quantize
from safetensors.torch import save_file

from della_cli.api import MergeOptions, prepare
from della_cli.engine import MergeEngine
from della_cli.io.reader import ModelReader
from della_cli.plan import build_plan
from della_cli.quant import dequantizing
from della_cli.quant.placement import place_dequantization
from della_cli.quant.view import QuantizedRows
from della_cli.tiny import make_base, make_expert, random_delta

W = "model.layers.0.mlp.down_proj.weight"
E = "model.layers.0.mlp.experts.down_proj"


def bits(array) -> np.ndarray:
    """The float32 bits of an array or tensor (NaN payloads and signed zeros included)."""
    values = array.numpy() if isinstance(array, torch.Tensor) else array
    return np.ascontiguousarray(values, np.float32).view(np.uint32)


def saved(path: Path, tensors: dict[str, torch.Tensor], quantization: dict) -> ModelReader:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    config = {"model_type": "toy", "quantization_config": quantization}
    (path / "config.json").write_text(json.dumps(config))
    return dequantizing(ModelReader(path, path.name))


def every_fp8_byte(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """FP8 weights holding every e4m3 byte, NaN (0x7f, 0xff) and -0 (0x80) included."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    raw.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    return raw.view(torch.float8_e4m3fn)


def assert_same_rows(reader, name: str, bounds: list[tuple[int, int]]) -> None:
    for start, stop in bounds:
        stored = reader.stored_rows(name, start, stop)
        assert isinstance(stored, QuantizedRows) and stored.shape[0] == stop - start
        numpy_rows = reader.read_rows(name, start, stop)
        torch_rows = stored.on_device("cpu")
        assert tuple(torch_rows.shape) == numpy_rows.shape == stored.shape
        np.testing.assert_array_equal(bits(torch_rows), bits(numpy_rows), err_msg=(start, stop))
        np.testing.assert_array_equal(bits(stored.dequantized()), bits(numpy_rows))


def test_fp8_blocks_dequantize_to_the_same_bits_in_torch_across_ragged_blocks(tmp_path):
    generator = torch.Generator().manual_seed(1)
    scales = torch.rand(2, 3, generator=generator) * 1e-2 + 1e-40  # one scale subnormal-ish
    scales[1, 2] = 2.0**-130  # a float32 subnormal scale: products round the same
    reader = saved(
        tmp_path / "blocks",
        {W: every_fp8_byte((200, 300), 1), W + "_scale_inv": scales},
        {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
    )
    # whole, within a band, across the band edge at 128, the ragged last band
    assert_same_rows(reader, W, [(0, 200), (5, 9), (100, 150), (127, 129), (190, 200)])


def test_stacked_fp8_experts_and_compressed_tensors_scales_give_the_same_bits(tmp_path):
    stacked = "model.layers.0.feed_forward.experts.down_proj"
    reader = saved(
        tmp_path / "stacked",
        {stacked: every_fp8_byte((3, 40, 24), 2), stacked + "_scale_inv": torch.rand(3, 3, 2)},
        {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]},
    )
    assert_same_rows(reader, stacked, [(0, 3), (1, 3)])
    compressed = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}}},
    }
    channel = (torch.rand(20, 1) / 448).bfloat16()
    per_row = saved(
        tmp_path / "channel", {W: every_fp8_byte((20, 24), 3), W + "_scale": channel}, compressed
    )
    assert_same_rows(per_row, W, [(0, 20), (7, 13)])
    whole = saved(
        tmp_path / "tensor",
        {W: every_fp8_byte((20, 24), 4), W + "_scale": torch.tensor([3e-3], dtype=torch.float16)},
        compressed,
    )
    assert_same_rows(whole, W, [(0, 20), (19, 20)])


def test_mxfp4_experts_give_the_same_bits_in_torch_for_every_code_and_exponent(tmp_path):
    generator = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (4, 7, 3, 16), generator=generator, dtype=torch.uint8)
    blocks.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # every pair of codes
    # every exponent but the NaN 255: 0 (2**-127, subnormal) to 254 (2**127)
    exponents = torch.arange(4 * 7 * 3, dtype=torch.int32).mul(3).remainder(255)
    exponents = exponents.to(torch.uint8).reshape(4, 7, 3)
    exponents.view(-1)[:2] = torch.tensor([0, 254], dtype=torch.uint8)
    reader = saved(
        tmp_path / "mxfp4",
        {E + "_blocks": blocks, E + "_scales": exponents},
        {"quant_method": "mxfp4"},
    )
    assert_same_rows(reader, E, [(0, 4), (1, 3), (3, 4)])


def test_a_nan_exponent_sent_to_the_device_is_refused_on_read_naming_it(tmp_path):
    from della_cli.errors import ModelError

    exponents = torch.full((2, 1, 1), 127, dtype=torch.uint8)
    exponents[1, 0, 0] = 255
    reader = saved(
        tmp_path / "nan",
        {E + "_blocks": torch.zeros(2, 1, 1, 16, dtype=torch.uint8), E + "_scales": exponents},
        {"quant_method": "mxfp4"},
    )
    with pytest.raises(ModelError, match=r"'model\.layers\.0\.mlp\.experts\.down_proj_scales'"):
        reader.stored_rows(E, 1, 2)


@pytest.fixture(scope="module")
def fp8_merge(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("device")
    plain = make_base(root / "plain", "llama", dtype=torch.bfloat16)
    quantize(plain, root / "base", "fp8", block=(16, 16))
    for index in (1, 2):
        make_expert(plain, root / f"e{index}", random_delta(index))
    # one expert in FP8 too, with other blocks: quantized inputs on both sides of the delta
    quantize(root / "e2", root / "e2-fp8", "fp8", block=(8, 16))
    for method, parameters in METHODS.items():
        (root / f"{method}.yaml").write_text(
            f"merge_method: {method}\nbase_model: {root / 'base'}\nseed: 3\nmodels:\n"
            f"  - model: {root / 'e1'}\n{parameters}"
            f"  - model: {root / 'e2-fp8'}\n{parameters}"
        )
    return root


# della: random drops, in blocks; ties: a whole-tensor selection read before the blocks;
# model_stock: a catalog method, whose rows reach it as stored
METHODS = {
    "della": "    parameters: {weight: 0.5, density: 0.6}\n",
    "ties": "    parameters: {weight: 0.5, density: 0.6}\n",
    "model_stock": "",
}


def test_a_cuda_plan_sends_quantized_inputs_to_the_device_and_a_cpu_plan_does_not(fp8_merge):
    recipe, inputs, plan = prepare(fp8_merge / "della.yaml", MergeOptions(device="cpu"))
    assert not any(s.on_device for job in plan.jobs for s in (job.reference, *job.experts))
    cuda = build_plan(recipe, inputs.base, inputs.experts, 2**30, device="cuda")
    placed = {
        (job.name, source.model)
        for job in cuda.jobs
        for source in (job.reference, *job.experts)
        if source.on_device
    }
    quantized = {name for name in inputs.base.scheme.weights}
    # the base's FP8 weights (model -1) and the FP8 expert's (model 1); not the bf16 expert's
    assert {name for name, model in placed if model == -1} == quantized
    assert {name for name, model in placed if model == 1} == quantized
    assert not {name for name, model in placed if model == 0}
    # della plan says so, beside each group's kernel
    from della_cli.plan_report import PlanReport
    from della_cli.preflight import _describe_plan

    report = PlanReport("della", "cuda", {})
    _describe_plan(report, cuda, list(recipe.model_refs))
    kernels = {group["tensors"]: group["kernel"] for group in report.groups}
    assert kernels["model.layers.*.mlp.down_proj.weight"] == "torch/merge, dequantized on cuda"
    assert kernels["model.norm.weight"] == "torch/merge"


@pytest.mark.parametrize("method", METHODS)
def test_a_merge_dequantizing_on_the_device_writes_the_bytes_of_one_dequantizing_on_read(
    fp8_merge, monkeypatch, method
):
    recipe, inputs, plan = prepare(fp8_merge / f"{method}.yaml", MergeOptions(device="cpu"))
    on_read = on_backend(plan, recipe, inputs, "torch")
    on_device = place_dequantization(on_read, inputs.base, inputs.experts, on_device=True)
    sent = []
    on_device_of = QuantizedRows.on_device
    monkeypatch.setattr(
        QuantizedRows,
        "on_device",
        lambda rows, device: sent.append(rows) or on_device_of(rows, device),
    )
    theirs = MergeEngine(recipe, on_read, inputs, "cpu", block_elements=200)
    assert not sent
    ours = MergeEngine(recipe, on_device, inputs, "cpu", block_elements=200)
    for job in on_device.jobs:
        assert ours.compute(job).tobytes() == theirs.compute(job).tobytes(), job.name
    assert len(sent) > 14 * 2  # each FP8 weight of both FP8 models, in several blocks
