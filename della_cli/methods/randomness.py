"""Device-independent random draws for the random sparsifiers (DARE, MAGPRUNE).

Every draw is a pure function of (recipe seed, tensor name, expert index, element index): a
64-bit key is derived with BLAKE2b (never Python's salted ``hash()``), and each element's uniform
number comes from a counter-based integer hash of its flat index under that key. Integer
arithmetic is exact on every device, so CPU and CUDA produce the same bits, the order in which
tensors are processed does not matter, and a tensor processed in blocks gives the same draws as
one processed whole (pass the block's ``start``).
"""

from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFFFFFF
# Multipliers stay below 2**31 so that a 32-bit value times a multiplier fits in int64 without
# overflow: the hash is then well defined on every backend.
_MULTIPLIER_A = 0x7FEB352D
_MULTIPLIER_B = 0x2C1B3C6D
_UNIFORM_BITS = 24  # float32 represents every multiple of 2**-24 in [0, 1) exactly


def derive_key(seed: int, tensor_name: str, expert_index: int) -> int:
    """A stable 64-bit key for one expert's draws on one tensor."""
    material = f"della/v1\0{seed}\0{tensor_name}\0{expert_index}".encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "little")


def _mix32(values: torch.Tensor) -> torch.Tensor:
    """An avalanche of 32-bit values held in int64, in place (xorshift-multiply rounds)."""
    values.bitwise_xor_(values >> 16)
    values.mul_(_MULTIPLIER_A).bitwise_and_(_MASK32)
    values.bitwise_xor_(values >> 15)
    values.mul_(_MULTIPLIER_B).bitwise_and_(_MASK32)
    values.bitwise_xor_(values >> 16)
    return values


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
    numel = 1
    for size in shape:
        numel *= int(size)
    key_low, key_high = key & _MASK32, (key >> 32) & _MASK32
    index = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    high = (index >> 32) ^ key_high
    hashed = _mix32(index.bitwise_and_(_MASK32).bitwise_xor_(key_low))
    hashed = _mix32(hashed.bitwise_xor_(high))
    hashed = _mix32(hashed.bitwise_xor_(key_high))
    draws = (hashed >> (32 - _UNIFORM_BITS)).to(torch.float32).mul_(2.0**-_UNIFORM_BITS)
    return draws.reshape(shape)
