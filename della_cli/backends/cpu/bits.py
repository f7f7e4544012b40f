"""Bit-level conversions of the CPU backend's rules (``rules``): a float32 from its bits and
back, and float16 to and from float32, for ``rules.widen`` and ``rules.store_row``.

numba has no float16 type, so float16 reaches the kernels as its bits in an int16 array
(``HALF_BITS``; bfloat16's bits are uint16, so the rules tell the two apart by the integer
type). The conversions are torch's, bit for bit: float16 to float32 is exact (a NaN keeps its
sign and payload and is made quiet, as torch's vectorized conversion does); float32 to float16
rounds to nearest even, to Inf from 65520, and a NaN keeps its sign and the top ten bits of its
payload, made quiet. Their branches are selects, so the loops that call them vectorize.
"""

from __future__ import annotations

import numpy as np

from della_cli.backends.cpu import prepare_numba

prepare_numba()  # imported by ``rules``, or first (a test): the cache folder and stamps first

try:
    import numba
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only where numba is not installed
    numba = None

# float16 as the kernels see it: its bits
HALF_BITS = np.int16
_HALF_EXPONENT = np.uint32(0x7C00)
_HALF_QUIET = np.uint32(0x0200)
_FLOAT_QUIET = np.uint32(0x00400000)
_HALF_SMALLEST_NORMAL = np.uint32(0x38800000)  # 2⁻¹⁴ as float32 bits
_HALF_OVERFLOW = np.uint32(0x477FF000)  # 65520: rounds to Inf
_HALF_REBIAS = np.uint32(0xC8000FFF)  # exponent −112 (mod 2³²) and the rounding bias 0xFFF
_HALF_SUBNORMAL_SCALE = np.float32(2.0**-24)
_HALF_SUBNORMAL_OFFSET = np.float32(0.5)  # its float32 unit in the last place is 2⁻²⁴
_MAGNITUDE = np.uint32(0x7FFFFFFF)
_INFINITY = np.uint32(0x7F800000)


if numba is not None:

    @intrinsic
    def float_of_bits(typingctx, bits):
        """The float32 whose bits are the uint32 ``bits``."""

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def bits_of_float(typingctx, value):
        """The uint32 bits of the float32 ``value``."""

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    @numba.njit(cache=True, inline="always")
    def half_to_float_bits(value):
        """The float32 bits of float16 bits, exactly, as torch's vectorized conversion gives
        them (a NaN keeps its sign and payload and is made quiet), without a branch."""
        half = np.uint32(np.int32(value)) & np.uint32(0xFFFF)
        sign = (half & np.uint32(0x8000)) << np.uint32(16)
        exponent = (half >> np.uint32(10)) & np.uint32(0x1F)
        mantissa = half & np.uint32(0x3FF)
        normal = ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13))
        subnormal = bits_of_float(np.float32(mantissa) * _HALF_SUBNORMAL_SCALE)  # exact
        special = np.uint32(0x7F800000) | (mantissa << np.uint32(13))
        if mantissa != 0:
            special |= _FLOAT_QUIET
        bits = normal
        if exponent == 0:
            bits = subnormal
        if exponent == 0x1F:
            bits = special
        return sign | bits

    @numba.njit(cache=True, inline="always")
    def float_to_half_bits(bits):
        """float32 bits rounded to float16 bits, to nearest even, as torch rounds (to Inf
        from 65520; a NaN keeps its sign and the top of its payload and is made quiet)."""
        sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
        magnitude = bits & _MAGNITUDE
        odd = (magnitude >> np.uint32(13)) & np.uint32(1)
        normal = np.uint32(magnitude + _HALF_REBIAS + odd) >> np.uint32(13)
        shifted = float_of_bits(magnitude) + _HALF_SUBNORMAL_OFFSET  # rounds at 2⁻²⁴
        subnormal = bits_of_float(shifted) - bits_of_float(_HALF_SUBNORMAL_OFFSET)
        nan = _HALF_EXPONENT | _HALF_QUIET | ((magnitude & np.uint32(0x7FFFFF)) >> np.uint32(13))
        half = normal
        if magnitude < _HALF_SMALLEST_NORMAL:
            half = subnormal
        if magnitude >= _HALF_OVERFLOW:
            half = _HALF_EXPONENT
        if magnitude > _INFINITY:
            half = nan
        return sign | half
