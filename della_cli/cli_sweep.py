"""The ``della sweep`` command: its options, and its table on stdout (``della_cli.sweep`` runs it).

Kept out of ``cli.py`` (which registers it in a line) so that each command's options stay
readable; it takes the CLI's error reporting as an argument rather than importing the CLI.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from della_cli.sizes import human_size, parse_size


def sweep_command(reported_errors: Callable, loaded: Callable[[], None]) -> Callable:
    """The command function, typer options and all, using the CLI's ``reported_errors``."""

    def sweep(
        recipe: Annotated[
            Path, typer.Argument(help="The YAML recipe.", show_default=False, metavar="RECIPE")
        ],
        eval_command: Annotated[
            str,
            typer.Option(
                "--eval",
                help="Shell command scoring a candidate; {model} is its folder. The last line "
                "it prints is the score (or see --score-field).",
                show_default=False,
            ),
        ],
        grid: Annotated[
            list[str] | None,
            typer.Option(
                help="NAME=V1,V2,...: values to try. NAME is a parameter of the recipe's "
                "top-level block (density, lambda), of one model (models[1].weight), or of "
                "the model named NAME (weight@math). Repeat for a grid.",
                show_default=False,
            ),
        ] = None,
        random: Annotated[
            list[str] | None,
            typer.Option(
                help="NAME=LOW:HIGH: a range to draw from uniformly (with --trials).",
                show_default=False,
            ),
        ] = None,
        trials: Annotated[
            int | None,
            typer.Option(help="Random search: this many settings, drawn from the recipe's seed."),
        ] = None,
        seeds: Annotated[
            int, typer.Option(help="Merge each setting with this many seeds (random methods).")
        ] = 1,
        score_field: Annotated[
            str | None,
            typer.Option(help="Read the score from the JSON it prints, e.g. results.task.acc."),
        ] = None,
        minimize: Annotated[bool, typer.Option(help="Lower scores are better.")] = False,
        keep_all: Annotated[
            bool, typer.Option(help="Keep every candidate's merge, not only the best.")
        ] = False,
        out: Annotated[
            Path | None,
            typer.Option(help="The sweep folder (default: RECIPE's name + '-sweep', here)."),
        ] = None,
        device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
        threads: Annotated[
            int | None, typer.Option(min=1, help="Compute threads of each merge.")
        ] = None,
        memory: Annotated[
            str | None,
            typer.Option(
                help="Memory the candidates merged together may hold, e.g. 8GiB: those that "
                "fit are merged in one pass over the inputs (default: half the available).",
                show_default=False,
                metavar="SIZE",
            ),
        ] = None,
        quiet: Annotated[
            bool,
            typer.Option("--quiet", "-q", help="No progress lines; the command's stderr hidden."),
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    ) -> None:
        """Merge RECIPE with every setting of a grid (or a random search), score each merge with
        your --eval command, and keep the best: a results table (CSV, JSON) and a plot in the
        sweep folder. Rerun the same command to resume an interrupted sweep."""
        from della_cli.api import MergeOptions
        from della_cli.sweep.results import table_lines
        from della_cli.sweep.runner import SweepRequest, run_sweep

        loaded()
        with reported_errors():
            options = MergeOptions(device=device, threads=threads)
            options.progress = not (quiet or as_json)
            request = SweepRequest(
                recipe=recipe,
                out=out or Path(f"{recipe.stem}-sweep"),
                eval_command=eval_command,
                grid=list(grid or []),
                random=list(random or []),
                trials=trials,
                seeds=seeds,
                score_field=score_field,
                minimize=minimize,
                keep_all=keep_all,
                quiet=quiet,
                memory=None if memory is None else parse_size(memory, "--memory"),
                options=options,
            )
            say = (
                (lambda line: None) if quiet or as_json else lambda line: typer.echo(line, err=True)
            )
            try:
                report = run_sweep(request, say, lambda m: typer.echo(f"warning: {m}", err=True))
            except KeyboardInterrupt:
                if not (request.out / "sweep_state.json").exists():
                    raise  # stopped before the sweep began: nothing was written
                typer.echo(
                    f"error: interrupted; what was finished is kept in {request.out}: run the "
                    "same command again to resume",
                    err=True,
                )
                raise typer.Exit(130) from None
        for name, reason in report.failures.items():
            typer.echo(f"warning: {name}: {reason}", err=True)
        if as_json:
            typer.echo(json.dumps(_summary(report)))
            return
        for line in table_lines(report.results, report.best):
            typer.echo(line)
        if not quiet:
            size = sum(p.stat().st_size for p in report.kept.rglob("*") if p.is_file())
            typer.echo(
                f"best: {report.kept} ({human_size(size)}); {report.merged} merged, "
                f"{report.evaluated} scored now, {report.resumed} from before; "
                f"table in {report.folder / 'results.csv'}, plot in {report.plot}"
            )

    return sweep


def _summary(report) -> dict:
    return {
        "folder": str(report.folder),
        "kept": str(report.kept),
        "best": report.best.to_dict() if report.best else None,
        "settings": [row.to_dict() for row in report.results],
        "plot": str(report.plot),
        "merged": report.merged,
        "evaluated": report.evaluated,
        "resumed": report.resumed,
        "failures": report.failures,
    }
