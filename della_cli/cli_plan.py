"""``della plan``: a merge planned from headers alone, nothing downloaded or written; also the
dry run of ``della merge --dry-run``, and each stage of a multi-stage file."""

import json
from pathlib import Path
from typing import Annotated

import typer

from della_cli.cli_common import AllowPickleOption, DevicesOption, JsonOption, reported_errors
from della_cli.sizes import parse_size


def print_plan(
    recipe_path: Path, out: Path | None, options, as_json: bool, check_push=None
) -> None:
    """Plan without downloading or writing; print the report; exit 2 when it cannot run.
    ``check_push`` checks push credentials once the plan has passed."""
    from della_cli.errors import PlanError
    from della_cli.preflight import plan_merge
    from della_cli.stages import read_stages

    stages = read_stages(recipe_path)
    if stages is not None:
        _plan_stages(stages, out, options, as_json, check_push)
        return
    report = plan_merge(recipe_path, out, options)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        if not report.can_run:
            raise typer.Exit(2)
        if check_push:
            check_push()
        return
    if not report.can_run:
        raise PlanError(report.problems)
    if check_push:
        check_push()
    for message in report.warnings:
        typer.echo(f"warning: {message}", err=True)
    for line in report.summary_lines():
        typer.echo(line)
    typer.echo(
        "the merge can run; nothing downloaded, nothing written" + (" (dry run)" if out else "")
    )


def _plan_stages(stages, out: Path | None, options, as_json: bool, check_push=None) -> None:
    """``print_plan`` of a multi-stage file: every stage planned in the order it runs."""
    from della_cli.errors import PlanError
    from della_cli.stage_plans import plan_stages, stage_problems

    plans = plan_stages(stages, out, options)
    problems = stage_problems(plans)
    if as_json:
        typer.echo(json.dumps({"stages": [p.to_dict() for p in plans], "can_run": not problems}))
        if problems:
            raise typer.Exit(2)
    elif problems:
        raise PlanError(problems)
    if check_push:
        check_push()
    if as_json:
        return
    for p in plans:
        for message in p.report.warnings if p.report is not None else p.stage.recipe.schema.notes:
            typer.echo(f"warning: {p.stage.label}: {message}", err=True)
    for p in plans:
        reads = (
            f", reads {', '.join(repr(n) for n in p.stage.depends_on)}"
            if p.stage.depends_on
            else ""
        )
        typer.echo(f"{p.stage.label} → {p.output}{reads}")
        lines = p.report.summary_lines() if p.report is not None else [p.unchecked]
        lines = [p.note, *lines] if p.note else lines
        for line in lines:
            typer.echo(f"  {line}")
    typer.echo(
        f"the {len(plans)} stages can run; nothing downloaded, nothing written"
        + (" (dry run)" if out else "")
    )


def plan(
    recipe: Annotated[
        Path, typer.Argument(help="The YAML recipe.", show_default=False, metavar="RECIPE")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Where the output would go (checked, disk counted).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    devices: DevicesOption = None,
    out_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="OUT may exist (it would be replaced).")] = False,
    strict: Annotated[
        bool, typer.Option(help="Tensors missing from a model are problems.")
    ] = False,
    allow_pickle: AllowPickleOption = False,
    parts: Annotated[
        int | None,
        typer.Option(help="Also show each of N parts' download, reads, writes, memory, disk."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Plan the merge of RECIPE from headers only, downloading no weights (exit 0 when it can
    run, 2 when it cannot)."""
    from della_cli.api import MergeOptions

    with reported_errors():
        options = MergeOptions(
            device=devices or device,
            out_shard_bytes=parse_size(out_shard_size),
            overwrite=overwrite,
            strict=strict,
            allow_pickle=allow_pickle,
        )
        options.progress = not as_json
        if parts is not None:
            from della_cli.cli_parts import print_parts

            print_parts(recipe, out, options, parts, as_json)
            return
        print_plan(recipe, out, options, as_json)
