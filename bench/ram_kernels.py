"""Process time per entry of the CPU backend's ram and ramplus_tl kernels, one thread, no I/O.

One 64K-entry chunk (32 rows of 2048) of a bf16 base and three experts that change about half
their entries: ``catalog.ram_apply`` whole (widening, task vectors, fusion, rounding), and its
parts, ``catalog_kernels.ram_fuse`` and ``ram_counts`` (ramplus_tl's statistics pass) and the
widening alone (``catalog.chunks``). Best of 5 timings of 200 calls each. Prints a checksum of
the output bits, so that two checkouts can be compared for bytes as well as time:
``PYTHONPATH=CHECKOUT python bench/ram_kernels.py``.
"""

from __future__ import annotations

import time

import ml_dtypes
import numpy as np
from della_cli.backends.cpu import catalog, catalog_kernels

ROWS, COLUMNS, EXPERTS = 32, 2048, 3
EPSILON = np.float32(1e-5)
LAMBDAS = np.array([1.05, 1.1, 1.02], dtype=np.float32)


def inputs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((ROWS, COLUMNS)).astype(ml_dtypes.bfloat16)
    experts = []
    for _ in range(EXPERTS):
        change = rng.standard_normal((ROWS, COLUMNS)).astype(np.float32) * 0.01
        change *= rng.random((ROWS, COLUMNS)) < 0.5
        experts.append((base.astype(np.float32) + change).astype(ml_dtypes.bfloat16))
    return [base, *experts]


def per_entry_ns(call, repeats: int = 200) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(repeats):
            call()
        best = min(best, (time.process_time() - start) / repeats)
    return best / (ROWS * COLUMNS) * 1e9


def main() -> None:
    loaded = inputs()
    out = np.empty((ROWS, COLUMNS), dtype=ml_dtypes.bfloat16)
    catalog.ram_apply(LAMBDAS, float(EPSILON), loaded, out)  # compiled or loaded first
    _, _, base, deltas = next(catalog.chunks(loaded))
    bits = out.view(np.uint16).reshape(-1)
    counts = np.zeros((EXPERTS, 2), dtype=np.int64)
    figures = {
        "ram_apply (ramplus_tl)": lambda: catalog.ram_apply(LAMBDAS, float(EPSILON), loaded, out),
        "ram_fuse": lambda: catalog_kernels.ram_fuse(deltas, base, EPSILON, LAMBDAS, True, bits),
        "ram_counts": lambda: catalog_kernels.ram_counts(deltas, EPSILON, counts),
        "widen and task vectors": lambda: list(catalog.chunks(loaded)),
    }
    for name, call in figures.items():
        print(f"{name}: {per_entry_ns(call):.2f} ns an entry")
    catalog.ram_apply(LAMBDAS, float(EPSILON), loaded, out)
    print(f"output checksum: {int(out.view(np.uint16).astype(np.uint64).sum())}")


if __name__ == "__main__":
    main()
