"""Shared by the tests that run the CPU backend's kernels or choose a backend."""

from __future__ import annotations

import os

import pytest

from della_cli import kernels
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


def on_backend(plan, recipe, inputs, backend, stream_reads=True):
    """``plan`` with its kernels chosen for ``backend`` ("torch" or "cpu") on the CPU."""
    return kernels.assign_kernels(
        plan, recipe, inputs.base, inputs.experts, "cpu", backend, stream_reads=stream_reads
    )


def without_cpu_backend(monkeypatch) -> None:
    """Plans made from here on give every job the torch backend, as without numba and C."""
    monkeypatch.setattr(kernels, "cpu_backend_installed", lambda: (False, False))
