"""Shared by the tests that run the compiled weighted-sum kernel or the streamed reader."""

from __future__ import annotations

import os

import pytest

from della_cli.backends.cpu import weighted_sum
from della_cli.io import streamed_sum


def require_kernel() -> None:
    """Skip without the compiled kernel, except in CI, which builds it: there it fails."""
    _require(weighted_sum.COMPILED, "the compiled kernel")


def require_streamed_reads() -> None:
    """Skip without the compiled streamed reader (io/_streamed_sum.c, POSIX), except in CI."""
    _require(streamed_sum.AVAILABLE, "the compiled streamed reader")


def _require(built: bool, what: str) -> None:
    if built:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} was not built (is a C compiler installed?)")
    pytest.skip(f"{what} is not installed")
