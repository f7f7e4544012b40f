"""MXFP4 expert weights (gpt-oss), dequantized to float32 one expert at a time.

gpt-oss stores each MoE projection of its experts as two tensors (``quant_method: mxfp4``,
the OCP Microscaling format): ``<name>_blocks``, U8 of shape (experts, rows, groups, 16),
each byte two FP4 (E2M1) codes, the low nibble first; and ``<name>_scales``, U8 of shape
(experts, rows, groups), one E8M0 exponent per group of 32 values, biased by 127. A value is
``FP4[code] * 2**(scale - 127)``. The model's own parameter is the transpose of the stored
rows: (experts, groups * 32, rows), as transformers' ``integrations/mxfp4.py``
(``convert_moe_packed_tensors``) builds it, so that is the logical tensor della merges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from della_cli.errors import ModelError

# The sixteen E2M1 values by code: sign bit, two exponent bits, one mantissa bit.
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
GROUP = 32  # values per E8M0 scale
E8M0_BIAS = 127
E8M0_NAN = 255


@dataclass(frozen=True)
class PackedExperts:
    """One logical expert tensor: its blocks and scales tensors and its logical shape
    (experts, groups * 32, rows)."""

    blocks: str
    scales: str
    shape: tuple[int, int, int]

    @staticmethod
    def stored_shapes(shape: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The blocks and scales shapes a logical shape is stored in."""
        experts, columns, rows = shape
        return (experts, rows, columns // GROUP, GROUP // 2), (experts, rows, columns // GROUP)


def logical_shape(blocks: tuple[int, ...]) -> tuple[int, int, int] | None:
    """The logical shape of a blocks tensor of shape (experts, rows, groups, 16); None for
    any other layout."""
    if len(blocks) != 4 or blocks[3] != GROUP // 2:
        return None
    experts, rows, groups, _ = blocks
    return experts, groups * GROUP, rows


def dequantize_experts(
    packed: PackedExperts, blocks: np.ndarray, scales: np.ndarray, label: str
) -> np.ndarray:
    """Float32 rows (one per expert) of the logical tensor, from those experts' stored
    ``blocks`` (n, -1) and ``scales`` (n, -1). Returns shape (n, groups * 32 * rows)."""
    count = blocks.shape[0]
    _, columns, rows = packed.shape
    groups = columns // GROUP
    codes = blocks.reshape(count, rows, groups, GROUP // 2)
    exponents = scales.reshape(count, rows, groups)
    if (exponents == E8M0_NAN).any():
        where = np.unravel_index(int(np.argmax(exponents == E8M0_NAN)), exponents.shape)
        raise ModelError(
            f"model '{label}': scale tensor '{packed.scales}' holds the E8M0 NaN (255) at "
            f"expert row {tuple(int(i) for i in where)}; the checkpoint is corrupt"
        )
    values = np.empty((count, rows, groups, GROUP), dtype=np.float32)
    values[..., 0::2] = FP4_VALUES[codes & 0x0F]
    values[..., 1::2] = FP4_VALUES[codes >> 4]
    powers = exponents.astype(np.int32) - E8M0_BIAS
    values = np.ldexp(values, powers[..., None])
    # (n, rows, columns) stored; the parameter is (n, columns, rows)
    return values.reshape(count, rows, columns).transpose(0, 2, 1).reshape(count, -1)
