"""A quantized checkpoint seen as the float32 model it stands for.

``DequantizedReader`` wraps the reader of an FP8 or MXFP4 checkpoint and shows what the plan
and the engine merge: each quantized weight under its model name, as a float32 tensor of the
model's shape, and none of the scale tensors. Rows are dequantized as they are read, a block
at a time, so memory stays bounded as for any other input. Its config.json is the base's
without ``quantization_config``: what it hands out is no longer quantized, and an output
written from it must not claim to be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from della_cli.io.buffers import BufferPool
from della_cli.io.header import TensorInfo
from della_cli.io.reader import ModelReader
from della_cli.io.streamed_sum import FileSpan
from della_cli.quant.detect import Scheme
from della_cli.quant.fp8_blocks import ScaledWeight, check_scales, dequantize_rows, scale_rows
from della_cli.quant.mxfp4 import PackedExperts, check_exponents, dequantize_experts

# What a dequantized weight is written as when the recipe names no out_dtype: the dtype the
# published unquantized twins of these models use.
DEQUANTIZED_OUT_DTYPE = "BF16"


@dataclass(frozen=True)
class DequantizedInfo(TensorInfo):
    """A weight as dequantized: ``dtype`` F32, the model's shape; ``path`` and ``offset``
    those of its stored values (for the plan's file order); ``stored_as`` their format."""

    stored_as: str = "fp8"


def written_dtype(info: TensorInfo) -> str:
    """The dtype a tensor is written in when the recipe names none: its own, but bfloat16
    for a dequantized weight (float32 would double the unquantized model's size)."""
    return DEQUANTIZED_OUT_DTYPE if isinstance(info, DequantizedInfo) else info.dtype


def unquantized_config(config: dict | None) -> dict | None:
    """config.json without its quantization settings (also inside ``text_config``)."""
    if config is None:
        return None
    plain = {k: v for k, v in config.items() if k not in ("quantization_config",)}
    text_config = plain.get("text_config")
    if isinstance(text_config, dict) and "quantization_config" in text_config:
        plain["text_config"] = {k: v for k, v in text_config.items() if k != "quantization_config"}
    return plain


class DequantizedReader(ModelReader):
    """A quantized model folder behind the ``ModelReader`` interface, dequantized on read."""

    def __init__(self, raw: ModelReader, scheme: Scheme):
        self.raw = raw
        self.scheme = scheme
        self.folder, self.label, self.root = raw.folder, raw.label, raw.root
        self.weight_map, self.shadowed = raw.weight_map, raw.shadowed
        self.config = unquantized_config(raw.config)
        self._handles = {}
        self.tensors: dict[str, TensorInfo] = {}
        stored_at = {stored_name(s): name for name, s in scheme.weights.items()}
        for name, info in raw.tensors.items():
            if name in stored_at:
                logical = stored_at[name]
                shape = scheme.weights[logical].shape
                self.tensors[logical] = DequantizedInfo(
                    logical,
                    "F32",
                    shape,
                    info.path,
                    info.offset,
                    4 * math.prod(shape),
                    scheme.form,
                )
            elif name not in scheme.hidden:
                self.tensors[name] = info

    def has_row_spans(self, name: str) -> bool:
        return name not in self.scheme.weights and self.raw.has_row_spans(name)

    def read(self, name: str) -> np.ndarray:
        if name not in self.scheme.weights:
            return self.raw.read(name)
        shape = self.tensors[name].shape
        return self.read_rows(name, 0, shape[0]).reshape(shape)

    def read_rows(
        self, name: str, start: int, stop: int, pool: BufferPool | None = None
    ) -> np.ndarray:
        """Rows ``start:stop`` as in ``ModelReader.read_rows``; a quantized weight's come
        dequantized to float32 (into a new array: ``pool`` holds buffers of stored rows)."""
        if name not in self.scheme.weights:
            return self.raw.read_rows(name, start, stop, pool)
        return self.stored_rows(name, start, stop).dequantized(self.label)

    def stored_rows(self, name: str, start: int, stop: int) -> QuantizedRows:
        """Rows ``start:stop`` of quantized weight ``name`` as stored, with their scales,
        checked (ModelError naming the scale tensor): what ``read_rows`` dequantizes on the
        CPU, and what a CUDA device receives to dequantize itself (``quant.placement``)."""
        stored = self.scheme.weights[name]
        if isinstance(stored, PackedExperts):
            blocks = self.raw.read_rows(stored.blocks, start, stop)
            scales = self.raw.read_rows(stored.scales, start, stop)
            _, rows, groups = PackedExperts.stored_shapes(stored.shape)[1]
            check_exponents(scales.reshape(-1, rows, groups), stored, self.label, start)
            return QuantizedRows(stored, blocks, scales, start)
        weight = self.raw.read_rows(stored.weight, start, stop)
        return QuantizedRows(stored, weight, self._scales(stored, start, stop), start)

    def _scales(self, stored: ScaledWeight, start: int, stop: int) -> np.ndarray:
        """The scales of weight rows ``start:stop``, checked to be positive and finite."""
        if stored.block is None and not stored.per_channel:
            scales = self.raw.read(stored.scale)
        else:
            first, last = scale_rows(stored, start, stop)
            scales = self.raw.read_rows(stored.scale, first, last)
        check_scales(scales, self.label, stored.scale)
        return scales

    def row_span(self, name: str, start: int) -> FileSpan:
        if name in self.scheme.weights:
            raise ValueError(f"'{name}' is dequantized on read; its rows are not in a file")
        return self.raw.row_span(name, start)

    def close(self) -> None:
        self.raw.close()


def stored_name(stored: ScaledWeight | PackedExperts) -> str:
    """The stored tensor whose place in the file the logical weight takes."""
    return stored.blocks if isinstance(stored, PackedExperts) else stored.weight


@dataclass(frozen=True)
class QuantizedRows:
    """Rows of a quantized weight as stored (``values``: FP8 bytes or MXFP4 blocks, (n, -1))
    with their ``scales``, rows ``start:start+n`` of the logical weight seen as (rows, -1).
    What travels to a CUDA device in place of float32 rows, a quarter of their bytes (an
    eighth for MXFP4), to be dequantized there by the torch rules (``quant.torch_rules``); on
    the CPU, ``dequantized`` applies numpy's."""

    stored: ScaledWeight | PackedExperts
    values: np.ndarray
    scales: np.ndarray
    start: int

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the float32 rows they stand for."""
        count = self.values.shape[0]
        return count, math.prod(self.stored.shape) // self.stored.shape[0]

    @property
    def size(self) -> int:
        """How many float32 entries they stand for (as ``numpy.ndarray.size``)."""
        return math.prod(self.shape)

    def dequantized(self, label: str = "") -> np.ndarray:
        """The float32 rows, by the CPU's rules (``label``: the model, for an error)."""
        if isinstance(self.stored, PackedExperts):
            return dequantize_experts(self.stored, self.values, self.scales, label, self.start)
        return dequantize_rows(self.stored, self.values, self.scales, self.start)

    def on_device(self, device):
        """The float32 rows as a torch tensor on ``device``, dequantized there: what the torch
        backend receives (imports torch)."""
        from della_cli.quant.torch_rules import dequantized_on

        return dequantized_on(self, device)
