"""della on a CUDA device against the I/O floor, on the synthetic ~1.1B Llama (TinyLlama shape).

Generates the base and experts under ``--work`` if they are missing (random draws on the GPU,
so seconds plus the writes; the values differ from a CPU-generated set, the shapes do not),
then alternates ``della merge --device cuda`` and the floor (read every input byte, write the
output's bytes, fsync) ``--runs`` times after one untimed read of the inputs. With the defaults
(della, 3 experts, 3 runs) it should finish well under 5 minutes on one H200. Exits 0 with a
message, having done nothing, where CUDA is unavailable.

    python bench/gpu_bench.py [--methods della,ties] [--experts 3] [--runs 3] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
try:
    import della_cli  # noqa: F401 - only checking that it is importable
except ImportError:  # a checkout without an install, as on the GPU machine
    sys.path.insert(0, str(REPO_DIR))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="della")
    parser.add_argument("--size", default="1b", choices=("tiny", "250m", "1b"))
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO_DIR / "bench" / "work")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available on this machine; nothing to do.", file=sys.stderr)
        return 0

    import bench
    import report

    bench_args = bench.parse_args(
        [
            *("--sizes", args.size, "--methods", args.methods, "--tools", "della"),
            *("--experts", str(args.experts), "--runs", str(args.runs), "--device", "cuda"),
            *("--work", str(args.work)),
        ]
    )
    runner = bench.Bench(bench_args, generate_on="cuda")
    cases = [runner.case(method, args.size, args.experts) for method in bench_args.methods]
    lines = [
        f"# della on {torch.cuda.get_device_name(0)} vs the I/O floor",
        "",
        f"Command: `{report.command_line()}`",
        "",
        *[f"- {fact}" for fact in report.machine(None)],
        "",
        report.notes("cuda", check=False),
        "",
        "| method | size | experts | input GB | della cuda median s | della peak RSS GB "
        "| floor s | della/floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        della_s, floor_s = c.median_s("della"), c.median_s("floor")
        ratio = f"{della_s / floor_s:.2f}" if della_s and floor_s else "–"
        lines.append(
            f"| {c.method} | {c.size} | {c.experts} | {c.input_bytes / report.GB:.2f} "
            f"| {report.cell(della_s, failed=c.failed('della'))} "
            f"| {report.cell(c.peak_gb('della'), 3)} | {report.cell(floor_s)} | {ratio} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 1 if any(c.failed("della") for c in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
