"""della on CUDA against the I/O floor, every method, on the synthetic ~1.1B Llama (TinyLlama
shape), with the start-up measured apart from the merge.

Generates the base and experts under ``--work`` if they are missing (random draws on the GPU:
seconds plus the writes; the values differ from a CPU-generated set, the shapes do not), reads
every input once to warm the page cache, then per method runs ``della merge --device cuda
--json`` (wall time of the process, and the merge's own ``seconds``, which exclude Python's
start-up, the imports and CUDA's initialisation), and per distinct set of inputs the floor
(read every input byte, write the output's bytes, fsync). The start-up is timed on its own:
``della plan --device cuda`` (imports, CUDA context, a plan from headers). ``--budget-s``
stops starting new methods once that much time has gone, so a lease is never overrun; the
table says which were left out. Exits 0 with a message, having done nothing, where CUDA is
unavailable.

    python bench/gpu_bench.py [--methods della,ties] [--runs 1] [--budget-s 200]
                              [--devices cuda:0,cuda:1] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
try:
    import della_cli  # noqa: F401 - only checking that it is importable
except ImportError:  # a checkout without an install, as on the GPU machine
    sys.path.insert(0, str(REPO_DIR))

import report  # noqa: E402 - after the path above
import synth  # noqa: E402
import tools  # noqa: E402
from floor import BUFFER_BYTES, read_all  # noqa: E402

# Issue 18: on one GPU, the merge within twice the floor at 1.1B, within 1.5 times at 7B.
TARGETS = {"7b": 1.5}
DEFAULT_TARGET = 2.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(tools.METHOD_PARAMETERS))
    parser.add_argument("--size", default="1b", choices=tuple(synth.SIZES))
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--devices", default="cuda", help="--devices for della (default cuda)")
    parser.add_argument("--budget-s", type=float, default=0, help="0: no limit")
    parser.add_argument("--work", type=Path, default=REPO_DIR / "bench" / "work")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import torch

    if not torch.cuda.is_available():
        print("gpu_bench: CUDA is not available on this machine; nothing to do.", file=sys.stderr)
        return 0
    tools.compile_della()
    work = args.work.resolve()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    most = max(tools.experts_for(m, args.experts) for m in methods)
    base, experts = synth.ensure_models(work / "models", args.size, most, say, device="cuda")
    generated_s = time.perf_counter() - started
    del torch  # the children import their own

    first = recipe_for(work, methods[0], base, experts, args)
    startup = timed_della(["plan", str(first)], work, args)
    rows, floors, failed, skipped = [], {}, False, []
    buffer = bytearray(BUFFER_BYTES)
    for method in methods:
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            skipped.append(method)
            continue
        recipe = recipe_for(work, method, base, experts, args)
        inputs = input_files(method, base, experts, args.experts)
        key = tuple(inputs)
        if key not in floors:
            read_all([str(p) for p in inputs], buffer)
            floors[key] = floor_s(inputs, base, work, args.runs)
        out = str(work / "out" / "della")
        merges = [timed_della(["merge", str(recipe), out], work, args) for _ in range(args.runs)]
        failed |= any(run["returncode"] != 0 for run in merges)
        rows.append(row(method, inputs, merges, floors[key]))
        say(rows[-1])
    text = render(args, rows, startup, generated_s, skipped, time.perf_counter() - started)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 1 if failed or startup["returncode"] != 0 else 0


def say(message) -> None:
    print(message, file=sys.stderr, flush=True)


def recipe_for(work: Path, method: str, base: Path, experts: list[Path], args) -> Path:
    count = tools.experts_for(method, args.experts)
    path = work / "recipes" / f"gpu-{args.size}-{method}-e{count}.yaml"
    return tools.write_recipe(path, method, base, experts[:count])


def input_files(method: str, base: Path, experts: list[Path], requested: int) -> list[Path]:
    chosen = experts[: tools.experts_for(method, requested)]
    models = chosen if method in tools.NO_BASE else [base, *chosen]
    return [path for folder in models for path in synth.model_files(folder)]


def timed_della(command: list[str], work: Path, args=None) -> dict:
    """One della process: wall time, peak RSS, exit status and its ``--json`` report."""
    out_json = work / "logs" / "gpu-della.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    devices = args.devices if args is not None else "cuda"
    della = [*tools.della_launcher(), *command, "--devices" if "," in devices else "--device"]
    della += [devices, "--json"]
    if command[0] == "merge":
        della += ["--overwrite", "--seed", str(tools.SEED)]
    shell = ["sh", "-c", f"exec {shlex.join(della)} > {shlex.quote(str(out_json))}"]
    os.sync()
    run = tools.measure(shell, work / "logs" / f"gpu-{command[0]}.log", tools.child_env("della"))
    try:
        reported = json.loads(out_json.read_text())
    except (OSError, ValueError):
        reported = {}
    if run.returncode != 0:
        say(run.log.read_text(errors="replace")[-3000:])
    return {
        "wall_s": run.wall_s,
        "peak_gb": run.peak_rss_bytes / 1e9,
        "returncode": run.returncode,
        "merge_s": reported.get("seconds"),
    }


def floor_s(inputs: list[Path], base: Path, work: Path, runs: int) -> float:
    out = work / "out" / "floor"
    out_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    times = []
    for _ in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        command = tools.floor_command(inputs, out, out_bytes)
        times.append(tools.measure(command, work / "logs" / "gpu-floor.log").wall_s)
    shutil.rmtree(out, ignore_errors=True)
    return statistics.median(times)


def row(method: str, inputs: list[Path], merges: list[dict], floor: float) -> dict:
    ok = [run for run in merges if run["returncode"] == 0]
    median = lambda key: statistics.median(r[key] for r in ok) if ok else None  # noqa: E731
    return {
        "method": method,
        "input_gb": sum(p.stat().st_size for p in inputs) / 1e9,
        "wall_s": median("wall_s"),
        "merge_s": median("merge_s") if ok and all(r["merge_s"] for r in ok) else None,
        "peak_gb": median("peak_gb"),
        "floor_s": floor,
        "failed": not ok,
    }


def render(args, rows, startup, generated_s, skipped, total_s) -> str:
    import torch

    target = TARGETS.get(args.size, DEFAULT_TARGET)
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    lines = [
        f"# della on CUDA ({names}) vs the I/O floor, {args.size}, start-up apart",
        "",
        f"Command: `{report.command_line()}`",
        "",
        *[f"- {fact}" for fact in report.machine(None)],
        f"- della --device/--devices {args.devices}; {args.runs} run(s) per method (median); "
        f"models generated or found in {generated_s:.1f} s; whole script {total_s:.1f} s",
        f"- start-up (`della plan` on the device: imports, CUDA context, plan from headers): "
        f"{startup['wall_s']:.2f} s, exit {startup['returncode']}",
        "",
        "`merge s` is the merge's own time (`--json` seconds: inputs opened, plan, tensors, "
        "output written and checked), without Python's start-up; `wall s` the whole process. "
        f"The target: merge s within {target:g} x the floor.",
        "",
        "| method | input GB | wall s | merge s | merge/floor | peak RSS GB | floor s | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["merge_s"] / r["floor_s"] if r["merge_s"] and r["floor_s"] else None
        met = "–" if ratio is None else ("met" if ratio <= target else "missed")
        lines.append(
            f"| {r['method']} | {r['input_gb']:.2f} "
            f"| {report.cell(r['wall_s'], failed=r['failed'])} | {report.cell(r['merge_s'])} "
            f"| {report.cell(ratio)} | {report.cell(r['peak_gb'], 3)} "
            f"| {report.cell(r['floor_s'])} | {met} |"
        )
    if skipped:
        lines += ["", f"Not run (--budget-s {args.budget_s:g} reached): {', '.join(skipped)}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
