"""Benchmark della against mergekit on synthetic Llama-shaped models, next to the I/O floor.

For each method and size: generate (or reuse) a bf16 base and experts, write one recipe that both
tools read, then run della, mergekit and the floor alternately, several times each, and print
median wall time and peak RSS with their ratios. ``--scaling`` adds time and memory against model
size and against the number of experts. Smoke test: ``python bench/bench.py --sizes tiny --runs 1``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
from pathlib import Path

import report
import synth
import tools
from floor import BUFFER_BYTES, read_all

ALL_METHODS = tuple(tools.METHOD_PARAMETERS)
ALL_TOOLS = ("della", "mergekit")


def _csv(choices: tuple[str, ...] | None = None):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if choices is not None and item not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices or ())}")
        return items

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=_csv(tuple(synth.SIZES)),
        default=["tiny", "250m", "1b"],
        help="comma-separated: tiny, 250m, 1b (default all)",
    )
    parser.add_argument(
        "--methods",
        type=_csv(ALL_METHODS),
        default=list(ALL_METHODS),
        help=f"comma-separated (default all): {', '.join(ALL_METHODS)}",
    )
    parser.add_argument(
        "--experts",
        type=int,
        default=3,
        help="experts per merge (default 3); slerp, nearswap, arcee_fusion, passthrough take "
        "1 and nuslerp 2 whatever this says",
    )
    parser.add_argument("--runs", type=int, default=3, help="timed runs per tool (default 3)")
    parser.add_argument(
        "--work",
        type=Path,
        default=tools.BENCH_DIR / "work",
        help="models, recipes, outputs, logs and the mergekit venv (default bench/work)",
    )
    parser.add_argument(
        "--tools", type=_csv(ALL_TOOLS), default=list(ALL_TOOLS), help="default della,mergekit"
    )
    parser.add_argument("--device", default="cpu", help="device for both tools (default cpu)")
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of della to time against this one, alternating run by run (tool 'before')",
    )
    parser.add_argument(
        "--scaling",
        action="store_true",
        help="also time the first method against size and against --scaling-experts",
    )
    parser.add_argument(
        "--scaling-experts",
        type=_csv(),
        default=["2", "3", "5"],
        help="expert counts of the scaling table (default 2,3,5)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.experts < 1 or args.runs < 1:
        parser.error("--experts and --runs must be at least 1")
    args.scaling_experts = [int(n) for n in args.scaling_experts]
    args.work = args.work.resolve()
    if args.before is not None:
        args.before = args.before.resolve()
        tools.BEFORE_DIR = args.before
        args.tools = ["before", *args.tools]
    return args


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace, generate_on: str = "cpu") -> None:
        self.args = args
        self.generate_on = generate_on  # device for drawing the synthetic weights
        self.cases: dict[tuple[str, str, int], report.Case] = {}

    def case(self, method: str, size: str, experts: int) -> report.Case:
        """Run (or return the already-run) case; tools and floor alternate run by run."""
        key = (method, size, experts)
        if key in self.cases:
            return self.cases[key]
        work = self.args.work
        base, expert_folders = synth.ensure_models(
            work / "models", size, experts, log=say, device=self.generate_on
        )
        name = f"{size}-{method}-e{experts}"
        recipe = tools.write_recipe(work / "recipes" / f"{name}.yaml", method, base, expert_folders)
        models = expert_folders if method in tools.NO_BASE else [base, *expert_folders]
        inputs = [path for folder in models for path in synth.model_files(folder)]
        out_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        input_bytes = sum(p.stat().st_size for p in inputs)
        case = report.Case(method, size, experts, synth.SIZES[size].parameters, input_bytes)
        buffer = mmap.mmap(-1, BUFFER_BYTES)
        for run in range(1, self.args.runs + 1):
            for tool in [*self.args.tools, "floor"]:
                out = work / "out" / tool
                shutil.rmtree(out, ignore_errors=True)
                # warm the page cache before every run, not only the first: the run before
                # (mergekit's takes 5 GB at 1.1B) may have pushed inputs out of it
                read_all([str(p) for p in inputs], buffer)
                # mergekit does not fsync: without this, whichever run follows it would wait
                # behind its write-back (the floor's fsync took 1.75 s there, 0.6 s after a sync)
                os.sync()
                if tool == "floor":
                    command = tools.floor_command(inputs, out, out_bytes)
                else:
                    command = tools.tool_command(tool, recipe, out, work, self.args.device)
                log = work / "logs" / f"{name}-{tool}-{run}.log"
                case.runs.setdefault(tool, []).append(
                    self.timed(f"{name} {tool} run {run}", command, log, tool)
                )
        both = {"della", "mergekit"} <= set(self.args.tools)
        if both and not (case.failed("della") or case.failed("mergekit")):
            exact = method in tools.DETERMINISTIC
            case.check = tools.compare_outputs(work / "out/della", work / "out/mergekit", exact)
            say(f"{name} output check: {case.check}")
        self.cases[key] = case
        return case

    @staticmethod
    def timed(label: str, command: list[str], log: Path, tool: str) -> tools.Run:
        result = tools.measure(command, log, tools.child_env(tool))
        say(
            f"{label}: {result.wall_s:.2f} s, {result.peak_rss_bytes / 1e9:.3f} GB peak RSS, "
            f"exit {result.returncode}"
        )
        if result.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
            say("  " + "\n  ".join(tail))
        return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    mergekit_python = None
    if "mergekit" in args.tools:
        tools.ensure_mergekit(args.work, log=say)
        mergekit_python = tools.mergekit_venv(args.work) / "bin" / "python"
    if "della" in args.tools:
        tools.compile_della()
    if args.before is not None:
        tools.compile_della(args.before)
    bench = Bench(args)
    comparison = [
        bench.case(method, size, tools.experts_for(method, args.experts))
        for size in args.sizes
        for method in args.methods
    ]
    by_size, by_experts = [], []
    if args.scaling:
        method = args.methods[0]
        largest = max(args.sizes, key=lambda size: synth.SIZES[size].parameters)
        experts = tools.experts_for(method, args.experts)
        by_size = [bench.case(method, size, experts) for size in args.sizes]
        by_experts = [bench.case(method, largest, n) for n in args.scaling_experts]
    text = report.render(
        "della benchmark", comparison, by_size, by_experts, mergekit_python, args.device
    )
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
        say(f"wrote {args.markdown}")
    failed = any(case.failed(tool) for case in bench.cases.values() for tool in case.runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
