"""FP8 weights with scales, dequantized to float32 a block of rows at a time.

Two families store a ``float8_e4m3fn`` weight beside float scales, and mean ``weight * scale``:

- fine-grained FP8 (DeepSeek-V3/R1, Qwen3 FP8 releases; ``quant_method: fp8``): one
  ``weight_scale_inv`` per ``weight_block_size`` block, (128, 128) in every release, so a
  weight of shape (N, K) has scales of shape (ceil(N/128), ceil(K/128)); the last row and
  column of blocks are ragged when N or K is not a multiple (transformers'
  ``integrations/finegrained_fp8.py`` dequantizes the same way: scales repeated over the
  block and cropped to the weight). Despite its name, ``weight_scale_inv`` multiplies.
- compressed-tensors ``float-quantized`` (``quant_method: compressed-tensors``): one
  ``weight_scale`` for the whole tensor, one per output channel (shape (N, 1)), or one per
  block as above; dequantized as ``weight * weight_scale`` too.

A scale reads as its own dtype widened to float32; the product is exact in float32 for a
float32 scale times an e4m3 value (4 + 24 significant bits fit no better: it is rounded once,
as transformers rounds it in float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from della_cli.errors import ModelError

# Every e4m3 byte's value: a table lookup widens four times faster than ml_dtypes' cast.
E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


@dataclass(frozen=True)
class ScaledWeight:
    """How one logical weight is stored: its FP8 tensor, its scale tensor, and the scale
    layout, ``block`` (rows, columns) per scale, or None for one scale per tensor
    (``per_channel``: one per row)."""

    weight: str
    scale: str
    shape: tuple[int, ...]
    block: tuple[int, int] | None = None
    per_channel: bool = False

    def scale_shape(self) -> tuple[int, ...]:
        """The shape the scale tensor must have (per tensor: () or (1,), checked apart)."""
        *lead, rows, columns = self.shape
        if self.block is not None:
            return (*lead, math.ceil(rows / self.block[0]), math.ceil(columns / self.block[1]))
        return (*lead, rows, 1) if self.per_channel else ()


def check_scales(scales: np.ndarray, label: str, name: str) -> None:
    """Refuse a scale that is not a positive finite number: it would turn a whole block of
    weights into NaN, infinity or zero without any other sign."""
    values = scales.astype(np.float32)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        where = np.unravel_index(int(np.argmax(bad)), values.shape)
        raise ModelError(
            f"model '{label}': scale tensor '{name}' holds {float(values[where])!r} at "
            f"{tuple(int(i) for i in where)}; scales must be positive and finite, the "
            "checkpoint is corrupt"
        )


def scale_rows(stored: ScaledWeight, start: int, stop: int) -> tuple[int, int]:
    """The rows of the scale tensor (seen as rows of its first dimension) that cover weight
    rows ``start:stop``, the weight seen as (shape[0], -1)."""
    if len(stored.shape) > 2 or stored.per_channel:
        return start, stop  # one scale row per weight row (stacked experts: per expert)
    rows_per_scale = stored.block[0]
    return start // rows_per_scale, math.ceil(stop / rows_per_scale)


def dequantize_rows(
    stored: ScaledWeight, weight: np.ndarray, scales: np.ndarray, start: int
) -> np.ndarray:
    """Float32 rows of the logical weight from its stored rows.

    ``weight``: rows ``start:start+n`` of the FP8 weight, shape (n, -1); ``scales``: the scale
    rows ``scale_rows`` names (the whole tensor per tensor). Returns shape (n, -1)."""
    count = weight.shape[0]
    values = E4M3_VALUES[weight.view(np.uint8)]
    if stored.block is None and not stored.per_channel:
        return values * np.float32(scales.reshape(-1)[0])
    if stored.per_channel:
        return values * scales.astype(np.float32).reshape(count, 1)
    *lead, rows, columns = stored.shape
    block_rows, block_columns = stored.block
    grid = scales.astype(np.float32)
    if lead:  # stacked experts: each weight row is one expert's (rows, columns) matrix
        grid = grid.reshape(count, *stored.scale_shape()[-2:])
        expanded = np.repeat(np.repeat(grid, block_rows, axis=1), block_columns, axis=2)
        expanded = expanded[:, :rows, :columns]
        return (values.reshape(count, rows, columns) * expanded).reshape(count, -1)
    per_column = np.repeat(grid, block_columns, axis=1)[:, :columns]
    band = start // block_rows  # the first scale row, ``grid``'s row 0
    row = start
    while row < start + count:  # one band of rows at a time shares a row of scales
        end = min((row // block_rows + 1) * block_rows, start + count)
        values[row - start : end - start] *= per_column[row // block_rows - band]
        row = end
    return values
