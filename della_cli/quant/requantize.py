"""Writing merged weights back in the base's FP8 format (``out_dtype: fp8``).

The engine merges a quantized weight in float32, as for any other; this writer turns its rows
into the base's layout as they arrive: e4m3 values and a float32 ``weight_scale_inv`` per
block (fine-grained FP8), or a scale per row (compressed-tensors per channel). Rows are held
only until a band of blocks is complete (128 rows of a DeepSeek-V3 weight, 3.5 MiB), then
quantized and handed on; a weight's scales follow it, in the same shard (the plan keeps the
pair together, so that a resumed merge never finds a scale without its weight).

Rounding follows the formats' reference quantizers: transformers' ``Fp8Quantize``
(``integrations/finegrained_fp8.py``) for blocks, the convention of DeepSeek-V3's
``inference/kernel.py``, where ``weight_scale_inv`` multiplies: per block ``scale = 448 /
amax`` (1 for an all-zero block), values ``clamp(weight * scale, -448, 448)`` cast to e4m3
with round-to-nearest-even, and ``1 / scale`` stored as float32; compressed-tensors'
``quantize`` for channels: ``scale = amax / 448`` in the scale tensor's dtype, values
``clamp(weight / scale)`` cast the same way. An MXFP4 base's experts (``out_dtype: mxfp4``) are
written as its ``*_blocks`` and ``*_scales``, one expert per row, with triton_kernels' rounding
(``quant.mxfp4``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from della_cli.io.dtypes import NUMPY_DTYPES
from della_cli.io.reader import ModelReader
from della_cli.io.writer import OutputTensor, ShardWriter, split_into_shards
from della_cli.quant.detect import ACTIVATION_SCALES, Scheme, quantization_config
from della_cli.quant.fp8_blocks import ScaledWeight
from della_cli.quant.mxfp4 import PackedExperts, quantize_experts

FP8_MAX = 448.0
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


@dataclass(frozen=True)
class Requantize:
    """How a merged weight is written: its scale tensor's name, dtype and shape, and the
    layout (``block`` rows and columns per scale, or one scale per row)."""

    scale: str
    scale_dtype: str
    scale_shape: tuple[int, ...]
    block: tuple[int, int] | None  # None: one scale per row (compressed-tensors channel)
    # MXFP4: the U8 tensor the values are packed into ('<name>_blocks') and its shape; None:
    # FP8 values under the weight's own name
    packed: tuple[str, tuple[int, ...]] | None = None

    def values_name(self, name: str) -> str:
        """The output tensor that holds weight ``name``'s values."""
        return name if self.packed is None else self.packed[0]


# out_dtype -> the base formats it writes back
OUTPUT_FORMATS = {"fp8": ("fp8", "compressed-tensors"), "mxfp4": ("mxfp4",)}


def output_problem(reader: ModelReader, out_dtype: str) -> str | None:
    """Why ``out_dtype`` (fp8 or mxfp4) cannot write the base ``reader``'s format; None when
    it can."""
    scheme = getattr(reader, "scheme", None)
    fix = "choose out_dtype bfloat16"
    if scheme is None or scheme.form not in OUTPUT_FORMATS[out_dtype]:
        what = "is not quantized" if scheme is None else f"is {scheme.form}"
        return (
            f"out_dtype {out_dtype} writes the base's own {out_dtype.upper()} format, but "
            f"'{reader.label}' {what}; {fix}"
        )
    if scheme.form == "mxfp4":
        return None
    return _fp8_problem(reader, scheme, fix)


def _fp8_problem(reader: ModelReader, scheme: Scheme, fix: str) -> str | None:
    """What an FP8 base holds that cannot be written back as rows stream."""
    for name, stored in scheme.weights.items():
        if stored.block is None and not stored.per_channel:
            return (
                f"out_dtype fp8: '{name}' of '{reader.label}' has one scale for the whole "
                f"tensor, which cannot be written as rows stream; {fix}"
            )
    static = sorted(name for name in scheme.hidden if name.endswith(ACTIVATION_SCALES))
    if static:
        return (
            f"out_dtype fp8: '{reader.label}' has static activation scales ('{static[0]}'), "
            f"which a merge cannot recompute; {fix}"
        )
    return None


def requantization(reader: ModelReader, name: str) -> Requantize | None:
    """How tensor ``name`` of the base is written in its FP8 or MXFP4 format; None for a
    tensor the base does not store quantized."""
    scheme = getattr(reader, "scheme", None)
    stored = scheme.weights.get(name) if scheme is not None else None
    if isinstance(stored, PackedExperts):
        blocks, scales = PackedExperts.stored_shapes(stored.shape)
        return Requantize(stored.scales, "U8", scales, None, (stored.blocks, blocks))
    if not isinstance(stored, ScaledWeight):
        return None
    scale = reader.raw.tensors[stored.scale]
    if stored.block is not None:  # the reference quantizer's float32 inverse scales
        return Requantize(stored.scale, "F32", scale.shape, stored.block)
    return Requantize(stored.scale, scale.dtype, scale.shape, None)


def output_shards(
    reader: ModelReader, jobs: Sequence, max_shard_bytes: int
) -> tuple[list[list[OutputTensor]], dict]:
    """The output's shards, each FP8 weight (MXFP4 blocks) with its scales, and the
    quantization_config that says so (the base's)."""
    tensors, pairs = [], {}
    for job in jobs:
        if job.requantize is None:
            tensors.append(OutputTensor(job.name, job.out_dtype, job.shape))
        else:
            tensors += output_tensors(job.name, job.shape, job.requantize)
            pairs[job.requantize.values_name(job.name)] = job.requantize.scale
    return shards_keeping_pairs(tensors, pairs, max_shard_bytes), quantization_config(
        reader.raw.config
    )


def requantizing(writer: ShardWriter, jobs: Sequence) -> ShardWriter | RequantizingWriter:
    """``writer``, wrapped to requantize where a job says so."""
    requantized = {job.name: (job.shape, job.requantize) for job in jobs if job.requantize}
    return RequantizingWriter(writer, requantized) if requantized else writer


def with_quantization(config: dict | None, quantization: dict | None) -> dict | None:
    """The output's config.json: the base's, with its quantization_config when the output is
    written in the base's format."""
    if config is None or quantization is None:
        return config
    return {**config, "quantization_config": quantization}


def output_tensors(name: str, shape: tuple[int, ...], how: Requantize) -> list[OutputTensor]:
    values = (
        OutputTensor(name, "F8_E4M3", shape)
        if how.packed is None
        else OutputTensor(how.packed[0], "U8", how.packed[1])
    )
    return [values, OutputTensor(how.scale, how.scale_dtype, how.scale_shape)]


def shards_keeping_pairs(
    tensors: Sequence[OutputTensor], pairs: dict[str, str], max_shard_bytes: int
) -> list[list[OutputTensor]]:
    """``split_into_shards``, with each FP8 weight and its scale tensor (``pairs``: weight
    name -> scale name) in one shard."""
    scales = set(pairs.values())
    units = [t for t in tensors if t.name not in scales]
    by_name = {t.name: t for t in tensors}
    joined = [
        OutputTensor(t.name, "U8", (t.nbytes + by_name[pairs[t.name]].nbytes,))
        if t.name in pairs
        else t
        for t in units
    ]
    shards = split_into_shards(joined, max_shard_bytes)
    return [
        [
            item
            for t in shard
            for item in (
                [by_name[t.name], by_name[pairs[t.name]]] if t.name in pairs else [by_name[t.name]]
            )
        ]
        for shard in shards
    ]


def quantize_blocks(values: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """e4m3 values and float32 inverse scales of a float32 matrix (rows, columns), its last
    band and column of blocks ragged where the shape is not a multiple of the block."""
    rows, columns = values.shape
    grid = (math.ceil(rows / block[0]), math.ceil(columns / block[1]))
    padded = np.zeros((grid[0] * block[0], grid[1] * block[1]), np.float32)
    padded[:rows, :columns] = values
    tiles = padded.reshape(grid[0], block[0], grid[1], block[1])
    amax = np.abs(tiles).max(axis=(1, 3))
    scale = np.where(amax > 0, np.float32(FP8_MAX) / np.where(amax > 0, amax, 1), 1).astype(
        np.float32
    )
    scaled = tiles * scale[:, None, :, None]
    quantized = np.clip(scaled, -FP8_MAX, FP8_MAX).reshape(padded.shape)[:rows, :columns]
    return quantized.astype(FP8), (np.float32(1) / scale).astype(np.float32)


def quantize_channels(values: np.ndarray, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """e4m3 values and per-row scales (rows, 1) in ``scale_dtype``."""
    amax = np.abs(values).max(axis=1, keepdims=True)
    stored = np.where(amax > 0, amax / np.float32(FP8_MAX), 1).astype(NUMPY_DTYPES[scale_dtype])
    quantized = np.clip(values / stored.astype(np.float32), -FP8_MAX, FP8_MAX)
    return quantized.astype(FP8), stored


class RequantizingWriter:
    """A ``ShardWriter`` that takes the float32 rows of requantized weights and writes their
    FP8 values and, after the last rows, their scales; everything else passes through."""

    def __init__(
        self, writer: ShardWriter, requantized: dict[str, tuple[tuple[int, ...], Requantize]]
    ):
        self.writer = writer
        self.requantized = requantized  # weight name -> (its shape, how)
        self._held: list[np.ndarray] = []
        self._rows_done = 0
        self._scales: list[np.ndarray] = []
        scales = {how.scale for _, how in requantized.values()}
        self._tensor_positions = [
            index
            for index, tensor in enumerate(t for s in writer.shards for t in s)
            if tensor.name not in scales
        ]

    @property
    def next_index(self) -> int:
        """Position of the next job (the engine's), each weight and its scale one job."""
        return sum(1 for position in self._tensor_positions if position < self.writer.next_index)

    def file_offset(self, name: str, byte_offset: int = 0) -> int:
        stored = self.requantized.get(name)
        return self.writer.file_offset(stored[1].values_name(name) if stored else name, byte_offset)

    def write(self, name: str, tensor: np.ndarray) -> None:
        self.write_part(name, tensor.reshape(tensor.shape[0], -1) if tensor.ndim > 1 else tensor)

    def write_part(self, name: str, part: np.ndarray) -> None:
        if name not in self.requantized:
            self.writer.write_part(name, part)
            return
        shape, how = self.requantized[name]
        rows = shape[0]
        arrived = np.asarray(part, np.float32).reshape(part.shape[0], -1)
        joined = np.concatenate([*self._held, arrived]) if self._held else arrived
        band = how.block[0] if how.block is not None and len(shape) == 2 else 1
        complete = self._rows_done + len(joined) == rows
        ready = len(joined) if complete else len(joined) - len(joined) % band
        if ready:
            self._emit(name, shape, how, joined[:ready])
        # the engine recycles ``part``'s buffer once this returns: what waits is copied
        self._held = [joined[ready:].copy()] if ready < len(joined) else []
        if self._rows_done == rows:
            scales = np.concatenate(self._scales).reshape(how.scale_shape)
            self._rows_done, self._scales = 0, []
            self.writer.write_part(how.scale, scales)

    def _emit(self, name: str, shape: tuple[int, ...], how: Requantize, rows: np.ndarray) -> None:
        self._rows_done += len(rows)
        if how.packed is not None:  # MXFP4 experts: each row one expert
            values, scales = quantize_experts(shape, rows, name)
            self._scales.append(scales)
            self.writer.write_part(how.packed[0], values)
            return
        if how.block is None:
            values, scales = quantize_channels(rows, how.scale_dtype)
        elif len(shape) == 2:
            values, scales = quantize_blocks(rows, how.block)
        else:  # stacked experts: each row one matrix
            pieces = [quantize_blocks(row.reshape(shape[-2:]), how.block) for row in rows]
            values = np.stack([v for v, _ in pieces]).reshape(len(rows), -1)
            scales = np.stack([s for _, s in pieces])
        self._scales.append(scales)
        self.writer.write_part(name, values)

    def close(self) -> list[str]:
        return self.writer.close()

    def abort(self) -> None:
        self.writer.abort()
