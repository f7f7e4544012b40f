"""``della inspect``'s pictures: heatmaps over layers, as a PNG and as a self-contained HTML page.

Each heatmap has a row per tensor group that repeats over layers and a column per layer. The PNG
needs matplotlib (``pip install della-cli[inspect]``); the HTML page draws its heatmaps as
inline SVG and needs nothing, loads nothing (no scripts, styles or fonts from elsewhere).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from della_cli.errors import UsageError
from della_cli.inspection.run import InspectReport
from della_cli.inspection.table import mean_of, pairs, table_lines

Grid = list[list[float | None]]  # (groups, layers)
Panel = tuple[str, tuple[float, float] | None, Grid]  # title, colour scale, values


def _panel_values(metrics: dict) -> list[float | None]:
    kept = metrics["kept_mass"]
    return [
        mean_of(metrics["relative_norm"]),
        mean_of([v for _, _, v in pairs(metrics["cosine"])]),
        metrics["sign_conflict"],
        mean_of([v for _, _, v in pairs(metrics["topd_jaccard"])]),
        mean_of(kept["ties"]),
        mean_of(kept["magprune"]),
    ]


# Titles, and the colour scale of figures with natural bounds (None: the values' own range).
PANELS: tuple[tuple[str, tuple[float, float] | None], ...] = (
    ("task-vector norm / reference norm (mean over models)", None),
    ("cosine of task vectors (mean over pairs)", (-1.0, 1.0)),
    ("share of entries whose signs conflict", (0.0, 1.0)),
    ("Jaccard overlap of top-d masks (mean over pairs)", (0.0, 1.0)),
    ("L1 mass TIES keeps (mean over models)", (0.0, 1.0)),
    ("L1 mass MAGPRUNE keeps, expected (mean over models)", (0.0, 1.0)),
)


def heatmaps(report: InspectReport) -> tuple[list[str], list[int], list[Panel]]:
    """Groups that span layers, the layer indices, and one (groups, layers) grid per panel."""
    groups = [group for group in report.groups if group["layers"]]
    layers = sorted({cell["layer"] for group in groups for cell in group["layers"]})
    grids: list[Grid] = [[] for _ in PANELS]
    for group in groups:
        by_layer = {cell["layer"]: _panel_values(cell) for cell in group["layers"]}
        for index, grid in enumerate(grids):
            grid.append([by_layer[layer][index] if layer in by_layer else None for layer in layers])
    names = [group["group"] for group in groups]
    return (
        names,
        layers,
        [(title, scale, grid) for (title, scale), grid in zip(PANELS, grids, strict=True)],
    )


def require_matplotlib() -> None:
    """Refuse ``--png`` up front, before the models are read, where matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(
            "--png needs matplotlib; install it with pip install 'della-cli[inspect]' "
            "(or use --html, which needs nothing)"
        ) from None


def write_png(report: InspectReport, path: Path) -> None:
    """The heatmaps as one PNG (matplotlib, imported here, drawing off screen)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names, layers, panels = heatmaps(report)
    if not layers:
        raise UsageError("--png: the models have no numbered layers to draw over")
    height = 1.2 + 0.28 * len(names)
    figure, axes = plt.subplots(
        len(panels), 1, figsize=(max(6.0, 0.35 * len(layers) + 4), height * len(panels))
    )
    for axis, (title, scale, grid) in zip(np.atleast_1d(axes), panels, strict=True):
        values = np.array([[np.nan if v is None else v for v in row] for row in grid])
        low, high = scale or (None, None)
        image = axis.imshow(
            values, aspect="auto", cmap="viridis", interpolation="nearest", vmin=low, vmax=high
        )
        axis.set_title(title, fontsize=9)
        axis.set_yticks(range(len(names)), [_short(name) for name in names], fontsize=7)
        axis.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
        axis.set_xlabel("layer", fontsize=8)
        figure.colorbar(image, ax=axis)
    figure.tight_layout()
    try:
        figure.savefig(path, format="png", dpi=100)
    except OSError as error:
        raise UsageError(f"--png {path}: cannot write ({error.strerror or error})") from error
    finally:
        plt.close(figure)


def _short(group: str) -> str:
    """A group name without the prefix every layer tensor shares."""
    return group.split(".*.", 1)[1] if ".*." in group else group


# viridis at five stops; values between are interpolated
_STOPS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def _color(value: float | None, low: float, high: float) -> str:
    if value is None or math.isnan(value):
        return "#dddddd"
    position = 0.0 if high <= low else (value - low) / (high - low) * (len(_STOPS) - 1)
    index = min(int(position), len(_STOPS) - 2)
    fraction = position - index
    red, green, blue = (
        round(a + (b - a) * fraction) for a, b in zip(_STOPS[index], _STOPS[index + 1], strict=True)
    )
    return f"#{red:02x}{green:02x}{blue:02x}"


def svg_heatmap(
    title: str, scale: tuple[float, float] | None, names: list[str], layers: list[int], grid: Grid
) -> str:
    """One heatmap as inline SVG, each cell titled with its value (a tooltip in browsers)."""
    cell, left, top = 18, 8 * max((len(_short(n)) for n in names), default=4) + 10, 34
    known = [v for row in grid for v in row if v is not None and not math.isnan(v)]
    low, high = scale or ((min(known), max(known)) if known else (0.0, 1.0))
    heading = f"{title} (colours from {low:.4g} to {high:.4g})"
    width = max(left + cell * len(layers) + 10, 8 * len(heading))  # room for the heading
    height = top + cell * len(names) + 24
    parts = [
        f'<svg width="{width}" height="{height}" role="img">',
        f'<text x="0" y="14" font-size="13">{html.escape(heading)}</text>',
    ]
    for row, (name, values) in enumerate(zip(names, grid, strict=True)):
        y = top + row * cell
        parts.append(
            f'<text x="{left - 4}" y="{y + 13}" font-size="11" text-anchor="end">'
            f"{html.escape(_short(name))}</text>"
        )
        for column, value in enumerate(values):
            label = "none" if value is None else f"{value:.4g}"
            parts.append(
                f'<rect x="{left + column * cell}" y="{y}" width="{cell}" height="{cell}" '
                f'fill="{_color(value, low, high)}"><title>{html.escape(name)}, layer '
                f"{layers[column]}: {label}</title></rect>"
            )
    for column, layer in enumerate(layers):
        x = left + column * cell + cell // 2
        parts.append(
            f'<text x="{x}" y="{height - 8}" font-size="10" text-anchor="middle">{layer}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def html_page(report: InspectReport) -> str:
    """The heatmaps, the table and the warnings on one page that loads nothing else."""
    names, layers, panels = heatmaps(report)
    body = [f"<h1>della inspect: {html.escape(report.recipe)}</h1>"]
    if report.warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in report.warnings)
        body.append(f"<h2>Warnings</h2><ul>{items}</ul>")
    if layers:
        body.append("<h2>Over layers</h2>")
        body += [f"<p>{svg_heatmap(t, s, names, layers, g)}</p>" for t, s, g in panels]
    body.append(f"<h2>Table</h2><pre>{html.escape(chr(10).join(table_lines(report)))}</pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>della inspect: {html.escape(report.recipe)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}pre{font-size:12px}</style>"
        "</head><body>" + "\n".join(body) + "</body></html>\n"
    )


def write_html(report: InspectReport, path: Path) -> None:
    try:
        path.write_text(html_page(report), encoding="utf-8")
    except OSError as error:
        raise UsageError(f"--html {path}: cannot write ({error.strerror or error})") from error
