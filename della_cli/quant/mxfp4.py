"""MXFP4 expert weights (gpt-oss), dequantized to float32 one expert at a time.

gpt-oss stores each MoE projection of its experts as two tensors (``quant_method: mxfp4``,
the OCP Microscaling format): ``<name>_blocks``, U8 of shape (experts, rows, groups, 16),
each byte two FP4 (E2M1) codes, the low nibble first; and ``<name>_scales``, U8 of shape
(experts, rows, groups), one E8M0 exponent per group of 32 values, biased by 127. A value is
``FP4[code] * 2**(scale - 127)``. The model's own parameter is the transpose of the stored
rows: (experts, groups * 32, rows), as transformers' ``integrations/mxfp4.py``
(``convert_moe_packed_tensors``) builds it, so that is the logical tensor della merges.

Writing (``out_dtype: mxfp4``) follows the quantizer MXFP4 checkpoints are made with in this
ecosystem, triton_kernels' ``downcast_to_mxfp_torch`` (``numerics_details/mxfp.py``, default
``ROUND_UP``), which transformers' ``quantize_to_mxfp4`` calls: per group the scale is the
smallest power of two at or above ``amax / 6`` (computed in float32), so that no value of the
group exceeds FP4's largest, 6; each value divided by it is rounded to the nearest E2M1 value,
ties away from zero, the sign kept even where the value rounds to zero (code 8, -0). The OCP
MX v1.0 specification (section 6.3) instead takes ``2**(floor(log2(amax)) - 2)``, which keeps
one more bit for small values but clamps a group's largest values, up to a quarter of their
magnitude, to 6; docs/ALGORITHMS.md compares the two.
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
# Halfway between consecutive E2M1 magnitudes: a scaled value at or past one takes the larger.
FP4_MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)
FP4_MAX = 6.0
# The midpoints are multiples of 1/4, so the magnitude code of x in [0, 6] depends only on
# floor(4x): the number of midpoints at or below it (a table lookup, not a binary search).
_CODE_OF_QUARTERS = np.array(
    [np.count_nonzero(q / 4 >= FP4_MIDPOINTS) for q in range(25)], dtype=np.uint8
)
GROUP = 32  # values per E8M0 scale
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


def check_exponents(exponents: np.ndarray, packed: PackedExperts, label: str, first: int) -> None:
    """Refuse the E8M0 NaN (255), the one exponent that is no scale (E8M0 has no zero,
    infinity or sign: 0 is 2**-127). ``exponents``: experts ``first:`` of the scales,
    (n, rows, groups)."""
    if (exponents == E8M0_NAN).any():
        expert, row, group = np.unravel_index(
            int(np.argmax(exponents == E8M0_NAN)), exponents.shape
        )
        raise ModelError(
            f"model '{label}': scale tensor '{packed.scales}' holds the E8M0 NaN (255) at "
            f"(expert, row, group) {(first + int(expert), int(row), int(group))}; the "
            "checkpoint is corrupt"
        )


def dequantize_experts(
    packed: PackedExperts, blocks: np.ndarray, scales: np.ndarray, label: str, first: int = 0
) -> np.ndarray:
    """Float32 rows (one per expert) of the logical tensor, from experts ``first:``'s stored
    ``blocks`` (n, -1) and ``scales`` (n, -1). Returns shape (n, groups * 32 * rows)."""
    count = blocks.shape[0]
    _, columns, rows = packed.shape
    groups = columns // GROUP
    codes = blocks.reshape(count, rows, groups, GROUP // 2)
    exponents = scales.reshape(count, rows, groups)
    check_exponents(exponents, packed, label, first)
    values = np.empty((count, rows, groups, GROUP), dtype=np.float32)
    values[..., 0::2] = FP4_VALUES[codes & 0x0F]
    values[..., 1::2] = FP4_VALUES[codes >> 4]
    # 2**(e - 127) is the float32 whose exponent field is e (1 to 254); e = 0 stands for
    # 2**-127, a subnormal. Each product is exact (an E2M1 value has two significant bits),
    # but 6 * 2**127, past float32's range: infinity, which the engine reports as any input's
    bits = np.where(exponents == 0, np.uint32(1 << 22), exponents.astype(np.uint32) << 23)
    with np.errstate(over="ignore"):
        values *= bits.view(np.float32)[..., None]
    # (n, rows, columns) stored; the parameter is (n, columns, rows)
    return values.reshape(count, rows, columns).transpose(0, 2, 1).reshape(count, -1)


def e8m0_exponents(amax: np.ndarray) -> np.ndarray:
    """The biased E8M0 exponent of each group's scale: the smallest power of two at or above
    ``amax / 6`` in float32 (0, the smallest, for an all-zero group). ``amax`` finite."""
    wanted = (amax.astype(np.float32) / np.float32(FP4_MAX)).astype(np.float32)
    # a positive float32 rounded up to a power of two: carry any mantissa bit into the
    # exponent field, which then holds the biased exponent E8M0 stores (both use bias 127)
    return ((wanted.view(np.uint32) + np.uint32(0x7FFFFF)) >> np.uint32(23)).astype(np.uint8)


def fp4_codes(scaled: np.ndarray) -> np.ndarray:
    """E2M1 codes of float32 values already divided by their scale: the nearest magnitude,
    ties away from zero, 6 for anything larger; the sign bit (8) from the value's sign, -0
    included."""
    # 4x is exact, and the cast truncates: floor for a magnitude
    quarters = np.minimum(np.abs(scaled) * np.float32(4), np.float32(24)).astype(np.uint8)
    return _CODE_OF_QUARTERS[quarters] | (np.signbit(scaled).view(np.uint8) << 3)


def quantize_experts(
    shape: tuple[int, int, int], values: np.ndarray, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """The stored blocks (n, rows * groups * 16) and scales (n, rows * groups), uint8, of
    float32 rows (one per expert, shape (n, groups * 32 * rows)) of a logical tensor of
    ``shape`` (experts, groups * 32, rows). Raises ModelError for a non-finite value, which
    no E8M0 scale can hold."""
    count = values.shape[0]
    _, columns, rows = shape
    groups = values.reshape(count, columns, rows).transpose(0, 2, 1)
    groups = groups.reshape(count, rows, columns // GROUP, GROUP)
    if not np.isfinite(groups).all():
        raise ModelError(
            f"merged tensor '{name}' holds NaN or infinity, which MXFP4 cannot store; "
            "check the models' weights or choose out_dtype bfloat16"
        )
    exponents = e8m0_exponents(np.abs(groups).max(axis=-1))
    # 1 / 2**(e - 127) = 2**(127 - e), the float32 of exponent field 254 - e (normal for every
    # e from 0 to 253): multiplying by it is exact; an all-zero group (e 0) stays +-0
    inverse = ((np.uint32(254) - exponents.astype(np.uint32)) << np.uint32(23)).view(np.float32)
    codes = fp4_codes(groups * inverse[..., None])
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # the low nibble first
    return packed.reshape(count, -1), exponents.reshape(count, -1)
