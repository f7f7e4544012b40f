"""Which quantized format a checkpoint is in, and where each of its weights is stored.

The format is what config.json's ``quantization_config`` declares (``quant_method``); the
tensors must then be laid out as that format says, which is checked here from the headers
alone, before any data is read: every FP8 weight has its scale, every scale its weight, and
each scale tensor has the dtype and the shape its weight and block size give. One line names
the first problem, the model and the tensor. Formats della does not read (GPTQ, AWQ,
bitsandbytes, ...) are left to the plan, which refuses them (``della_cli.quantized``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from della_cli.errors import ModelError, shown
from della_cli.io.header import TensorInfo
from della_cli.io.reader import ModelReader
from della_cli.quant.fp8_blocks import ScaledWeight
from della_cli.quant.mxfp4 import PackedExperts, logical_shape
from della_cli.quantized import config_format

READ_FORMATS = ("fp8", "compressed-tensors", "mxfp4")
_FP8 = frozenset({"F8_E4M3", "F8_E5M2"})
# compressed-tensors formats whose weights are FP8 values beside float scales
_FLOAT_FORMATS = ("float-quantized", "naive-quantized")
# activation scales: what a static scheme multiplies inputs by, nothing of the weights
ACTIVATION_SCALES = (".input_scale", ".activation_scale")


@dataclass
class Scheme:
    """A checkpoint's format and, per logical weight, how it is stored; ``hidden`` are the
    stored tensors that are no weight of their own (scales, packed halves, input scales)."""

    form: str
    weights: dict[str, ScaledWeight | PackedExperts] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def quantization_config(config: dict | None) -> dict:
    """The ``quantization_config`` object of config.json (or of its ``text_config``)."""
    for declared in (config or {}, (config or {}).get("text_config") or {}):
        if isinstance(declared.get("quantization_config"), dict):
            return declared["quantization_config"]
    return {}


def recognise(reader: ModelReader) -> Scheme | None:
    """The scheme of a checkpoint in a format della reads; None for any other (unquantized
    or refused later by the plan). Raises ModelError (exit 2) for a malformed layout."""
    form = config_format(reader.config)
    if form not in READ_FORMATS:
        return None
    settings = quantization_config(reader.config)
    scheme = Scheme(form)
    if form == "fp8":
        _fine_grained(reader.tensors, settings, scheme)
    elif form == "compressed-tensors":
        _compressed(reader.tensors, settings, scheme)
    else:
        _mxfp4(reader.tensors, scheme)
    if scheme.problems:
        more = f" (and {len(scheme.problems) - 1} more)" if len(scheme.problems) > 1 else ""
        raise ModelError(f"model '{reader.label}' ({form}): {scheme.problems[0]}{more}")
    return scheme


def _block_size(value: object, field_name: str, scheme: Scheme) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 2 and all(type(v) is int and v > 0 for v in value):
        return value[0], value[1]
    scheme.problems.append(f"{field_name} must be two positive integers, got {shown(value)}")
    return None


def _pair(
    tensors: dict[str, TensorInfo],
    scale_name: str,
    weight_name: str,
    block: tuple[int, int] | None,
    scheme: Scheme,
) -> None:
    """Record ``weight_name`` as scaled by ``scale_name``, checking both headers."""
    scale, weight = tensors[scale_name], tensors.get(weight_name)
    if weight is None or weight.dtype != "F8_E4M3":
        got = "is missing" if weight is None else f"is {weight.dtype}"
        scheme.problems.append(f"'{scale_name}' scales '{weight_name}', which {got}, not F8_E4M3")
        return
    if not scale.is_floating or scale.dtype in _FP8:
        scheme.problems.append(f"scale tensor '{scale_name}' is {scale.dtype}, not a float")
        return
    if len(weight.shape) < 2:
        scheme.problems.append(f"FP8 weight '{weight_name}' has shape {weight.shape}, not a matrix")
        return
    rows = block is None and len(scale.shape) == 2 and scale.shape == (weight.shape[0], 1)
    stored = ScaledWeight(weight_name, scale_name, weight.shape, block, per_channel=rows)
    expected = stored.scale_shape()
    per_tensor = block is None and not rows and scale.shape in ((), (1,))
    if scale.shape != expected and not per_tensor:
        layout = f"{block[0]}x{block[1]} blocks" if block else "one per tensor or per row"
        scheme.problems.append(
            f"scale tensor '{scale_name}' has shape {scale.shape}, but '{weight_name}' "
            f"{weight.shape} in {layout} needs {expected or '() or (1,)'}"
        )
        return
    scheme.weights[weight_name] = stored
    scheme.hidden.add(scale_name)


def _unscaled(tensors: dict[str, TensorInfo], scheme: Scheme, suffix: str) -> None:
    """FP8 tensors that no scale names: their values alone are not the weights."""
    for name, info in tensors.items():
        if info.dtype in _FP8 and name not in scheme.weights:
            scheme.problems.append(f"FP8 tensor '{name}' has no '{name}{suffix}' beside it")
            return
    for name in tensors:
        if name.endswith(ACTIVATION_SCALES):
            scheme.hidden.add(name)


def _fine_grained(tensors: dict[str, TensorInfo], settings: dict, scheme: Scheme) -> None:
    """DeepSeek-V3/R1 and Qwen3 FP8: ``weight_scale_inv`` per ``weight_block_size`` block."""
    block = _block_size(settings.get("weight_block_size"), "weight_block_size", scheme)
    if settings.get("fmt", "e4m3") != "e4m3":
        scheme.problems.append(f"fmt {shown(settings.get('fmt'))} is not e4m3")
        return
    for name in tensors:
        if name.endswith("_scale_inv"):  # "x.weight_scale_inv", fused experts' "x_scale_inv"
            _pair(tensors, name, name.removesuffix("_scale_inv"), block, scheme)
    _unscaled(tensors, scheme, "_scale_inv")


def _compressed(tensors: dict[str, TensorInfo], settings: dict, scheme: Scheme) -> None:
    """compressed-tensors ``float-quantized``: ``weight_scale`` per tensor, row or block."""
    form = settings.get("format")
    if form not in _FLOAT_FORMATS:
        scheme.problems.append(
            f"format {shown(form)} is not read; della reads compressed-tensors "
            f"{' and '.join(_FLOAT_FORMATS)} FP8 checkpoints"
        )
        return
    blocks = set()
    for group in (settings.get("config_groups") or {}).values():
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict):
            if weights.get("type", "float") != "float" or weights.get("num_bits", 8) != 8:
                scheme.problems.append(
                    f"weights of {shown(weights.get('type'))} type with "
                    f"{shown(weights.get('num_bits'))} bits are not FP8"
                )
                return
            if weights.get("block_structure") is not None:
                blocks.add(tuple(weights["block_structure"]))
    if len(blocks) > 1:
        scheme.problems.append(f"config_groups use {len(blocks)} block structures; one is read")
        return
    block = _block_size(list(blocks.pop()), "block_structure", scheme) if blocks else None
    for name in tensors:
        if name.endswith((".weight_zero_point", ".weight_packed", ".weight_g_idx")):
            scheme.problems.append(f"'{name}' belongs to an integer scheme, which is not read")
            return
        if name.endswith(".weight_scale"):
            _pair(tensors, name, name.removesuffix("_scale"), block, scheme)
    _unscaled(tensors, scheme, "_scale")


def _mxfp4(tensors: dict[str, TensorInfo], scheme: Scheme) -> None:
    """gpt-oss: ``<name>_blocks`` and ``<name>_scales`` of MXFP4 experts."""
    for name, info in tensors.items():
        if name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" not in tensors:
            scheme.problems.append(f"'{name}' has no '{name.removesuffix('_scales')}_blocks'")
            return
        if not name.endswith("_blocks"):
            continue
        base = name.removesuffix("_blocks")
        scales = tensors.get(base + "_scales")
        shape = logical_shape(info.shape)
        if info.dtype != "U8" or shape is None:
            scheme.problems.append(
                f"'{name}' is {info.dtype} {info.shape}; MXFP4 blocks are U8 of shape "
                "(experts, rows, groups, 16)"
            )
        elif scales is None or scales.dtype != "U8" or scales.shape != info.shape[:-1]:
            found = "missing" if scales is None else f"{scales.dtype} {scales.shape}"
            scheme.problems.append(
                f"'{base}_scales' is {found}; the blocks '{name}' need U8 {info.shape[:-1]}"
            )
        elif base in tensors:
            scheme.problems.append(f"'{base}' is stored both packed and unpacked")
        else:
            scheme.weights[base] = PackedExperts(name, base + "_scales", shape)
            scheme.hidden.update((name, base + "_scales"))
        if scheme.problems:
            return
