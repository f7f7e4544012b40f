"""The sweep's picture: the score against each swept parameter, one panel per parameter.

Each point is a setting's mean score over its seeds, with a bar of ± its spread; the best
setting is drawn in red. Where several parameters are swept, a panel shows every setting at its
value of that parameter (the others vary among the points). A PNG with matplotlib where it is
installed (as ``della inspect --png`` draws), else an SVG written here, which needs nothing.
"""

from __future__ import annotations

import html
from pathlib import Path

from della_cli.io.atomic import write_atomically
from della_cli.sweep.results import SettingResult

Point = tuple[float, float, float, bool]  # x, mean, spread, best


def panels(
    results: list[SettingResult], best: SettingResult | None
) -> list[tuple[str, list[str] | None, list[Point]]]:
    """Per parameter: its name, the labels of its values where they are not numbers (placed
    at 0, 1, ... in the order first seen), and its points."""
    scored = [row for row in results if row.scores]
    names = list(results[0].values) if results else []
    drawn = []
    for name in names:
        values = [row.values[name] for row in scored]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        labels = None if numeric else list(dict.fromkeys(str(v) for v in values))
        points = [
            (
                float(row.values[name]) if numeric else labels.index(str(row.values[name])),
                row.mean,
                row.spread,
                row is best,
            )
            for row in scored
        ]
        drawn.append((name, labels, points))
    return drawn


def write_plot(folder: Path, results: list[SettingResult], best, score_name: str) -> Path:
    """``sweep.png`` (matplotlib) or ``sweep.svg`` in the sweep folder; returns its path."""
    try:
        import matplotlib
    except ImportError:
        path = folder / "sweep.svg"
        write_atomically(path, svg(panels(results, best), score_name))
        return path
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = panels(results, best)
    figure, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn), 3.4), squeeze=False)
    for axis, (name, labels, points) in zip(axes[0], drawn, strict=True):
        for x, mean, spread, is_best in points:
            colour = "tab:red" if is_best else "tab:blue"
            axis.errorbar(x, mean, yerr=spread, fmt="o", color=colour, capsize=3, alpha=0.8)
        if labels is not None:
            axis.set_xticks(range(len(labels)), labels)
        axis.set_xlabel(name)
        axis.set_ylabel(score_name)
        axis.grid(alpha=0.3)
    figure.suptitle("della sweep: mean score over seeds (± spread); best in red", fontsize=10)
    figure.tight_layout()
    path = folder / "sweep.png"
    partial = folder / ".sweep.png.partial"
    try:
        figure.savefig(partial, format="png", dpi=100)
    finally:
        plt.close(figure)
    partial.replace(path)
    return path


def svg(drawn: list[tuple[str, list[str] | None, list[Point]]], score_name: str) -> str:
    """The same panels as a self-contained SVG."""
    width, height, margin = 300, 220, 40
    parts = []
    for index, (name, labels, points) in enumerate(drawn):
        left = index * width
        parts.append(_svg_panel(left, width, height, margin, name, labels, points, score_name))
    total = max(width * len(drawn), width)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="{height}" '
        f'font-family="sans-serif" font-size="11">' + "".join(parts) + "</svg>\n"
    )


def _svg_panel(left, width, height, margin, name, labels, points, score_name) -> str:
    if not points:
        return ""
    xs = [p[0] for p in points]
    lows = [p[1] - p[2] for p in points]
    highs = [p[1] + p[2] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(lows), max(highs)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)

    def at(x: float, y: float) -> tuple[float, float]:
        inner_w, inner_h = width - 2 * margin, height - 2 * margin
        return (
            left + margin + (x - x0) / (x1 - x0) * inner_w,
            height - margin - (y - y0) / (y1 - y0) * inner_h,
        )

    out = [
        f'<rect x="{left + margin}" y="{margin}" width="{width - 2 * margin}" '
        f'height="{height - 2 * margin}" fill="none" stroke="#999"/>',
        f'<text x="{left + width / 2}" y="{height - 8}" text-anchor="middle">'
        f"{html.escape(name)}</text>",
        f'<text x="{left + 4}" y="{margin - 8}">{html.escape(score_name)} '
        f"[{y0:.4g}, {y1:.4g}]</text>",
    ]
    for x, mean, spread, is_best in points:
        colour = "#d62728" if is_best else "#1f77b4"
        cx, cy = at(x, mean)
        _, top = at(x, mean + spread)
        _, bottom = at(x, mean - spread)
        out.append(f'<line x1="{cx}" y1="{top}" x2="{cx}" y2="{bottom}" stroke="{colour}"/>')
        out.append(f'<circle cx="{cx}" cy="{cy}" r="4" fill="{colour}"/>')
    for x in sorted(set(xs)):
        cx, _ = at(x, y0)
        label = labels[int(x)] if labels is not None else f"{x:g}"
        out.append(
            f'<text x="{cx}" y="{height - margin + 14}" text-anchor="middle">'
            f"{html.escape(label)}</text>"
        )
    return "".join(out)
