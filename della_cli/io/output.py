"""The output folder: staged in a temporary sibling and renamed into place only when complete.

A failure or an interrupt removes the temporary folder and never touches an existing output; an
existing destination is replaced only with ``overwrite``, and only after the new one is whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from della_cli.errors import OutputError

TEMP_MARKER = ".della-tmp-"


def check_destination(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse destinations that cannot or must not be written, before any work starts."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is a file; choose a folder path")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it")
    resolved = out.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if resolved == folder or resolved.is_relative_to(folder) or folder.is_relative_to(resolved):
            raise OutputError(
                f"output {out} overlaps input model folder {folder}; "
                "choose a path outside the inputs"
            )
    parent = resolved.parent
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into {parent}: permission denied")


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success, move it to ``out``."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}{TEMP_MARKER}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, out)


def replace_folder(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``; an old ``out`` is moved aside first and removed after."""
    retired = None
    if out.exists():
        retired = out.parent / f".{out.name}.della-old-{os.getpid()}"
        shutil.rmtree(retired, ignore_errors=True)
        out.rename(retired)
    try:
        staging.rename(out)
    except BaseException:
        if retired is not None:
            retired.rename(out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
