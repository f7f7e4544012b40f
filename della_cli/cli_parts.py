"""The command line of merges made in parts: ``della merge --part I/N``, ``--assemble``,
``--ray [ADDRESS] --parts N`` and ``della plan --parts N`` (kept apart from ``cli``, which
parses the options and hands them here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from della_cli.errors import UsageError
from della_cli.sizes import human_size


def with_ray_address(args: list[str]) -> list[str]:
    """The arguments with ``auto`` after a ``--ray`` that has no address (last, or followed
    by another option): Ray's name for the cluster this machine belongs to."""
    args = list(args)
    for index, arg in enumerate(args):
        if arg == "--ray" and (index + 1 == len(args) or args[index + 1].startswith("-")):
            args.insert(index + 1, "auto")
            break
    return args


def check_part_options(
    part: str | None,
    assemble: bool,
    ray: str | None,
    parts: int | None,
    dry_run: bool,
    recipe: Path,
    push: bool = False,
) -> bool:
    """Whether the merge is made in parts; refuse combinations that mean nothing."""
    from della_cli.stages import read_stages

    chosen = [name for name, on in (("--part", part), ("--assemble", assemble)) if on]
    if ray is not None:
        chosen.append("--ray")
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} cannot be combined; give one of them")
    if parts is not None and ray is None:
        raise UsageError("--parts goes with --ray (a part on its own is --part I/N)")
    if not chosen:
        return False
    if dry_run:
        raise UsageError(f"{chosen[0]} makes no dry run; see the parts with `della plan --parts N`")
    if part and push:
        raise UsageError("--push-to-hub goes with --assemble, once every part is done")
    if read_stages(recipe) is not None:
        raise UsageError(
            f"{recipe} is a multi-stage file; merge in parts one stage at a time (each stage "
            "a recipe of its own)"
        )
    return True


def merge_in_parts(recipe: Path, out: Path, options, part, assemble, ray, parts, quiet, as_json):
    """Run the part, assembly or Ray merge asked for; return the merge report of an output
    that was published (None after a part, whose own summary is printed here)."""
    if part is not None:
        _run_part(recipe, out, options, part, quiet, as_json)
        return None
    progress = _Progress(quiet)
    try:
        if assemble:
            from della_cli.assemble import assemble as assemble_parts

            return assemble_parts(recipe, out, options, progress.job, progress.warning)
        from della_cli.ray_runner import run_on_ray

        return run_on_ray(
            recipe, out, options, ray, parts, on_event=progress.event, on_warning=progress.warning
        )
    finally:
        progress.close()


def _run_part(recipe: Path, out: Path, options, part: str, quiet: bool, as_json: bool) -> None:
    from della_cli.part_merge import run_part
    from della_cli.parts import parse_part

    number, count = parse_part(part)
    progress = _Progress(quiet or as_json)
    try:
        report = run_part(recipe, out, options, number, count, progress.job, progress.warning)
    finally:
        progress.close()
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    elif not quiet:
        kept = f", {report.kept_shards} kept from an earlier run" if report.kept_shards else ""
        typer.echo(
            f"part {report.part}: {report.computed_shards} shard(s) computed{kept} "
            f"({human_size(report.bytes)}) in {report.seconds:.1f}s; assemble with "
            f"`della merge RECIPE {out} --assemble` once every part is done"
        )


def print_parts(recipe: Path, out: Path | None, options, count: int, as_json: bool) -> None:
    """``della plan --parts N``: the plan, then what each part downloads, reads, writes and
    needs."""
    from della_cli.errors import PlanError
    from della_cli.part_merge import plan_parts_report

    report, parts = plan_parts_report(recipe, out, options, count)
    if as_json:
        typer.echo(json.dumps({**report.to_dict(), "parts": [p.to_dict() for p in parts]}))
        if not report.can_run and not parts:
            raise typer.Exit(2)
        return
    if not parts:
        raise PlanError(report.problems)
    for message in report.warnings:
        typer.echo(f"warning: {message}", err=True)
    for problem in report.problems:  # memory or disk of one machine: the parts may fit
        typer.echo(f"note: as one merge, {problem}", err=True)
    for line in report.summary_lines():
        typer.echo(line)
    typer.echo(f"in {count} part(s):")
    typer.echo("  part    shards       download       read      write     memory       disk")
    for p in parts:
        shards = {0: "-", 1: f"{p.stop_shard}"}.get(
            p.stop_shard - p.first_shard, f"{p.first_shard + 1}-{p.stop_shard}"
        )
        typer.echo(
            f"  {p.label:>6} {shards:>8} "
            + " ".join(
                f"{human_size(b):>10}"
                for b in (
                    p.download_bytes,
                    p.read_bytes,
                    p.output_bytes,
                    p.working_memory_bytes,
                    p.disk_bytes,
                )
            )
        )


class _Progress:
    """A progress bar on stderr (when it is a terminal) and warnings, for parts and Ray."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.show = not quiet and sys.stderr.isatty()
        self.starts: dict[str, int] = {}

    def _bar(self):
        if self.bar is None and self.show:
            from tqdm import tqdm

            self.bar = tqdm(unit="B", unit_scale=True, desc="merging", file=sys.stderr)
        return self.bar

    def job(self, job) -> None:
        from della_cli.io.dtypes import itemsize

        bar = self._bar()
        if bar is not None:
            bar.update(job.numel * itemsize(job.out_dtype))

    def event(self, event) -> None:
        """What the Ray driver hears (``ray_runner.RayEvent``): bytes merged go to the bar,
        the rest is a line (a part started, started again after a failure, finished)."""
        bar = self._bar()
        if event.kind == "merged":
            if bar is not None:
                bar.update(event.bytes)
            return
        if event.kind == "warning":
            self.warning(f"part {event.part}: {event.message}")
            return
        if event.kind == "started":
            self.starts[event.part] = self.starts.get(event.part, 0) + 1
            again = self.starts[event.part] > 1
            text = f"part {event.part} {'started again' if again else 'started'} on node "
            text += event.node[:12]
        elif event.kind == "pulled":
            text = (
                f"part {event.part}: {human_size(event.bytes)} pulled from node {event.node[:12]}"
            )
        else:
            text = f"part {event.part} {event.kind}" + (
                f" ({event.message})" if event.message else ""
            )
        if not self.quiet:
            (bar.write if bar else lambda m: typer.echo(m, err=True))(text)

    def warning(self, message: str) -> None:
        bar = self._bar() if self.bar else None
        (bar.write if bar else lambda m: typer.echo(m, err=True))(f"warning: {message}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
