"""Markdown for the benchmark: the machine, the command, the comparison and scaling tables."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

GB = 10**9


@dataclass
class Case:
    """Every run of one (method, size, experts) combination, per tool, plus the floor."""

    method: str
    size: str
    experts: int
    parameters: int
    input_bytes: int
    runs: dict[str, list] = field(default_factory=dict)  # tool or "floor" -> [tools.Run]
    check: str = ""

    def median_s(self, tool: str) -> float | None:
        ok = [run.wall_s for run in self.runs.get(tool, []) if run.returncode == 0]
        return statistics.median(ok) if ok else None

    def peak_gb(self, tool: str) -> float | None:
        """The median over runs of each run's peak RSS."""
        ok = [run.peak_rss_bytes for run in self.runs.get(tool, []) if run.returncode == 0]
        return statistics.median(ok) / GB if ok else None

    def failed(self, tool: str) -> bool:
        return any(run.returncode != 0 for run in self.runs.get(tool, []))


def cell(value: float | None, digits: int = 2, failed: bool = False) -> str:
    if value is None:
        return "failed" if failed else "–"
    return f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "–"


def before_after_table(cases: list[Case]) -> str:
    """``--before``: the checkout timed against this one, medians and every run."""
    head = "| method | size | before s | after s | after/before | floor s | after/floor | runs |"
    lines = [head, "|" + "---|" * 8]
    for c in cases:
        bs, ds, fs = c.median_s("before"), c.median_s("della"), c.median_s("floor")
        runs = "; ".join(
            f"{tool} " + ", ".join(f"{run.wall_s:.2f}" for run in c.runs.get(tool, []))
            for tool in ("before", "della", "floor")
        )
        lines.append(
            f"| {c.method} | {c.size} | {cell(bs, failed=c.failed('before'))} "
            f"| {cell(ds, failed=c.failed('della'))} | {_ratio(ds, bs)} | {cell(fs)} "
            f"| {_ratio(ds, fs)} | {runs} |"
        )
    return "\n".join(lines)


def comparison_table(cases: list[Case]) -> str:
    head = (
        "| method | size | experts | della median s | della peak RSS GB | mergekit median s "
        "| mergekit RSS GB | time ratio | RSS ratio | floor s | della/floor | output check |"
    )
    lines = [head, "|" + "---|" * 12]
    for c in cases:
        ds, dm = c.median_s("della"), c.peak_gb("della")
        ms, mm = c.median_s("mergekit"), c.peak_gb("mergekit")
        fs = c.median_s("floor")
        lines.append(
            f"| {c.method} | {c.size} | {c.experts} | {cell(ds, failed=c.failed('della'))} "
            f"| {cell(dm, 3)} | {cell(ms, failed=c.failed('mergekit'))} | {cell(mm, 3)} "
            f"| {_ratio(ds, ms)} | {_ratio(dm, mm)} | {cell(fs)} | {_ratio(ds, fs)} "
            f"| {c.check or '–'} |"
        )
    return "\n".join(lines)


def scaling_table(cases: list[Case]) -> str:
    head = (
        "| method | size | parameters | experts | input GB | della s | della RSS GB "
        "| mergekit s | mergekit RSS GB | floor s |"
    )
    lines = [head, "|" + "---|" * 10]
    for c in cases:
        lines.append(
            f"| {c.method} | {c.size} | {c.parameters / 1e6:.0f}M | {c.experts} "
            f"| {c.input_bytes / GB:.2f} | {cell(c.median_s('della'), failed=c.failed('della'))} "
            f"| {cell(c.peak_gb('della'), 3)} "
            f"| {cell(c.median_s('mergekit'), failed=c.failed('mergekit'))} "
            f"| {cell(c.peak_gb('mergekit'), 3)} | {cell(c.median_s('floor'))} |"
        )
    return "\n".join(lines)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(arg) for arg in sys.argv)


def machine(mergekit_python: Path | None) -> list[str]:
    import torch
    from della_cli import __version__

    memory_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kb = int(line.split()[1])
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    facts = [
        f"CPU: {cpu}, {os.cpu_count()} cores (nproc); RAM {memory_kb / 2**20:.1f} GiB",
        f"OS: {platform.platform()}; Python {platform.python_version()}",
        f"della {__version__}, torch {torch.__version__}",
    ]
    if mergekit_python is not None and mergekit_python.exists():
        code = (
            "import importlib.metadata as m, torch; "
            "print(f\"mergekit {m.version('mergekit')}, torch {torch.__version__}, "
            "transformers {m.version('transformers')}\")"
        )
        done = subprocess.run([str(mergekit_python), "-c", code], capture_output=True, text=True)
        facts.append((done.stdout.strip() or "mergekit: version unknown") + " (own venv)")
    return facts


def notes(device: str = "cpu", check: bool = True) -> str:
    """How the figures were taken, printed above the tables."""
    text = (
        "Each figure is the median over runs of a separate process (wall time with Python "
        "start-up and imports; peak RSS of that process from os.wait4, which includes about "
        "10 MB of the launcher it was forked from). Tools alternate run by run (della, "
        "mergekit, floor, della, ...), each after a sync, so that none waits behind the "
        "write-back of the one before, and after one untimed read of all the case's inputs, "
        "so that every run is warm-cache. The floor reads every input byte (into one "
        "page-aligned 1 MiB buffer) and writes the output's weight bytes, starting their "
        "write-back every 64 MiB and ending with an fsync, as della writes its shards; "
        "mergekit does not fsync. "
        f"Merges run with --device {device} and seed 42."
    )
    if check:
        text += (
            " 'output check' compares the two outputs' tensor names, shapes and dtypes, and "
            "for the deterministic methods their values (TIES and breadcrumbs trims break ties "
            "between equal magnitudes differently, which bf16 inputs make common)."
        )
    return text


def render(
    title: str,
    comparison: list[Case],
    by_size: list[Case],
    by_experts: list[Case],
    mergekit_python: Path | None,
    device: str = "cpu",
) -> str:
    parts = [f"# {title}", "", f"Command: `{command_line()}`", ""]
    parts += [f"- {fact}" for fact in machine(mergekit_python)]
    parts += ["", notes(device), "", "## della vs mergekit", "", comparison_table(comparison), ""]
    if any("before" in c.runs for c in comparison):
        parts += ["## della before and after", "", before_after_table(comparison), ""]
    if by_size:
        parts += ["## Scaling with model size", "", scaling_table(by_size), ""]
    if by_experts:
        parts += ["## Scaling with the number of experts", "", scaling_table(by_experts), ""]
    return "\n".join(parts)
