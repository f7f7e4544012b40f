"""Process time of the weighted-sum kernel (task arithmetic, linear) on one block, and, given
the C extension of a checkout from before issue 15, of the C kernel it replaced.

A block of 4M entries (the engine's CPU block size) of a bfloat16 base and 3 bfloat16 experts,
merged into bfloat16 on one thread, on deltas and linear. Process time (not wall time), minimum
of ``--repeats``, rounds alternating between the kernels, so other load matters less.

    python bench/sum_kernel.py [--repeats 9] [--rounds 5] \\
        [--c-module OLD/della_cli/backends/cpu/_weighted_sum.cpython-311-x86_64-linux-gnu.so]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

try:
    import della_cli  # noqa: F401 - only checking that it is importable
except ImportError:  # a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from della_cli.backends.cpu import weighted_sum

ENTRIES, EXPERTS, WEIGHTS = 1 << 22, 3, (0.3, 0.5, 0.7)


def process_ms(merge, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        merge()
        times.append(time.process_time() - start)
    return min(times) * 1e3


def c_merge(module, out, base, experts, on_deltas):
    """The C kernel's call (``_weighted_sum.merge`` before issue 15): bfloat16 as kind 0."""
    operands = tuple((expert.view(np.uint16), 0) for expert in experts)
    bits = (out.view(np.uint16), 0)
    return module.merge(bits, (base.view(np.uint16), 0), operands, WEIGHTS, on_deltas, None, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--c-module", type=Path, help="the C extension of an older checkout")
    args = parser.parse_args()
    compiled = None
    if args.c_module is not None:
        name = "della_cli.backends.cpu._weighted_sum"
        spec = importlib.util.spec_from_file_location(name, args.c_module)
        compiled = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compiled)
    rng = np.random.default_rng(0)
    bf16 = weighted_sum.BFLOAT16
    inputs = [rng.standard_normal(ENTRIES).astype(bf16) for _ in range(EXPERTS + 1)]
    out = np.empty(ENTRIES, dtype=bf16)
    print(f"{ENTRIES} entries, {EXPERTS} bfloat16 experts; process time, min of {args.repeats}")
    print("| mode | round | numba ms | C ms | numba / C |")
    print("|---|---|---|---|---|")
    for on_deltas in (True, False):
        base = inputs[0] if on_deltas else inputs[1]  # linear: the first model is the base
        spec = weighted_sum.WeightedSum(WEIGHTS, on_deltas, False, 1.0)
        expected, _ = weighted_sum.merge_block(base, inputs[1:], spec, bf16)
        if compiled is not None:
            c_merge(compiled, out, base, inputs[1:], on_deltas)
            assert out.tobytes() == expected.tobytes(), "the kernels disagree"
        for round_ in range(1, args.rounds + 1):
            numba_ms = process_ms(
                functools.partial(weighted_sum.merge_block, base, inputs[1:], spec, bf16, out=out),
                args.repeats,
            )
            c_ms = float("nan")
            if compiled is not None:
                call = functools.partial(c_merge, compiled, out, base, inputs[1:], on_deltas)
                c_ms = process_ms(call, args.repeats)
            mode = "on deltas" if on_deltas else "linear"
            print(f"| {mode} | {round_} | {numba_ms:.2f} | {c_ms:.2f} | {numba_ms / c_ms:.2f} |")


if __name__ == "__main__":
    main()
