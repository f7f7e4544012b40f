"""``della methods`` and ``della demo``: the merge methods della knows with their parameters,
and tiny example models merged and run, for a first look."""

import json
from pathlib import Path
from typing import Annotated

import typer

from della_cli.cli_common import JsonOption, reported_errors


def methods(as_json: JsonOption = False) -> None:
    """List the merge methods, their parameters and defaults."""
    from della_cli.methods import METHODS

    rows = []
    for spec in METHODS.values():
        rows.append(
            {
                "name": spec.name,
                "summary": spec.summary,
                "paper": spec.paper,
                "needs_base": spec.needs_base,
                "sign_consensus": spec.sign_consensus,
                "normalize_default": spec.normalize_default,
                "model_parameters": list(spec.expert_parameters),
                "merge_parameters": list(spec.global_parameters),
                "required": list(spec.required_parameters),
                "parameters": _catalog_parameters(spec),
                "passes": list(spec.catalog.passes) if spec.catalog else ["merge"],
            }
        )
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        typer.echo(f"{row['name']}: {row['summary']}")
        typer.echo(f"    paper: {row['paper']}")
        if row["parameters"] is not None:
            described = [_described_parameter(p) for p in row["parameters"]]
            typer.echo(f"    parameters: {'; '.join(described) or 'none'}")
            typer.echo(f"    passes over each tensor: {len(row['passes'])}")
            continue
        typer.echo(
            f"    per model: {', '.join(row['model_parameters'])} (weight defaults to 1.0"
            + (f"; required: {', '.join(row['required'])})" if row["required"] else ")")
        )
        typer.echo(
            f"    merge-wide: {', '.join(row['merge_parameters'])} (normalize defaults "
            f"to {str(row['normalize_default']).lower()}"
            + ("; lambda to 1.0" if "lambda" in row["merge_parameters"] else "")
            + ")"
        )


def _catalog_parameters(spec) -> list[dict] | None:
    """A catalog method's parameters (``methods.catalog``), or None for the pipeline's."""
    if spec.catalog is None:
        return None
    return [
        {
            "name": p.name,
            "scope": p.scope.value,
            "default": p.default,
            "required": p.required,
            "minimum": p.minimum,
            "maximum": p.maximum,
            "meaning": p.meaning,
        }
        for p in spec.catalog.parameters
    ]


def _described_parameter(parameter: dict) -> str:
    scope = {"shared": "merge-wide", "per_input": "per input", "per_non_base": "per model"}
    default = "required" if parameter["required"] else f"default {parameter['default']}"
    bounds = [
        f"≥ {parameter['minimum']:g}" if parameter["minimum"] is not None else "",
        f"≤ {parameter['maximum']:g}" if parameter["maximum"] is not None else "",
    ]
    extra = ", ".join([default, *[b for b in bounds if b]])
    return f"{parameter['name']} ({scope[parameter['scope']]}, {extra})"


def demo(
    folder: Annotated[
        Path,
        typer.Argument(
            help="Where to build the example models (kept for the next steps).",
            metavar="FOLDER",
        ),
    ] = Path("della-demo"),
) -> None:
    """Build tiny example models in FOLDER, merge them with DELLA, load and run the result."""
    from della_cli.demo import run_demo

    with reported_errors():
        run_demo(folder, typer.echo)
