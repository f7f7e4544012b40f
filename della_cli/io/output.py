"""The output folder: staged in a temporary sibling and put in place only when complete.

The temporary folder is della's own (``partial``: made fresh, locked, marked). Publishing is a
rename that replaces nothing (``rename.move_to_new_name``), so a merge never replaces an output
that appeared while it ran unless ``overwrite`` was asked for; then the old output is checked
again under the lock (``destination.check_replaceable``), swapped with the new one in one step
where the kernel can, and removed only after the new one is in place, file by file, model files
only. Signals wait while that happens (``interrupts.deferred``): at any moment the old output or
the new one is in place, complete. A failure or an interrupt before that removes the temporary
folder and leaves an existing output untouched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from della_cli.errors import OutputError
from della_cli.io import interrupts, rename
from della_cli.io.destination import (
    CHAT_TEMPLATES,
    MARKER_NAME,
    TEMP_MARKER,
    check_overlaps,
    check_replaceable,
    is_model_file,
    output_path,
    staging_path,
)
from della_cli.io.partial import (
    OPEN_FOLDER,
    acquire,
    clear_partial,
    is_same_folder,
    partial_folder,
    remove_staging,
)

__all__ = [
    "TEMP_MARKER",
    "check_destination",
    "clear_partial",
    "partial_folder",
    "staged_folder",
    "staging_path",
]


def check_destination(
    out: Path, overwrite: bool, inputs: list[Path], recipe: Path | None = None
) -> None:
    """Refuse destinations that cannot or must not be written, before any work starts."""
    path = output_path(out)
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        info = None
    if info is not None and stat.S_ISLNK(info.st_mode):
        raise OutputError(
            f"output {out} is a symbolic link; della writes a real folder and never follows "
            "a link: give the folder's own path"
        )
    if info is not None and not stat.S_ISDIR(info.st_mode):
        raise OutputError(f"output {out} exists and is a file; choose a folder path")
    if info is not None and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it")
    check_overlaps(out, path, inputs, recipe)
    if info is not None:
        check_replaceable(path)
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot create {out}: {ancestor} is a file, not a folder")
    if not _writable(ancestor):
        raise OutputError(f"cannot write into {ancestor}: permission denied")


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


@contextlib.contextmanager
def staged_folder(
    out: Path,
    keep_partial: bool = False,
    overwrite: bool = False,
    on_warning: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Yield the locked temporary folder of ``out``; on success, put it in place as ``out``.

    A partial folder left by a killed merge is emptied unless ``keep_partial`` (resume). An
    ``out`` that exists when the merge is done is replaced only with ``overwrite`` (else
    OutputError). On an exception or interrupt the folder is removed and ``out`` is untouched.
    """
    out = output_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out)
    descriptor = None
    published = False
    try:
        try:
            with interrupts.deferred():
                descriptor = acquire(staging, out, keep_partial)
            yield staging
            with interrupts.deferred():
                _publish(staging, out, descriptor, overwrite, on_warning)
                published = True
        finally:
            if descriptor is not None and not published:
                remove_staging(staging, descriptor)
    finally:
        if descriptor is not None:
            if not published:  # again, had a first signal cut the removal above short
                remove_staging(staging, descriptor)
            os.close(descriptor)


def _publish(
    staging: Path,
    out: Path,
    descriptor: int,
    overwrite: bool,
    on_warning: Callable[[str], None] | None,
) -> None:
    """Put the complete temporary folder in place as ``out`` (see the module docstring)."""
    if not is_same_folder(staging, descriptor):
        raise OutputError(
            f"{staging} was moved or replaced while this merge ran; nothing was put in place: "
            "make sure no one else writes into that folder's parent"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(MARKER_NAME, dir_fd=descriptor)
    try:
        rename.move_to_new_name(staging, out)
        interrupts.note_published(out)
        return
    except FileExistsError:
        if not overwrite:
            raise OutputError(
                f"{out} appeared while this merge ran (another merge?); it was left as it is "
                "and this merge's output discarded: pass --overwrite to replace it"
            ) from None
    info = os.lstat(out)
    if not stat.S_ISDIR(info.st_mode):
        raise OutputError(f"{out} became a file or a link while this merge ran; left as it is")
    check_replaceable(out)
    old = _put_in_place(staging, out)
    interrupts.note_published(out)
    try:
        kept = _remove_old_output(old)
    except OSError as error:
        kept = [f"({error.strerror or error})"]
    if kept and on_warning:
        on_warning(
            f"{out} is in place, but the old output could not be removed in full "
            f"({', '.join(kept[:3])}): what is left of it is in {old}"
        )


def _put_in_place(staging: Path, out: Path) -> Path:
    """Make ``staging`` the new ``out``; return where the old ``out`` now is: a name of its
    own, so that a kill while it is removed leaves the temporary name free."""
    retired = out.parent / f".{out.name}.della-old-{secrets.token_hex(8)}"
    if rename.swap(staging, out):  # the old output is now at the temporary name
        try:
            rename.move_to_new_name(staging, retired)
        except OSError:
            return staging
        return retired
    rename.move_to_new_name(out, retired)
    try:
        rename.move_to_new_name(staging, out)
    except BaseException:
        os.rename(retired, out)
        raise
    return retired


def _remove_old_output(old: Path) -> list[str]:
    """Remove a replaced output: only its model files (all it held when checked), then the
    folder; return what else appeared there since, which is kept, folder and all."""
    descriptor = os.open(old, OPEN_FOLDER)
    try:
        kept = []
        for entry in sorted(os.listdir(descriptor)):
            info = os.stat(entry, dir_fd=descriptor, follow_symlinks=False)
            if stat.S_ISDIR(info.st_mode) and entry == CHAT_TEMPLATES:
                shutil.rmtree(entry, dir_fd=descriptor)
            elif not stat.S_ISDIR(info.st_mode) and is_model_file(entry):
                os.unlink(entry, dir_fd=descriptor)
            else:
                kept.append(entry)
    finally:
        os.close(descriptor)
    if not kept:
        os.rmdir(old)
    return kept
