"""Process time of merging one block on the CPU: the CPU backend's block kernel against the
torch backend (the reference), per method.

A block of 1024 × 4096 entries (a 4M-element block, the engine's CPU block size) of a
bfloat16 base and 3 bfloat16 experts, merged into bfloat16. Process time (not wall time) is
taken, minimum of ``--repeats``, so other load on the machine matters less; run it with
``NUMBA_NUM_THREADS=1`` for per-core figures.

    NUMBA_NUM_THREADS=1 python bench/block_kernels.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

try:
    import della_cli  # noqa: F401 - only checking that it is importable
except ImportError:  # a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from della_cli.backends.cpu import block as fused_merge
from della_cli.io.dtypes import from_torch, to_torch
from della_cli.methods import METHODS, Rescale, merge_tensor
from della_cli.methods.parameters import ExpertParams, GlobalParams
from della_cli.methods.randomness import Draws, derive_key
from della_cli.methods.sparsify import top_magnitude_mask

ROWS, COLUMNS, EXPERTS = 1024, 4096, 3
CASES = {
    "della": (fused_merge.MAGPRUNE, ExpertParams(density=0.7, epsilon=0.07)),
    "dare_ties": (fused_merge.RANDOM, ExpertParams(density=0.5)),
    "ties": (fused_merge.MASK, ExpertParams(density=0.5)),
    "task_arithmetic": (fused_merge.KEEP_ALL, ExpertParams()),
}


def inputs() -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(ROWS, COLUMNS, generator=generator) * 0.02
    experts = [base + torch.randn(ROWS, COLUMNS, generator=generator) * 0.002 for _ in range(3)]
    return base.bfloat16(), [e.bfloat16() for e in experts]


def torch_backend(method, base, experts, masks):
    """The torch backend: widen, then merge_tensor."""
    spec = METHODS[method]
    _, params = CASES[method]
    wide = [t.float() for t in (base, *experts)]
    merged = merge_tensor(
        spec,
        wide[0],
        wide[1:],
        [params] * EXPERTS,
        GlobalParams(normalize=spec.normalize_default, rescale=Rescale.KEEP_PROB),
        uniform=lambda i: Draws(derive_key(0, "w", i), 0),
        keep_masks=masks,
    )
    return merged.to(torch.bfloat16)


def whole_block(method, base, experts, masks):
    """The compiled pass, on the arrays the engine hands it (the tensors' memory)."""
    spec = METHODS[method]
    mode, params = CASES[method]
    plans = [
        fused_merge.ExpertPlan(
            mode,
            params.density or 1.0,
            params.epsilon or 0.0,
            1.0,
            Draws(derive_key(0, "w", i), 0).key_words,
        )
        for i in range(EXPERTS)
    ]
    merged, _ = fused_merge.merge_block(
        from_torch(base),
        [from_torch(e) for e in experts],
        plans,
        None if masks is None else [from_torch(m) for m in masks],
        start=0,
        rescale=True,
        on_deltas=True,
        consensus=spec.sign_consensus,
        normalize=spec.normalize_default,
        lambda_=1.0,
        out_dtype=from_torch(base).dtype,
    )
    return to_torch(merged)


def timed(function, repeats: int) -> float:
    function()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        function()
        best = min(best, time.process_time() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    base, experts = inputs()
    print(
        f"block {ROWS} x {COLUMNS}, {EXPERTS} bfloat16 experts; process time, min of {args.repeats}"
    )
    print("| method | CPU block kernel ms | torch ms | same bytes |")
    print("|---|---|---|---|")
    for method in CASES:
        masks = None
        if CASES[method][0] == fused_merge.MASK:
            masks = [top_magnitude_mask((e.float() - base.float()).abs(), 0.5) for e in experts]
        whole = timed(lambda m=method, k=masks: whole_block(m, base, experts, k), args.repeats)
        plain = timed(lambda m=method, k=masks: torch_backend(m, base, experts, k), args.repeats)
        reference = torch_backend(method, base, experts, masks)
        same = torch.equal(
            whole_block(method, base, experts, masks).view(torch.int16),
            reference.view(torch.int16),
        )
        print(f"| {method} | {whole * 1e3:.1f} | {plain * 1e3:.1f} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
