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

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent merges are not detected there
    fcntl = None

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
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create {out}: {ancestor} is a file, not a folder")
    if not _writable(ancestor):
        raise OutputError(f"cannot write into {ancestor}: permission denied")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def staging_path(out: Path) -> Path:
    """The temporary sibling a merge into ``out`` is written to (a fixed name, so that a merge
    killed outright can be resumed from it)."""
    out = out.resolve()
    return out.parent / f".{out.name}{TEMP_MARKER}partial"


@contextlib.contextmanager
def staged_folder(out: Path, keep_partial: bool = False) -> Iterator[Path]:
    """Yield the locked temporary folder next to ``out``; on success, move it to ``out``.

    The folder is locked (``flock`` on its descriptor, released by the kernel even if the
    process is killed) so a second merge into the same output refuses instead of interleaving.
    A partial folder left by a killed merge is emptied unless ``keep_partial`` (resume).
    On an exception or interrupt the folder is removed and ``out`` is untouched.
    """
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out)
    staging.mkdir(exist_ok=True)
    lock = _lock_folder(staging, out)
    try:
        if not keep_partial:
            _empty_folder(staging)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        replace_folder(staging, out)
    finally:
        os.close(lock)


def _lock_folder(folder: Path, out: Path) -> int:
    descriptor = os.open(folder, os.O_RDONLY)
    if fcntl is None:
        return descriptor
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise OutputError(
            f"another della merge is writing {out} right now; wait for it to finish or "
            "choose another output"
        ) from None
    return descriptor


def _empty_folder(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


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
