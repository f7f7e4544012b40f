"""A 6-candidate ``della sweep`` on the ~250M synthetic models, batched against one at a time.

Each sweep runs as its own process (``timed.py``: wall time and peak RSS), batched (the
default budget: every candidate in one pass over the inputs) and one candidate at a time
(``--memory 1``: a batch of one each), alternating run by run, the page cache warmed before
each. What a sweep read is the process's ``rchar`` (``/proc/self/io``: every byte a read
system call returned, from the page cache or the disk; the scoring command, a separate
process, is not counted). Medians are printed, and written as Markdown with ``--markdown``.

    PYTHONPATH=. python bench/sweep_batch.py [--work bench/work] [--runs 3] [--markdown OUT]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import runpy
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import synth  # noqa: E402
import tools  # noqa: E402
from floor import BUFFER_BYTES, read_all  # noqa: E402

SWEEPS = {
    "task_arithmetic": ["--grid", "lambda=0.5,0.6,0.7,0.8,0.9,1.0"],
    "della": ["--grid", "density=0.3,0.5,0.7", "--seeds", "2"],
}
MODES = {"batched": [], "one at a time": ["--memory", "1"]}
SCORE = "echo 1 {model} | cut -c1"


def child(io_file: str, arguments: list[str]) -> None:
    """Run ``della ARGUMENTS`` in this process, then record its /proc/self/io."""
    sys.argv = ["della", *arguments]
    try:
        runpy.run_module("della_cli", run_name="__main__")
    finally:
        Path(io_file).write_text(Path("/proc/self/io").read_text())


def rchar(io_file: Path) -> int:
    fields = dict(line.split(": ") for line in io_file.read_text().splitlines())
    return int(fields["rchar"])


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=HERE / "work")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", default=",".join(SWEEPS))
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    base, experts = synth.ensure_models(args.work / "models", "250m", 2, log=print)
    inputs = [p for folder in [base, *experts] for p in synth.model_files(folder)]
    input_bytes = sum(p.stat().st_size for p in inputs)
    buffer = mmap.mmap(-1, BUFFER_BYTES)
    lines = [
        f"Inputs: base and 2 experts, {input_bytes / 1e9:.2f} GB; 6 candidates; medians of "
        f"{args.runs} alternating runs.",
        "",
        "| method | mode | wall s | read GB (rchar) | reads of the inputs | peak RSS GB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for method in args.methods.split(","):
        recipe = tools.write_recipe(
            args.work / "recipes" / f"sweep-{method}.yaml", method, base, experts
        )
        runs: dict[str, list[tuple[float, int, int]]] = {mode: [] for mode in MODES}
        for run in range(args.runs):
            order = list(MODES) if run % 2 == 0 else list(reversed(MODES))
            for mode in order:
                out = args.work / "out" / "sweep-batch"
                shutil.rmtree(out, ignore_errors=True)
                read_all([str(p) for p in inputs], buffer)
                os.sync()
                io_file = args.work / "logs" / "sweep-batch.io"
                io_file.parent.mkdir(parents=True, exist_ok=True)
                command = [sys.executable, __file__, "--child", str(io_file), "sweep", str(recipe)]
                command += ["--out", str(out), "--eval", SCORE, "--quiet", *SWEEPS[method]]
                command += MODES[mode]
                log = args.work / "logs" / f"sweep-batch-{method}-{run}.log"
                result = tools.measure(command, log, tools.child_env("della"))
                if result.returncode != 0:
                    print(log.read_text()[-3000:], file=sys.stderr)
                    return 1
                read = rchar(io_file)
                runs[mode].append((result.wall_s, read, result.peak_rss_bytes))
                print(
                    f"{method} {mode} run {run + 1}: {result.wall_s:.2f} s, {read / 1e9:.2f} GB "
                    f"read, {result.peak_rss_bytes / 1e9:.2f} GB peak RSS",
                    flush=True,
                )
        for mode, figures in runs.items():
            wall, read, rss = (statistics.median(values) for values in zip(*figures, strict=True))
            lines.append(
                f"| {method} | {mode} | {wall:.2f} | {read / 1e9:.2f} | {read / input_bytes:.2f} "
                f"| {rss / 1e9:.2f} |"
            )
    print("\n".join(lines))
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    print(json.dumps({"input_bytes": input_bytes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
