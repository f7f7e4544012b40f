"""Device-independent random draws for the random sparsifiers (DARE, MAGPRUNE).

Every draw is a pure function of (recipe seed, tensor name, expert index, element index): a
64-bit key is derived with BLAKE2b (never Python's salted ``hash()``), and each element's uniform
number is a keyed integer hash of its flat index. Integer arithmetic is exact on every device,
so CPU and CUDA produce the same bits, the order in which tensors are processed does not matter,
and a tensor processed in blocks gives the same draws as one processed whole (pass the block's
``start``).

The hash works on 32-bit lanes (half the memory traffic of 64-bit ones, which is what bounds
its speed): the index is first put through a keyed affine map (an odd multiplier and an offset,
both from the key, so that different keys permute the counters differently, not merely shift
them), then through two rounds of a xorshift-multiply avalanche with more key material between
them. Multiplication wraps modulo 2**32 on every backend; right shifts are made logical with a
mask, since torch's shifts on signed integers are arithmetic.

Keys are plain Python: the compiled CPU pass hashes its own draws from ``Draws.key_words`` and
runs without torch, which only the functions that draw tensors import.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_UNIFORM_BITS = 24  # float32 represents every multiple of 2**-24 in [0, 1) exactly


def _as_int32(value: int) -> int:
    """A 32-bit pattern as the signed int torch's int32 arithmetic takes."""
    value &= _MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


_MULTIPLIER_A = _as_int32(0x7FEB352D)
_MULTIPLIER_B = _as_int32(0x846CA68B)
_GOLDEN = _as_int32(0x9E3779B9)


def derive_key(seed: int, tensor_name: str, expert_index: int) -> int:
    """A stable 64-bit key for one expert's draws on one tensor."""
    material = f"della/v1\0{seed}\0{tensor_name}\0{expert_index}".encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "little")


def _key_words(key: int) -> tuple[int, int, int]:
    """Three 32-bit words of key material: an odd multiplier, an offset, a round key."""
    mixed = (key + 0x9E3779B97F4A7C15) & _MASK64  # one splitmix64 step for a third word
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & _MASK64
    mixed ^= mixed >> 31
    return _as_int32(key | 1), _as_int32(key >> 32), _as_int32(mixed)


def _avalanche(values: torch.Tensor) -> torch.Tensor:
    """One xorshift-multiply round over int32 lanes, in place."""
    values.bitwise_xor_((values >> 16).bitwise_and_(0xFFFF))
    values.mul_(_MULTIPLIER_A)
    values.bitwise_xor_((values >> 15).bitwise_and_(0x1FFFF))
    values.mul_(_MULTIPLIER_B)
    values.bitwise_xor_((values >> 16).bitwise_and_(0xFFFF))
    return values


def _low_words(start: int, numel: int, device: torch.device | str) -> torch.Tensor:
    """The low 32 bits of the flat indices start..start+numel-1, as int32."""
    import torch

    if start + numel <= 1 << 31:
        return torch.arange(start, start + numel, dtype=torch.int32, device=device)
    index = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    low = index.bitwise_and_(_MASK32)
    return torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32)


def _high_words(start: int, numel: int, device: torch.device | str) -> torch.Tensor:
    import torch

    index = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    return (index >> 32).to(torch.int32)


def uniform_from_key(
    key: int,
    shape: torch.Size | tuple[int, ...],
    start: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform draws in [0, 1) as float32 of ``shape``, for flat element indices ``start...``.

    Values are multiples of 2**-24, so comparisons against a float32 probability are exact and
    identical across devices.
    """
    import torch

    numel = 1
    for size in shape:
        numel *= int(size)
    multiplier, offset, round_key = _key_words(key)
    hashed = _low_words(start, numel, device).mul_(multiplier).add_(offset)
    if start + numel > 1 << 32:  # tensors beyond 2**32 elements: fold in the high word
        hashed.add_(_high_words(start, numel, device).mul_(_GOLDEN))
    hashed = _avalanche(hashed).bitwise_xor_(round_key)
    hashed = _avalanche(hashed)
    draws = (hashed >> (32 - _UNIFORM_BITS)).bitwise_and_((1 << _UNIFORM_BITS) - 1)
    return draws.to(torch.float32).mul_(2.0**-_UNIFORM_BITS).reshape(shape)


@dataclass(frozen=True)
class Draws:
    """The uniform draws of one expert on one block: a key and the flat index of the block's
    first element. Passing this (rather than a tensor) lets a fused kernel hash its draws
    where it needs them instead of materializing them."""

    key: int
    start: int = 0

    def uniform(self, shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu"):
        return uniform_from_key(self.key, shape, self.start, device)

    @property
    def key_words(self) -> tuple[int, int, int]:
        return _key_words(self.key)
