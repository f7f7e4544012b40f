"""``della inspect`` and ``della verify``: what the models of a recipe do to one another, and
whether a model folder is healthy; neither writes a model."""

import json
from pathlib import Path
from typing import Annotated

import typer

from della_cli.cli_common import AllowPickleOption, JsonOption, loaded, reported_errors


def inspect(
    recipe: Annotated[
        Path, typer.Argument(help="The YAML recipe.", show_default=False, metavar="RECIPE")
    ],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    png: Annotated[Path | None, typer.Option(help="Write heatmaps over layers as a PNG.")] = None,
    html: Annotated[
        Path | None, typer.Option(help="Write heatmaps and table as a self-contained HTML page.")
    ] = None,
    allow_pickle: AllowPickleOption = False,
    as_json: JsonOption = False,
) -> None:
    """Show where the models of RECIPE conflict: task-vector norms, cosines, sign conflicts,
    top-d overlap and what each sparsifier keeps, per tensor group and layer (writes nothing
    but the pictures asked for)."""
    from della_cli.api import MergeOptions
    from della_cli.inspection import picture, table
    from della_cli.inspection.run import inspect_recipe

    loaded()
    with reported_errors():
        options = MergeOptions(device=device, allow_pickle=allow_pickle, progress=not as_json)
        if png is not None:
            picture.require_matplotlib()
        report = inspect_recipe(recipe, options)
        if png is not None:
            picture.write_png(report, png)
        if html is not None:
            picture.write_html(report, html)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    for message in report.warnings:
        typer.echo(f"warning: {message}", err=True)
    for line in table.table_lines(report):
        typer.echo(line)


def verify(
    folder: Annotated[
        Path, typer.Argument(help="A model folder.", show_default=False, metavar="FOLDER")
    ],
    generate: Annotated[
        bool, typer.Option(help="Also load the model with transformers and generate.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Check a model folder: files, shapes against config, NaN/Inf, tokenizer (exit 0 healthy,
    1 not, 2 when FOLDER is not a folder)."""
    from della_cli.errors import UsageError
    from della_cli.verify import verify_model

    with reported_errors():
        if not folder.is_dir():
            raise UsageError(f"{folder} is not a folder")
        report = verify_model(folder, generate=generate)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        for check in report.checks:
            typer.echo(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
        typer.echo(f"{folder}: {'healthy' if report.healthy else 'NOT healthy'}")
    if not report.healthy:
        raise typer.Exit(1)
