"""A sweep's record: the state file that lets it resume, and its results table (CSV, JSON, and
the lines printed), one row per setting with the mean and spread of its seeds' scores."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from della_cli.io.atomic import write_atomically
from della_cli.sweep.candidates import Candidate

STATE_FILE = "sweep_state.json"
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"


@dataclass
class SweepState:
    """What a sweep has done so far: each scored candidate's score, each failed one's reason,
    and, once it is over, the candidate kept. Saved after every candidate, atomically."""

    fingerprint: str
    scores: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    kept: str | None = None

    @classmethod
    def load(cls, folder: Path) -> SweepState | None:
        """The state in ``folder``, or None where there is none (or it is unreadable: a file
        della wrote whole is never half-written, so that is someone else's file)."""
        try:
            data = json.loads((folder / STATE_FILE).read_text())
            return cls(data["fingerprint"], data["scores"], data["failures"], data["kept"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, folder: Path) -> None:
        write_atomically(folder / STATE_FILE, json.dumps(asdict(self), indent=1))


@dataclass
class SettingResult:
    """One setting's scores over its seeds (candidates not scored are left out)."""

    setting: int
    values: dict[str, Any]
    seeds: list[int]
    scores: list[float]
    candidates: list[str]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.scores) if self.scores else None

    @property
    def spread(self) -> float | None:
        """The sample standard deviation over seeds (0 for a single score)."""
        if not self.scores:
            return None
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": self.mean, "spread": self.spread}


def summarize(candidates: list[Candidate], scores: dict[str, float]) -> list[SettingResult]:
    """The results per setting, in the settings' order."""
    results: dict[int, SettingResult] = {}
    for candidate in candidates:
        row = results.setdefault(
            candidate.setting, SettingResult(candidate.setting, candidate.values, [], [], [])
        )
        if candidate.name in scores:
            row.seeds.append(candidate.seed)
            row.scores.append(scores[candidate.name])
            row.candidates.append(candidate.name)
    return list(results.values())


def best_of(results: list[SettingResult], minimize: bool) -> SettingResult | None:
    """The setting of the best mean score (the first such in the sweep's order on a tie)."""
    scored = [row for row in results if row.scores]
    if not scored:
        return None
    sign = 1 if minimize else -1
    return min(scored, key=lambda row: sign * row.mean)


def kept_candidate(row: SettingResult, minimize: bool) -> str:
    """Of the best setting's seeds, the merge kept: the one of the best score."""
    pairs = list(zip(row.scores, row.candidates, strict=True))
    return (min if minimize else max)(pairs, key=lambda pair: pair[0])[1]


def csv_text(results: list[SettingResult]) -> str:
    """One row per setting: its values, the mean and spread of its scores, each score."""
    names = list(results[0].values) if results else []
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*names, "mean", "spread", "seeds", "scores"])
    for row in results:
        writer.writerow(
            [
                *(row.values[name] for name in names),
                _number(row.mean),
                _number(row.spread),
                len(row.scores),
                " ".join(_number(score) for score in row.scores),
            ]
        )
    return buffer.getvalue()


def write_results(
    folder: Path, results: list[SettingResult], state: SweepState, extra: dict[str, Any]
) -> None:
    """``results.csv`` and ``results.json`` in the sweep folder."""
    write_atomically(folder / RESULTS_CSV, csv_text(results))
    document = {
        **extra,
        "kept": state.kept,
        "settings": [row.to_dict() for row in results],
        "failures": state.failures,
    }
    write_atomically(folder / RESULTS_JSON, json.dumps(document, indent=1))


def table_lines(results: list[SettingResult], best: SettingResult | None) -> list[str]:
    """The table as printed: aligned columns, the best setting marked with ``*``."""
    names = list(results[0].values) if results else []
    header = [*names, "mean", "± spread", "seeds"]
    rows = [
        [
            *(str(row.values[name]) for name in names),
            _number(row.mean),
            _number(row.spread),
            str(len(row.scores)),
        ]
        for row in results
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

    def line(cells: list[str], mark: str) -> str:
        return mark + "  ".join(
            cell.rjust(width) for cell, width in zip(cells, widths, strict=True)
        )

    lines = [line(header, "  ")]
    for row, cells in zip(results, rows, strict=True):
        lines.append(line(cells, "* " if row is best else "  "))
    return lines


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"
