"""della's temporary folder for an output: made fresh, locked, marked, and recognised again.

The folder (``.OUT.della-tmp-partial``) is made under a random name, locked (``flock``, released
by the kernel even if the process is killed) and marked with a file of della's own
(``.della-partial``, naming the output), and only then given its fixed name, by a rename that
replaces nothing. So whatever holds that name is locked (a merge at work: refused), della's own
(a killed merge: resumed or emptied), or not della's: a symlink, a file, or a folder della did
not make (an input model, say) is refused, and never followed, emptied or removed. Taking the
lock and looking at what is there are one step: the lock is taken on the folder itself, through
a descriptor opened without following links, before its marker is read.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from pathlib import Path

from della_cli.errors import OutputError
from della_cli.io import interrupts, rename
from della_cli.io.destination import MARKER_NAME, TEMP_MARKER, output_path, staging_path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent merges are not detected there
    fcntl = None

# A folder opened as itself, never through a symlink (the flags are POSIX; 0 elsewhere).
OPEN_FOLDER = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)


def acquire(staging: Path, out: Path, keep_partial: bool) -> int:
    """The locked descriptor of the temporary folder: della's own partial folder left by a
    killed merge, or a fresh one. Call it with signals deferred (``interrupts.deferred``):
    between the mkdir and the return, an interrupt would leave the folder behind."""
    try:
        descriptor = _open_existing(staging, out)
    except FileNotFoundError:
        descriptor = None
    if descriptor is None:
        descriptor = _create(staging, out)
        if descriptor is None:  # another merge made it a moment ago: look at that one
            descriptor = _open_existing(staging, out)
    if not keep_partial:
        clear_partial(staging, keep=set())
    return descriptor


def _create(staging: Path, out: Path) -> int | None:
    """Make, lock and mark a fresh folder under a random name, then give it the fixed name
    (None if something took that name meanwhile)."""
    nonce = secrets.token_hex(8)
    fresh = staging.parent / f".{out.name}{TEMP_MARKER}{nonce}"
    os.mkdir(fresh, 0o755)
    descriptor = os.open(fresh, OPEN_FOLDER)
    try:
        _lock(descriptor, out)
        marker = json.dumps({"della": "partial output", "out": str(out), "nonce": nonce})
        handle = os.open(
            MARKER_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=descriptor
        )
        with os.fdopen(handle, "w") as file:
            file.write(marker)
        rename.move_to_new_name(fresh, staging)
        return descriptor
    except FileExistsError:
        os.close(descriptor)
        shutil.rmtree(fresh, ignore_errors=True)
        return None
    except BaseException:
        os.close(descriptor)
        shutil.rmtree(fresh, ignore_errors=True)
        raise


def _open_existing(staging: Path, out: Path) -> int:
    """Lock what holds the temporary name, then trust it only if it is della's own partial
    folder for ``out``: a real folder, owned by this user, holding della's marker."""
    info = os.lstat(staging)  # FileNotFoundError: nothing there
    if not stat.S_ISDIR(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a folder"
        raise OutputError(
            f"{staging} is {kind}; della never follows or replaces it: move it away, or "
            "choose another output"
        )
    try:
        descriptor = os.open(staging, OPEN_FOLDER)
    except OSError as error:  # replaced by a symlink since the lstat, or unreadable
        raise OutputError(f"{staging} cannot be opened as a folder: {error.strerror}") from None
    try:
        _lock(descriptor, out)
        if os.fstat(descriptor).st_uid != os.geteuid() or _marker_out(descriptor) != str(out):
            raise OutputError(
                f"{staging} exists but was not made by della for {out}; della never empties "
                "or removes a folder it did not make: move it away (or delete it if it is a "
                "partial output of an older della)"
            )
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def partial_folder(out: Path) -> Path | None:
    """The temporary folder of ``out`` if it is della's own partial output (only looked at:
    not locked, nothing changed), else None."""
    out = output_path(out)
    staging = staging_path(out)
    try:
        descriptor = os.open(staging, OPEN_FOLDER)
    except OSError:
        return None
    try:
        return staging if _marker_out(descriptor) == str(out) else None
    finally:
        os.close(descriptor)


def _marker_out(descriptor: int) -> str | None:
    """The output named by della's marker in the folder, or None (absent, not a regular file,
    not della's)."""
    try:
        handle = os.open(MARKER_NAME, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=descriptor)
    except OSError:
        return None
    with os.fdopen(handle, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            return None
        try:
            marker = json.loads(file.read(4096))
            return str(marker["out"]) if marker.get("della") == "partial output" else None
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def _lock(descriptor: int, out: Path) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(
            f"another della merge is writing {out} right now; wait for it to finish or "
            "choose another output"
        ) from None


def clear_partial(staging: Path, keep: set[str]) -> None:
    """Empty della's own temporary folder but for its marker and the names in ``keep``."""
    with interrupts.deferred(), os.scandir(staging) as entries:
        for entry in list(entries):
            if entry.name == MARKER_NAME or entry.name in keep:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def is_same_folder(path: Path, descriptor: int) -> bool:
    try:
        here, held = os.lstat(path), os.fstat(descriptor)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def remove_staging(staging: Path, descriptor: int) -> None:
    """Remove the temporary folder if it is still the one this merge holds (never what
    someone put at its name)."""
    with interrupts.deferred():
        if is_same_folder(staging, descriptor):
            shutil.rmtree(staging, ignore_errors=True)
