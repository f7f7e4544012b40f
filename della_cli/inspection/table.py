"""The terminal form of ``della inspect``: one line per tensor group, then the whole model.

Experts are named by letters (A, B, ...) listed at the top; group lines show each expert's
relative norm and, for pairwise and per-expert figures, their mean over pairs or experts (the
JSON has every value).
"""

from __future__ import annotations

from della_cli.inspection.run import InspectReport

_KEPT = (("ties", "TIES"), ("dare", "DARE"), ("magprune", "MAGPRUNE"), ("breadcrumbs", "bc"))


def expert_letters(count: int) -> list[str]:
    return [chr(ord("A") + i) if i < 26 else f"E{i + 1}" for i in range(count)]


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def mean_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def pairs(matrix: list[list[float | None]]) -> list[tuple[int, int, float | None]]:
    return [(s, t, matrix[s][t]) for s in range(len(matrix)) for t in range(s + 1, len(matrix))]


def _group_cells(metrics: dict) -> list[str]:
    kept = metrics["kept_mass"]
    return [
        str(metrics["tensors"]),
        " ".join(_number(v) for v in metrics["relative_norm"]),
        _number(mean_of([v for _, _, v in pairs(metrics["cosine"])])),
        _percent(metrics["sign_conflict"]),
        _percent(mean_of(metrics["topd_sign_conflict"])),
        _number(mean_of([v for _, _, v in pairs(metrics["topd_jaccard"])])),
        " ".join(_percent(mean_of(kept[name])) for name in ("ties", "magprune", "breadcrumbs")),
    ]


def table_lines(report: InspectReport) -> list[str]:
    """The report as aligned text (no trailing spaces)."""
    letters = expert_letters(len(report.experts))
    against = "‖θ₀‖" if report.reference == "base" else "‖θ̄‖ (the models' mean)"
    lines = [f"{report.method}: {len(letters)} model(s) against the {report.reference}"]
    for letter, expert in zip(letters, report.experts, strict=True):
        assumed = f" ({', '.join(expert['assumed'])} assumed)" if expert["assumed"] else ""
        lines.append(
            f"  {letter} = {expert['model']}: density {expert['density']:g}, epsilon "
            f"{expert['epsilon']:g}, gamma {expert['gamma']:g}{assumed}"
        )
    header = [
        "group",
        "tensors",
        f"‖δ‖/{against.split()[0]}",
        "cosine",
        "conflict",
        "top-d conflict",
        "Jaccard",
        "kept TIES MAGPRUNE bc",
    ]
    rows = [[group["group"], *_group_cells(group)] for group in report.groups]
    rows.append(["all", *_group_cells(report.model)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines.append("")
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    lines += ["", *summary_lines(report, letters, against)]
    return lines


def summary_lines(report: InspectReport, letters: list[str], against: str) -> list[str]:
    """The whole model: every expert's figures and every pair's."""
    model = report.model
    lines = [
        f"whole model: {model['tensors']} tensors, {model['entries']} entries; signs conflict "
        f"on {_percent(model['sign_conflict'])} of them"
    ]
    header = ["", f"‖δ‖/{against.split()[0]}", "top-d conflict"] + [label for _, label in _KEPT]
    rows = [
        [
            letter,
            _number(model["relative_norm"][t], 4),
            _percent(model["topd_sign_conflict"][t]),
            *(_percent(model["kept_mass"][name][t]) for name, _ in _KEPT),
        ]
        for t, letter in enumerate(letters)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append(
            "  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        )
    for name, key in (("cosine", "cosine"), ("top-d Jaccard", "topd_jaccard")):
        cells = [f"{letters[s]}·{letters[t]} {_number(v)}" for s, t, v in pairs(model[key])]
        if cells:
            lines.append(f"  {name}: " + ", ".join(cells))
    lines.append("  (kept: share of each task vector's L1 mass kept before rescale; DARE keeps d")
    lines.append("  by construction, MAGPRUNE the expectation over its random drops)")
    return lines
