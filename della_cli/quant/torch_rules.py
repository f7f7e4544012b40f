"""The torch backend's dequantization: FP8 with block, channel or tensor scales and MXFP4
experts, on the device that merges them.

On CUDA the reader hands the torch backend rows as stored (``view.QuantizedRows``): one byte
per FP8 value, half a byte per MXFP4 value, with their scales, a quarter (an eighth) of the
float32 rows' bytes to copy to the device, and they are dequantized there. These are the same
rules as the CPU's numpy ones (``fp8_blocks.dequantize_rows``, ``mxfp4.dequantize_experts``),
written once for torch, and they give the same bits: an e4m3 byte widens exactly to float32,
a scale too, and their one float32 product is correctly rounded on every device; an MXFP4
value (at most two significant bits) times a power of two is exact, the power built from its
bits rather than by ``pow``. The scales were checked on the CPU as they were read, with the
same one-line errors as the CPU path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from della_cli.io.dtypes import to_torch
from della_cli.quant.fp8_blocks import E4M3_VALUES, ScaledWeight
from della_cli.quant.mxfp4 import FP4_VALUES, GROUP, PackedExperts

if TYPE_CHECKING:
    from della_cli.quant.view import QuantizedRows

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}
# E8M0 exponent 0 stands for 2**-127, a float32 subnormal: its bits are not ``0 << 23``
_SMALLEST_SCALE_BITS = 1 << 22


def dequantized_on(rows: QuantizedRows, device: torch.device | str) -> torch.Tensor:
    """``rows`` as float32 on ``device``, shape (n, -1) (``QuantizedRows.shape``)."""
    device = torch.device(device)
    values = to_torch(rows.values).to(device, non_blocking=True)
    scales = to_torch(rows.scales).to(device, non_blocking=True)
    if isinstance(rows.stored, PackedExperts):
        return dequantize_experts(rows.stored, values, scales)
    return dequantize_fp8_rows(rows.stored, values, scales, rows.start)


def _table(name: str, device: torch.device) -> torch.Tensor:
    """A value table (every e4m3 byte's float32, the 16 E2M1 values) on ``device``, once."""
    key = (name, device)
    if key not in _TABLES:
        source = E4M3_VALUES if name == "e4m3" else FP4_VALUES
        _TABLES[key] = torch.from_numpy(source.copy()).to(device)
    return _TABLES[key]


def dequantize_fp8_rows(
    stored: ScaledWeight, weight: torch.Tensor, scales: torch.Tensor, start: int
) -> torch.Tensor:
    """Float32 rows of the logical weight from its stored FP8 rows ``start:start+n`` (n, -1)
    and the scale rows that cover them (``fp8_blocks.scale_rows``; the whole tensor per
    tensor): ``fp8_blocks.dequantize_rows`` in torch."""
    count = weight.shape[0]
    # a table lookup, as the CPU's: the same NaN bits for e4m3's NaN bytes
    values = _table("e4m3", weight.device)[weight.view(torch.uint8).long()]
    grid = scales.float()
    if stored.block is None and not stored.per_channel:
        return values * grid.reshape(-1)[0]
    if stored.per_channel:
        return values * grid.reshape(count, 1)
    *lead, rows, columns = stored.shape
    block_rows, block_columns = stored.block
    if lead:  # stacked experts: each weight row is one expert's (rows, columns) matrix
        grid = grid.reshape(count, *stored.scale_shape()[-2:])
        expanded = grid.repeat_interleave(block_rows, 1).repeat_interleave(block_columns, 2)
        expanded = expanded[:, :rows, :columns]
        return (values.reshape(count, rows, columns) * expanded).reshape(count, -1)
    per_column = grid.repeat_interleave(block_columns, 1)[:, :columns]
    # each row's band of scales, counted from the first scale row read (``grid``'s row 0)
    band = torch.arange(start, start + count, device=weight.device) // block_rows
    return values * per_column[band - start // block_rows]


def dequantize_experts(
    packed: PackedExperts, blocks: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Float32 rows (one per expert) of the logical tensor from those experts' blocks and
    scales (n, -1): ``mxfp4.dequantize_experts`` in torch. Returns (n, groups * 32 * rows)."""
    count = blocks.shape[0]
    _, columns, rows = packed.shape
    groups = columns // GROUP
    codes = blocks.reshape(count, rows, groups, GROUP // 2).long()
    table = _table("fp4", blocks.device)
    values = torch.stack((table[codes & 0x0F], table[codes >> 4]), dim=-1)  # low nibble first
    exponents = scales.reshape(count, rows, groups).to(torch.int32)
    # 2**(e - 127) is the float32 whose exponent field is e (for e from 1 to 254)
    bits = torch.where(exponents == 0, _SMALLEST_SCALE_BITS, exponents << 23)
    powers = bits.view(torch.float32)
    values = values.reshape(count, rows, groups, GROUP) * powers[..., None]
    # (n, rows, columns) stored; the parameter is (n, columns, rows)
    return values.reshape(count, rows, columns).transpose(1, 2).reshape(count, -1)
