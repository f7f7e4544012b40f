"""The ``della`` command line: parse arguments, call the API, map errors to exit codes.

Results go to stdout (human text, or one JSON object with ``--json``); progress, warnings and
errors go to stderr. User mistakes are one line and exit 2; merge and IO failures exit 1; an
interrupt exits 130. Set DELLA_DEBUG=1 to see tracebacks. Torch is imported inside commands so
that ``--help`` is instant.
"""

import contextlib
import gc
import os
import sys
from typing import Annotated

import typer
import typer.core

from della_cli import __version__
from della_cli.cli_common import (
    EXIT_INTERRUPTED,
    fail,
    loaded,
    pause_collector,
    reported_errors,
)
from della_cli.cli_examine import inspect, verify
from della_cli.cli_merge import merge, push
from della_cli.cli_methods import demo, methods
from della_cli.cli_plan import plan
from della_cli.cli_sweep import sweep_command

# Re-exported: tests and embedding code reach the error reporting through this module.
__all__ = ["EXIT_INTERRUPTED", "app", "fail", "main", "reported_errors"]


class _Command(typer.core.TyperCommand):
    """Usage lines as people write them (``della merge [OPTIONS] RECIPE OUT``): typer wraps
    required arguments in braces, which read like template placeholders."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [piece.strip("{}") for piece in super().collect_usage_pieces(ctx)]


class _MergeCommand(_Command):
    """``--ray`` may come without its address (``cli_parts.with_ray_address``)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        from della_cli.cli_parts import with_ray_address

        return super().parse_args(ctx, with_ray_address(args))


app = typer.Typer(
    name="della",
    help="Merge fine-tuned language models without training (DELLA-Merging and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"della {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Merge fine-tuned language models without training."""


# The commands, in the order ``della --help`` lists them (each in the cli module of its job).
app.command(cls=_MergeCommand)(merge)
app.command(cls=_Command)(push)
app.command(cls=_Command)(plan)
app.command(cls=_Command)(inspect)
app.command(cls=_Command)(verify)
app.command(cls=_Command)(methods)
app.command(cls=_Command)(demo)
app.command("sweep", cls=_Command)(sweep_command(reported_errors, lambda: loaded()))


def main() -> None:
    """The ``della`` command (the console script; tests call ``app``).

    Python's cyclic garbage collector is paused while a command loads its modules (numpy and
    the rest allocate hundreds of thousands of objects, which the collector would walk again
    and again as they load), and what was loaded is frozen before the process exits (its last
    collections need not walk it either). Together that is 45 ms of every command (importing
    della's API and exiting: 320 -> 273 ms, medians of 21). Long commands turn it back on
    once loaded (``cli_common.loaded``). The console script enters through ``della_cli.__main__``,
    which installs the signal handlers before this module (and typer) is even imported.
    """
    from della_cli.io import interrupts

    interrupts.install()  # again after __main__ (harmless); the first time for other callers
    pause_collector()
    try:
        app()
    except SystemExit as done:
        if interrupts.received():
            _exit_now(done.code)
        raise
    finally:
        interrupts.ignore()  # the command is over: its exit status must stand
        gc.freeze()


def _exit_now(code: object) -> None:
    """End an interrupted command with its exit status, now, past the interpreter's exit.

    A KeyboardInterrupt raised while code made by ``exec`` runs (dataclasses, numba and others
    make functions that way, often while a module is imported mid-merge) leaves CPython
    believing it went unhandled, however it was caught; under ``python -m`` the interpreter
    then kills itself by SIGINT after della has reported exit 130. The clean-up is done by
    now, so the process leaves with its status, its output flushed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code if isinstance(code, int) else EXIT_INTERRUPTED)
