"""The CPU backend: numba kernels over the inputs as stored, built from one set of rules
(``rules``; the kernels ``block``, ``select`` and ``weighted_sum``). See docs/BACKENDS.md.

Importing this package imports numpy only: numba is loaded by the modules that need it, the
first time a merge runs a job on the CPU backend.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np


def ensure_numba_cache() -> None:
    """Give numba a cache folder it can write, before it is imported.

    numba caches compiled kernels beside their sources, else in the user's cache folder; where
    neither is writable (a read-only install under a read-only home, as in some containers),
    every run compiled every kernel again (about 12 s). There, the cache goes to a folder of
    the user's in the temporary directory. ``NUMBA_CACHE_DIR``, if set, is left alone.
    """
    if "NUMBA_CACHE_DIR" in os.environ or os.access(Path(__file__).parent, os.W_OK):
        return
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "numba"
    try:
        user.mkdir(parents=True, exist_ok=True)
        if os.access(user, os.W_OK):
            return
    except OSError:
        pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    os.environ["NUMBA_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"della-numba-{uid}")


def prepare_numba() -> None:
    """What must happen before a module of this package imports numba and decorates its
    kernels: the cache folder (``ensure_numba_cache``), and stamps of the whole package on
    della's cached kernels (``cache_stamp``), so that a changed rule compiles them again."""
    ensure_numba_cache()
    from della_cli.backends.cpu import cache_stamp

    cache_stamp.install()


COMPILE_NOTICE = (
    "compiling della's CPU kernels for this kind of merge (once after install: about 10 s; "
    "later merges load them in under a second)"
)


@contextlib.contextmanager
def compile_notice(say: Callable[[str], None]) -> Iterator[None]:
    """While this runs, say ``COMPILE_NOTICE`` once if numba compiles a kernel. numba signals
    a compilation only on a cache miss (the first merge of a dtype pair after install, or
    after the cache was cleared), so the wait of several seconds is never a mystery and a
    merge that loads its kernels says nothing. Imports numba: for plans with ``cpu/block``."""
    from numba.core import event

    class FirstCompilation(event.Listener):
        said = False

        def on_start(self, ev: event.Event) -> None:
            if not self.said:
                self.said = True
                say(COMPILE_NOTICE)

        def on_end(self, ev: event.Event) -> None:
            pass

    with event.install_listener("numba:compile", FirstCompilation()):
        yield


def output_array(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``out`` checked against the shape and dtype it must have, or a new array of them."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous {dtype} array of shape {shape}")
    return out
