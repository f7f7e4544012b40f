"""The user's evaluation command, run on one candidate, and the score read from what it prints.

The command is a shell line in which ``{model}`` stands for the candidate's folder (quoted for
the shell). Its score is the last non-empty line of its standard output, a number; or, with a
score field, a value in the JSON it prints (its whole output, else its last line), found by a
dotted path such as ``results.arc_easy.acc,none``. What it writes on stderr passes through.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
from pathlib import Path

from della_cli.errors import UsageError

PLACEHOLDER = "{model}"


class ScoreError(Exception):
    """The command failed or printed no score; the candidate is recorded as failed."""


def check_command(command: str) -> None:
    if PLACEHOLDER not in command:
        raise UsageError(
            f"--eval: the command must name the candidate as {PLACEHOLDER}, e.g. "
            f"--eval 'python score.py {PLACEHOLDER}'"
        )


def evaluate(command: str, model: Path, score_field: str | None, quiet: bool = False) -> float:
    """Run ``command`` on ``model`` and return its score (ScoreError when there is none)."""
    line = command.replace(PLACEHOLDER, shlex.quote(str(model)))
    done = subprocess.run(
        line,
        shell=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else None,
        text=True,
        errors="replace",
        check=False,
    )
    if done.returncode != 0:
        raise ScoreError(f"the evaluation command exited with status {done.returncode}")
    return read_score(done.stdout, score_field)


def read_score(stdout: str, score_field: str | None) -> float:
    """The score in a command's output (see the module docstring)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ScoreError("the evaluation command printed nothing on stdout")
    if score_field is None:
        value: object = lines[-1]
        try:
            score = float(lines[-1])
        except ValueError:
            raise ScoreError(f"its last line {lines[-1][:60]!r} is not a number") from None
    else:
        value = _field(_json_of(stdout, lines[-1]), score_field)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ScoreError(f"its field {score_field} is {str(value)[:60]!r}, not a number")
        score = float(value)
    if not math.isfinite(score):
        raise ScoreError(f"its score is {value}")
    return score


def _json_of(stdout: str, last_line: str) -> object:
    for text in (stdout, last_line):
        try:
            return json.loads(text)
        except ValueError:
            continue
    raise ScoreError("its output is not JSON (neither the whole of it nor its last line)")


def _field(document: object, path: str) -> object:
    value = document
    for key in path.split("."):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise ScoreError(f"its JSON has no field {path} (stopped at '{key}')")
    return value
