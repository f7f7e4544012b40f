"""Shared by the tests that run the CPU backend's kernels or choose a backend."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from della_cli import kernels
from della_cli.io import streamed_sum


def require_kernel() -> None:
    """Skip without numba (the CPU backend's kernels), except in CI, which installs it."""
    _require(kernels.cpu_backend_installed(), "numba")


def require_streamed_reads() -> None:
    """Skip without numba or positioned reads (``os.preadv``, POSIX), except in CI."""
    require_kernel()
    _require(streamed_sum.AVAILABLE, "os.preadv")


def _require(present: bool, what: str) -> None:
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not available")
    pytest.skip(f"{what} is not available")


def on_backend(plan, recipe, inputs, backend, stream_reads=True):
    """``plan`` with its kernels chosen for ``backend`` ("torch" or "cpu") on the CPU."""
    return kernels.assign_kernels(
        plan, recipe, inputs.base, inputs.experts, "cpu", backend, stream_reads=stream_reads
    )


def without_cpu_backend(monkeypatch) -> None:
    """Plans made from here on give every job the torch backend, as without numba."""
    monkeypatch.setattr(kernels, "cpu_backend_installed", lambda: False)


def merge_in_child(recipe: Path, out: Path) -> tuple[str, list[str]]:
    """Merge ``recipe`` into ``out`` with ``run_merge`` in a fresh interpreter, NaN and Inf
    outputs allowed: its warnings (as printed), and which of torch and numba it imported
    (the CPU backend's merges of some methods import neither)."""
    code = (
        "import sys; from pathlib import Path; from della_cli.api import MergeOptions, run_merge\n"
        "warnings = []\n"
        f"run_merge(Path({str(recipe)!r}), Path({str(out)!r}),"
        " MergeOptions(device='cpu', progress=False, allow_nonfinite=True),"
        " on_warning=warnings.append)\n"
        "print(warnings)\n"
        "print(sorted(m for m in ('torch', 'numba') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    warnings, imported = result.stdout.strip().splitlines()[-2:]
    return warnings, ast.literal_eval(imported)


def copy_with_nan(source: Path, model: Path, nan_bits: int) -> str:
    """A copy of the model folder ``source`` at ``model`` whose first 2-D tensor starts with a
    NaN (``nan_bits``: its 16-bit pattern, bfloat16 or float16); that tensor's name."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    model.mkdir()
    for path in source.iterdir():
        (model / path.name).write_bytes(path.read_bytes())
    weights = next(model.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(n for n, t in tensors.items() if t.ndim == 2)
    tensors[name] = tensors[name].copy()
    tensors[name].view(np.uint16)[0, 0] = nan_bits
    save_file(tensors, weights, metadata={"format": "pt"})
    return name
