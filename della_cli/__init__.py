"""della: merge fine-tuned language models without training (DELLA-Merging, arXiv 2406.11617)."""

__version__ = "0.1.0"

import os

# numba's and torch's OpenMP threads sleep as soon as a parallel loop ends instead of spinning
# for the next one (set before either loads OpenMP; a user's own setting stands). Spinning
# threads took the cores that the merging thread and everything else on the machine needed: a
# 250M TIES merge on two threads beside another process's work took 26 s against 14 s on one
# (bench/RESULTS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
