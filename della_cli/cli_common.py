"""What every della command shares: known errors turned into one line and an exit code, the
options several commands take, and the garbage collector paused while a command loads.

No ``from __future__ import annotations`` in the command modules: typer would evaluate the
string annotations on every run (bench/RESULTS.md).
"""

import gc
import os
import traceback
from contextlib import contextmanager
from typing import Annotated

import typer

from della_cli.errors import DellaError

EXIT_INTERRUPTED = 130


def fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@contextmanager
def reported_errors(hint: str | None = None):
    """Turn known errors into one line and an exit code; SIGINT and SIGTERM raise
    KeyboardInterrupt once, and later signals are ignored so that the clean-up completes
    (``io.interrupts``). ``hint`` is added to merge and IO failures (exit 1)."""
    from della_cli.io import interrupts

    with interrupts.raising():
        try:
            yield
        except DellaError as error:
            if os.environ.get("DELLA_DEBUG"):
                traceback.print_exc()
            message = f"{error}; {hint}" if hint and error.exit_code == 1 else str(error)
            raise fail(message, error.exit_code) from None
        except KeyboardInterrupt:
            raise fail(interrupts.message(), EXIT_INTERRUPTED) from None
        except typer.Exit:
            raise
        except Exception as error:
            if os.environ.get("DELLA_DEBUG"):
                traceback.print_exc()
            if interrupts.received():  # e.g. numba's SystemError around a KeyboardInterrupt
                raise fail(interrupts.message(), EXIT_INTERRUPTED) from None
            raise fail(
                f"unexpected {type(error).__name__}: {error} (set DELLA_DEBUG=1 for the "
                "traceback and report it)",
                1,
            ) from None


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
AllowPickleOption = Annotated[
    bool,
    typer.Option(
        help="Load models stored only as pytorch_model*.bin, with torch's weights-only "
        "loader (pickles from untrusted sources can still be risky)."
    ),
]
DevicesOption = Annotated[
    str | None,
    typer.Option(
        help="Spread the tensors over these devices, e.g. cuda:0,cuda:1 (replaces --device; "
        "--device cuda already uses every visible GPU).",
        show_default=False,
    ),
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar or summary (warnings still show).")
]
PrivateOption = Annotated[bool, typer.Option(help="Create the Hub repository as private.")]
RevisionOption = Annotated[
    str | None, typer.Option(help="Branch to push to (created if missing; default main).")
]
MessageOption = Annotated[str | None, typer.Option(help="Commit message on the Hub.")]
_collector_paused = False  # set by the process's main (``cli.main``) while it runs


def pause_collector() -> None:
    """Pause the cyclic garbage collector while a command loads its modules (``cli.main``)."""
    global _collector_paused
    gc.disable()
    _collector_paused = True


def loaded() -> None:
    """A command has imported what it needs: where ``main`` paused the collector, freeze what
    was loaded (later collections skip it) and turn the collector back on for the work."""
    global _collector_paused
    if _collector_paused:
        _collector_paused = False
        gc.freeze()
        gc.enable()
