"""Quantized checkpoints, recognised so that the plan can refuse those della cannot read.

A quantized tensor is not its values: an FP8 weight with DeepSeek-style block scales means
``weight * weight_scale_inv`` per 128x128 block, GPTQ and AWQ pack 4-bit integers into int32
``qweight`` with ``scales`` and ``qzeros``, MXFP4 stores ``*_blocks`` of 4-bit codes with
``*_scales`` exponents, bitsandbytes keeps ``absmax`` and a ``quant_map`` beside packed bytes.
Merging the stored values as if they were weights gives a silently wrong model (an FP8 merge
without its scales was off by up to 224 bf16 ulps), and the scale tensors would be copied into
the output as weights. FP8 and MXFP4 checkpoints that config.json declares are dequantized as
they are read (``della_cli.quant``) and reach the plan unquantized; any other quantized model
is refused here, naming the format, the model and a first tensor that shows it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from della_cli.errors import ModelError
from della_cli.io.reader import ModelReader

# (tensor name pattern, dtypes it must have or None for any, the format it shows)
_TENSOR_SIGNS: tuple[tuple[re.Pattern[str], frozenset[str] | None, str], ...] = (
    (re.compile(r"\.weight_scale_inv$"), None, "fp8 with block scales"),
    (
        re.compile(r"\.(weight_scale|input_scale|weight_zero_point|weight_packed)$"),
        None,
        "compressed-tensors",
    ),
    (re.compile(r"_(blocks|scales)$"), frozenset({"U8"}), "mxfp4"),
    (re.compile(r"\.(qweight|qzeros|g_idx)$"), None, "gptq or awq"),
    (
        re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|SCB)$|\.quant_state\."),
        None,
        "bitsandbytes",
    ),
)
_FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})


def config_format(config: dict | None) -> str | None:
    """The quantization format config.json declares (``quantization_config``, also inside
    ``text_config``, or the older ``compression_config``); None when it declares none."""
    if not config:
        return None
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for declared in (config, text_config):
        quantization = declared.get("quantization_config")
        if isinstance(quantization, dict):
            method = quantization.get("quant_method")
            if isinstance(method, str) and re.fullmatch(r"[\w.\-]{1,40}", method):
                return method
            if quantization.get("load_in_4bit") or quantization.get("load_in_8bit"):
                return "bitsandbytes"
            return "quantization_config"
        if declared.get("compression_config") is not None:
            return "compressed-tensors"
    return None


def first_quantized_tensor(reader: ModelReader) -> tuple[str, str] | None:
    """A first tensor (in header order) whose name or dtype shows a quantized format, with
    that format; None when no tensor does."""
    for name, info in reader.tensors.items():
        if info.dtype in _FP8_DTYPES:
            return name, "fp8"
        for pattern, dtypes, form in _TENSOR_SIGNS:
            if pattern.search(name) and (dtypes is None or info.dtype in dtypes):
                return name, form
    return None


def quantization_problem(reader: ModelReader) -> str | None:
    """One line saying how ``reader``'s checkpoint is quantized, or None when it is not."""
    declared = config_format(reader.config)
    tensor = first_quantized_tensor(reader)
    if declared is None and tensor is None:
        return None
    form = declared or tensor[1]
    evidence = []
    if declared is not None:
        evidence.append("quantization_config in config.json")
    if tensor is not None:
        evidence.append(f"tensors such as '{tensor[0]}' ({reader.tensors[tensor[0]].dtype})")
    return (
        f"model '{reader.label}' is quantized ({form}: "
        f"{' and '.join(evidence)}); della reads fp8 and mxfp4 checkpoints whose config.json "
        "declares them (quant_method fp8, compressed-tensors float-quantized, mxfp4) and "
        "unquantized ones: merge the model's bf16/fp16 checkpoint, or dequantize it first"
    )


def refuse_quantized(readers: Iterable[ModelReader | None]) -> None:
    """Raise ModelError (exit 2) for the first quantized model among ``readers``."""
    for reader in readers:
        problem = reader and quantization_problem(reader)
        if problem:
            raise ModelError(problem)
