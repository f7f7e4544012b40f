"""Renames that never replace what is there: the steps that put an output in place.

A plain ``rename(2)`` replaces an empty folder at the destination, and ``os.replace`` any file,
so "check that OUT does not exist, then rename" lets a second merge replace the output a first
one published between the check and the rename. Linux's ``renameat2`` closes that gap in the
kernel: ``RENAME_NOREPLACE`` moves a folder to a name only if nothing has that name, in one
step, and ``RENAME_EXCHANGE`` swaps two names in one step, so an output is replaced with no
moment at which neither the old nor the new one is in place.

Elsewhere (no ``renameat2`` in the C library, or a file system that refuses the flags) the same
guarantees hold with a weaker schedule: the destination name is first reserved with
``mkdir``, which fails if anything has that name, and the folder is then renamed onto that
empty folder; a file put into it meanwhile makes that rename fail (ENOTEMPTY) rather than be
lost. Replacing without an exchange moves the old output aside first and back on failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable
from pathlib import Path

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _load_renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28, not Linux
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


renameat2 = _load_renameat2()


def _renameat2(source: Path, destination: Path, flags: int) -> bool:
    """Rename with ``flags``; False where the kernel or the file system lacks them."""
    if renameat2 is None:
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), flags)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(destination))


def move_to_new_name(source: Path, destination: Path) -> None:
    """Move the folder ``source`` to ``destination``, which must not exist: FileExistsError
    (nothing moved) if anything has that name, even if it appeared a moment ago."""
    if _renameat2(source, destination, RENAME_NOREPLACE):
        return
    os.mkdir(destination)  # the reservation: fails if anything has the name
    try:
        os.rename(source, destination)  # onto the empty folder just made, or fails
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(destination)
        raise


def swap(first: Path, second: Path) -> bool:
    """Exchange two folders' names in one step; False where that is not supported."""
    return _renameat2(first, second, RENAME_EXCHANGE)
