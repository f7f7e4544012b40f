"""Helpers for the golden tests of the methods' worked examples (ALGORITHMS.md)."""

from __future__ import annotations

import torch

PRINTED_ATOL = 1e-4  # ALGORITHMS.md prints 4 decimals
DTYPES = [torch.float64, torch.float32]


def t(values, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def assert_printed(actual: torch.Tensor, expected) -> None:
    """``actual`` equals a worked example's printed numbers to their 4 decimals."""
    expected = torch.tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected, atol=PRINTED_ATOL, rtol=0)


def row_blocks(length: int):
    """Block boundaries along dim 0: whole, single rows, and ragged blocks of 3."""
    yield [(0, length)]
    yield [(i, i + 1) for i in range(length)]
    yield [(i, min(i + 3, length)) for i in range(0, length, 3)]
