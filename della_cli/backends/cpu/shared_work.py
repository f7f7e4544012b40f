"""Work split between the calling thread and the engine's helper threads.

The CPU kernels that let go of the GIL (a weighted sum's spans, arcee_fusion's importances,
digits and merge) give each thread a part of a block: the calling thread runs the first part
itself while the helpers run the others, so no thread sits waiting for work it could do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import TypeVar

Result = TypeVar("Result")


def run_shared(helpers: Executor | None, calls: Sequence[Callable[[], Result]]) -> list[Result]:
    """Each call's result, in order: the first made by the calling thread, the others by
    ``helpers`` (all by the calling thread where there are none). Every helper's part is
    waited for even where the calling thread's fails: the parts share the block's buffers."""
    if helpers is None:
        return [call() for call in calls]
    waiting = [helpers.submit(call) for call in calls[1:]]
    try:
        first = calls[0]()
    finally:
        others = [future.result() for future in waiting]
    return [first, *others]
