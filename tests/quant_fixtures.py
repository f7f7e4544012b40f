"""Quantized tiny checkpoints for the tests, written with torch's float8_e4m3fn and safetensors.

The FP8 quantizer follows DeepSeek-V3's reference (``inference/kernel.py``: per 128x128
block, ``scale = amax / 448`` and ``weight / scale`` cast to e4m3 with round-to-nearest-even,
the scale stored as ``weight_scale_inv``), and transformers' guard against an all-zero block
(amax clamped to 1e-12). The MXFP4 one picks, per group of 32, the smallest power of two that
brings the largest magnitude within FP4's 6, and the nearest FP4 value.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0
FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (..., N, K) as e4m3 values and float32 ``weight_scale_inv`` per block."""
    *lead, rows, columns = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(columns / block[1]))
    padded = torch.zeros(*lead, grid[0] * block[0], grid[1] * block[1])
    padded[..., :rows, :columns] = weight.float()
    tiles = padded.unflatten(-1, (grid[1], block[1])).unflatten(-3, (grid[0], block[0]))
    amax = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-12)  # (..., grid0, grid1)
    scale = amax / FP8_MAX
    quantized = tiles / scale[..., :, None, :, None]
    values = quantized.flatten(-4, -3).flatten(-2, -1)[..., :rows, :columns]
    return values.to(torch.float8_e4m3fn), scale.float()


def fp8_dequantized(values: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """The float32 weight ``fp8_blocks`` stands for, by transformers' own dequantizer."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    return _dequantize_fp8_weight(values.clone(), scale, list(block), torch.float32)


def mxfp4_experts(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss ``*_blocks`` and ``*_scales`` of an expert parameter (E, columns, rows)."""
    experts, columns, rows = values.shape
    groups = values.float().transpose(1, 2).reshape(experts, rows, columns // 32, 32)
    largest = groups.abs().amax(dim=-1).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(largest / 6.0)).clamp(-127, 127).to(torch.int32)
    scaled = groups / torch.pow(2.0, exponent.float())[..., None]
    nearest = (scaled.abs()[..., None] - FP4_MAGNITUDES).abs().argmin(dim=-1)
    codes = (nearest + 8 * torch.signbit(scaled)).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, (exponent + 127).to(torch.uint8)


def fp8_linear(name: str, tensor: torch.Tensor) -> bool:
    """The weights DeepSeek-V3's FP8 release quantizes: linear layers, not the embeddings,
    the output head, the norms or the router."""
    skipped = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "router")
    return name.endswith(".weight") and tensor.dim() == 2 and not any(s in name for s in skipped)


def copy_metadata(source: Path, folder: Path, quantization: dict | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and not path.name.startswith("model"):
            shutil.copy2(path, folder / path.name)
    if quantization is not None:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = quantization
        (folder / "config.json").write_text(json.dumps(config))


def channel_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors FP8 per channel (llm-compressor's FP8_DYNAMIC scheme): a scale
    per output row, ``amax / 448``, stored in bfloat16 as those checkpoints store it."""
    scale = (weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX).bfloat16()
    return (weight.float() / scale.float()).to(torch.float8_e4m3fn), scale


def fp8_weight(name: str, tensor: torch.Tensor) -> bool:
    """``fp8_linear``, and stacked expert matrices (experts, rows, columns)."""
    stacked = name.endswith(("experts.gate_up_proj", "experts.down_proj")) and tensor.dim() == 3
    return fp8_linear(name, tensor) or stacked


QUANTIZATIONS = {
    "fp8": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"},
    "compressed": {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
            }
        },
        "ignore": ["lm_head"],
    },
    "mxfp4": {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]},
}


def quantize(source: Path, folder: Path, form: str, block: tuple[int, int] = (16, 16)) -> Path:
    """A copy of the model at ``source`` in ``form``: "fp8" (DeepSeek's fine-grained blocks,
    stacked experts too), "compressed" (compressed-tensors FP8 per channel) or "mxfp4"
    (gpt-oss experts), with the quantization_config those releases carry."""
    tensors = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if form == "fp8" and fp8_weight(name, tensor):
            tensors[name], tensors[name + "_scale_inv"] = fp8_blocks(tensor, block)
        elif form == "compressed" and fp8_linear(name, tensor):
            tensors[name], tensors[name + "_scale"] = channel_fp8(tensor)
        elif form == "mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name + "_blocks"], tensors[name + "_scales"] = mxfp4_experts(tensor)
        else:
            tensors[name] = tensor
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    settings = dict(QUANTIZATIONS[form])
    if form == "fp8":
        settings["weight_block_size"] = list(block)
    copy_metadata(source, folder, settings)
    return folder


def dequantized_twin(folder: Path, twin: Path) -> Path:
    """The float32 model a quantized checkpoint stands for, unquantized by transformers' own
    dequantizers (FP8 blocks, MXFP4) or by ``weight * weight_scale`` (compressed-tensors),
    with config.json's quantization_config removed."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    config = json.loads((folder / "config.json").read_text())
    block = config.pop("quantization_config").get("weight_block_size")
    stored = load_file(folder / "model.safetensors")
    tensors = {}
    for name, tensor in stored.items():
        if name.endswith(("_scale_inv", "_scale", "_scales")):
            continue
        if name.endswith("_blocks"):
            scales = stored[name.removesuffix("_blocks") + "_scales"]
            unpacked = convert_moe_packed_tensors(tensor, scales, dtype=torch.float32)
            tensors[name.removesuffix("_blocks")] = unpacked
        elif name + "_scale_inv" in stored:
            tensors[name] = fp8_dequantized(tensor, stored[name + "_scale_inv"], block)
        elif name + "_scale" in stored:
            tensors[name] = tensor.float() * stored[name + "_scale"].float()
        else:
            tensors[name] = tensor
    twin.mkdir(parents=True, exist_ok=True)
    save_file(tensors, twin / "model.safetensors", metadata={"format": "pt"})
    copy_metadata(folder, twin, None)
    (twin / "config.json").write_text(json.dumps(config))
    return twin


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of an output folder as float32 numpy arrays."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update({n: t.float().numpy() for n, t in load_file(path).items()})
    return tensors
