"""A merge whose kernels are all in numba's cache loads them while the reader reads its first
blocks (``CpuJobs.load_kernels``), instead of at the first block merged: importing numba and
reading the cache overlap that read. Only the kernels of the merge's own method are loaded."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from della_cli.backends.cpu import rules, warm

pytestmark = pytest.mark.skipif(not rules.available(), reason="needs numba")

CHILD = """
import sys
from pathlib import Path
from della_cli.api import MergeOptions, run_merge
from della_cli.backends.cpu import catalog_kernels, spherical
from della_cli.engine import MergeEngine, cpu_jobs

events = []

def loaded():
    kernels = (spherical._gram_rows, spherical._combine_rows, catalog_kernels.sce_fuse)
    return tuple(bool(kernel.overloads) for kernel in kernels)

load_kernels = cpu_jobs.CpuJobs.load_kernels
def load(self):
    events.append(("before", loaded()))
    load_kernels(self)
    events.append(("after", loaded()))
cpu_jobs.CpuJobs.load_kernels = load

compute_block = MergeEngine.compute_block
def compute(self, task, rows):
    events.append("merge")
    return compute_block(self, task, rows)
MergeEngine.compute_block = compute

run_merge(Path(sys.argv[1]), Path(sys.argv[2]), MergeOptions(device="cpu", progress=False))
print(events[:3])
"""


def test_the_method_s_cached_kernels_load_before_the_first_block_is_merged(bf16_recipe, tmp_path):
    warm.main(["catalog:BF16:BF16"])  # every catalog kernel in the cache (once, else loaded)
    recipe = bf16_recipe("model_stock", {})
    environment = {k: v for k, v in os.environ.items() if k != "DELLA_COMPILE_INLINE"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=environment,  # as a user runs it: the kernels found in the cache
    )
    assert result.returncode == 0, result.stderr
    events = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    # nothing loaded before; model_stock's Gram and sum kernels after, not sce's; then merging
    assert events == [("before", (False, False, False)), ("after", (True, True, False)), "merge"]


def test_kernels_still_compiling_are_not_loaded(monkeypatch):
    """Where the child compiles, the merge stands in on torch meanwhile: nothing to load."""
    from della_cli.engine.cpu_jobs import CpuJobs
    from della_cli.engine.threads import ThreadBudget

    jobs = CpuJobs(method=None, threads=ThreadBudget(None))
    monkeypatch.setattr(warm, "load", lambda *wanted: pytest.fail("loaded"))
    jobs.load_kernels()  # start_compiling found something missing, or never ran
