"""Quantized checkpoints della reads: FP8 with block, channel or tensor scales (DeepSeek-V3/R1,
Qwen3 FP8, compressed-tensors ``float-quantized``) and MXFP4 experts (gpt-oss), dequantized to
float32 as their rows are read. ``dequantizing`` opens that view of a model; other formats
pass through unchanged and are refused by the plan (``della_cli.quantized``)."""

from __future__ import annotations

from della_cli.io.reader import ModelReader
from della_cli.quant.detect import recognise


def dequantizing(reader: ModelReader) -> ModelReader:
    """``reader`` itself, or for a checkpoint in a format della reads, its dequantized view
    (checked from the headers: ModelError, exit 2, for a malformed layout)."""
    scheme = recognise(reader)
    if scheme is None:
        return reader
    from della_cli.quant.view import DequantizedReader

    return DequantizedReader(reader, scheme)
