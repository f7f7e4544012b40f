"""Shared by the tests that run the compiled weighted-sum kernel."""

from __future__ import annotations

import os

import pytest

from della_cli.methods import weighted_sum


def require_kernel() -> None:
    """Skip without the compiled kernel, except in CI, which builds it: there it fails."""
    if weighted_sum.COMPILED:
        return
    if os.environ.get("CI"):
        pytest.fail("the compiled kernel was not built (is a C compiler installed?)")
    pytest.skip("the compiled kernel is not installed")
