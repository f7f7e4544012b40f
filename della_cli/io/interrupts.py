"""SIGINT and SIGTERM: exit 130 from the first instant, and never half a clean-up.

``della`` installs ``handle`` before anything else is imported (``della_cli/__main__.py``), so a
signal at any moment ends the process with exit 130; left to the default, SIGTERM killed it by
the signal (exit 143), which a batch loop that stops on 130 does not recognise.

Three phases:
- no command at work yet (or any more): the signal exits at once; nothing is being written.
- a command at work (``raising``): the first signal raises KeyboardInterrupt in the main thread,
  which unwinds into the clean-up (the temporary folder is removed); every later signal is
  ignored, so that a second Ctrl-C cannot cut that clean-up short. A process that must die now
  can still be sent SIGKILL, after which ``--resume`` continues.
- inside ``deferred`` (publishing the output, removing a folder): even the first signal waits
  until the section is over, so that a rename and its undo, or a removal, are never split.

Compiled kernels (numba) run no Python code, so the handler runs when they return, and numba's
dispatcher may then report the KeyboardInterrupt as a ``SystemError``; ``received`` tells the
command line that whatever failed, an interrupt was the cause.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_INTERRUPTED = 130


@dataclass
class _State:
    raising: bool = False  # a command is at work: raise KeyboardInterrupt instead of exiting
    interrupted: bool = False  # the first signal came; later ones are ignored
    deferring: int = 0  # nesting depth of ``deferred`` sections
    pending: int | None = None  # a signal that came inside a deferred section
    published: str | None = None  # an output made complete and put in place by this command


_state = _State()


def handle(signum: int, frame: object) -> None:
    """The handler for SIGINT and SIGTERM (see the module docstring)."""
    if _state.interrupted:
        return
    if _state.deferring:
        _state.pending = signum
        return
    _state.interrupted = True
    if _state.raising:
        raise KeyboardInterrupt
    os.write(2, f"error: {message()}\n".encode())
    os._exit(EXIT_INTERRUPTED)


def install() -> None:
    """Make SIGINT and SIGTERM end della with exit 130 (call first, before heavy imports)."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, handle)


def ignore() -> None:
    """Ignore SIGINT and SIGTERM from now on: for the interpreter's exit, which puts the
    default handlers back (a signal then would kill della by the signal, after it reported
    its exit status) but leaves ignored signals ignored."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def raising() -> Iterator[None]:
    """While a command works: the first signal raises KeyboardInterrupt, later ones are
    ignored. The handlers in place before are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    saved = _State(**vars(_state))
    _state.__init__(raising=True)
    install()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        # Sticky: a later signal must still say the output is complete, and once interrupted,
        # the process is on its way out with 130 and takes no second signal.
        published = _state.published or saved.published
        interrupted = _state.interrupted or saved.interrupted
        _state.__init__(**vars(saved))
        _state.published, _state.interrupted = published, interrupted


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section no signal splits: one that arrives inside is acted on when it ends."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
        if not _state.deferring and _state.pending is not None:
            signum, _state.pending = _state.pending, None
            handle(signum, None)


def received() -> bool:
    """Whether a signal has interrupted the command at work."""
    return _state.interrupted


def note_published(out: object) -> None:
    """The command's new output is complete and in place: an interrupt now must say so."""
    _state.published = str(out)


def forget_published() -> None:
    """What was published was an intermediate (a stage of a multi-stage file), removed later:
    an interrupt must not name it as the command's output."""
    _state.published = None


def message() -> str:
    """What an interrupt did, in one line."""
    if _state.published is not None:
        return (
            f"interrupted after {_state.published} was written in full; the new output is "
            "complete and in place"
        )
    return "interrupted; nothing was written"
