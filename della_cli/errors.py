"""The project's error types. Each maps to an exit code and is shown as one line, no traceback.

Exit codes: 0 success, 2 bad usage, recipe or input model, 1 merge or IO failure,
130 interrupted.
"""

from __future__ import annotations

import re

# A control character from a hostile name or value (a newline in a tensor name, a NUL in a
# model path) would break the one-line message, or the terminal: shown escaped instead.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """``text`` with every control character escaped as Python writes it (``\\n``, ``\\x00``)."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


class DellaError(Exception):
    """Base of every error della reports to the user as one line."""

    exit_code = 1

    def __str__(self) -> str:
        return one_line(super().__str__())


class UsageError(DellaError):
    """The user asked for something that cannot be done as asked (exit 2)."""

    exit_code = 2


class RecipeError(UsageError):
    """The recipe is malformed or breaks a rule; the message names the field path."""


class ModelError(UsageError):
    """An input model folder or file is missing, malformed, or incompatible."""


class PlanError(UsageError):
    """The models cannot be merged as the recipe says; lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = [one_line(problem) for problem in problems]
        count = len(problems)
        head = "1 problem" if count == 1 else f"{count} problems"
        super().__init__(f"the merge cannot run ({head}):\n  - " + "\n  - ".join(self.problems))

    def __str__(self) -> str:  # one line per problem, each escaped above
        return Exception.__str__(self)


class OutputError(UsageError):
    """The output destination cannot be used as asked (exists, is a file, ...)."""


class MergeFailure(DellaError):
    """The merge started but failed (IO error, disk full, ...); nothing was left behind."""


class HubError(DellaError):
    """Talking to the Hugging Face Hub failed: no token, no permission, network down (exit 1)."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, bounded: a value from a hostile file (an alias
    bomb, a list nested 100k deep, a megabyte string) is shown by its first ``limit``
    characters and never expanded in full, so printing an error cannot hang or exhaust
    memory."""
    import reprlib

    bounded = reprlib.Repr()
    bounded.maxlevel, bounded.maxstring, bounded.maxother = 3, limit, limit
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = 8
    text = bounded.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
