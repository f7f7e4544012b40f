"""glibc's malloc keeps what a merge frees for its next allocations (``engine.allocator``):
torch's temporaries of a MiB are then not faulted in and zeroed afresh for every chunk."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

CHURN = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from della_cli.engine.allocator import keep_freed_memory
    if sys.argv[1] == "kept":
        assert keep_freed_memory()
    def churn():
        arrays = [np.ones(1 << 18, dtype=np.float32) for _ in range(8)]  # 8 MiB, a MiB each
        del arrays
    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        churn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_temporaries_are_reused_without_page_faults():
    """20 rounds of eight 1 MiB arrays (5,120 pages each round): with the thresholds set,
    the pages of the first round serve the others; glibc's default gives most back."""
    kept = _faults("kept")
    assert kept < 256  # fewer than one round's single MiB
    assert _faults("default") > 20 * 256 > kept
