"""Process time per tensor entry of each catalog method's passes, one thread, no I/O.

Feeds ``methods.streamed.prepare`` and ``apply`` the row chunks the torch backend gives them on
the CPU (64 rows of 1024 float32 entries, bf16-rounded values: base + 3 models, 1 for slerp,
nearswap, arcee_fusion and passthrough, 2 for nuslerp), 64 chunks a tensor, and prints
nanoseconds per entry of the tensor for all statistics passes together and for the merge
pass. Run it against two checkouts (``PYTHONPATH=CHECKOUT python bench/catalog_passes.py``) to
compare method code without the noise of reads, writes and start-up:
``python bench/catalog_passes.py sce arcee_fusion``.
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

import torch
from della_cli.methods import streamed

ROWS, COLUMNS, CHUNKS = 64, 1024, 64
CASES: dict[str, tuple[dict, int]] = {
    "slerp": ({"t": 0.5}, 1),
    "nuslerp": ({"nuslerp_flatten": True, "nuslerp_row_wise": False}, 2),
    "multislerp": ({"normalize_weights": True, "eps": 1e-8}, 3),
    "karcher": ({"max_iter": 10, "tol": 1e-5}, 3),
    "model_stock": ({"filter_wise": False}, 3),
    "sce": ({"select_topk": 0.5}, 3),
    "arcee_fusion": ({}, 1),
    "ram": ({"epsilon": 1e-5}, 3),
    "ramplus_tl": ({"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, 3),
    "nearswap": ({"t": 0.001}, 1),
    "passthrough": ({}, 1),
}


def chunk_inputs() -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(ROWS, COLUMNS, generator=generator)).bfloat16().float()
    models = [
        (base + 0.001 * torch.randn(ROWS, COLUMNS, generator=generator)).bfloat16().float()
        for _ in range(3)
    ]
    return base, models


def time_method(name: str, base: torch.Tensor, all_models: list[torch.Tensor]) -> str:
    values, count = CASES[name]
    models = all_models[:count]
    params = [SimpleNamespace(weight=1.0, scale=None)] * count
    reference = None if name == "passthrough" else base
    passes = streamed.passes(name, values, count)
    numel = CHUNKS * ROWS * COLUMNS

    def blocks():
        return ((reference, models) for _ in range(CHUNKS))

    start = time.thread_time()
    state = streamed.prepare(name, values, params, blocks, numel) if passes > 1 else None
    prepared = time.thread_time()
    for _ in range(CHUNKS):
        streamed.apply(name, values, params, state, reference, models)
    merged = time.thread_time()
    return (
        f"{name:13s} passes {passes}  statistics {(prepared - start) / numel * 1e9:6.1f} ns  "
        f"merge {(merged - prepared) / numel * 1e9:6.1f} ns  (per entry)"
    )


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    base, models = chunk_inputs()
    for name in names or CASES:
        print(time_method(name, base, models), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
