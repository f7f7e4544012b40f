"""Scheduling: which thread reads, merges and writes which block, and in what order.

Two schedules. The pipeline (``run_pipeline``): a reader thread fetches the next block's rows
(positioned reads release the GIL), the calling thread merges the current block, and a writer
thread appends finished blocks to their shard (file writes and hashing release the GIL too).
Only a few blocks are in flight, so memory does not grow with tensor size.

Chunks (``run_in_chunks``), for weighted sums on the CPU, which move far more bytes than they
compute on: in the pipeline every block crosses three threads, so its bytes travel between
cores and through memory more often than the copies need. Here the calling thread and the
helpers each take the next chunk, read its rows, merge them and hand the result to the writer,
which still gets the chunks in order (``InOrder``); a chunk mostly stays in one core's caches
from its read to its write. On the 2-core reference machine (alternating runs, medians) the
~1.1B model's task arithmetic went from 3.73 to 3.04 s and from 144 to 78 MB this way.

Devices (``run_on_devices``), for a merge spread over several: one worker thread per device
takes the blocks of the jobs the plan gave that device, in plan order, with its own reader one
block ahead, merges them there and hands the results to ``InOrder``, so that the output is
written in plan order whichever device finishes first.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

from della_cli.engine.shared import (
    BATCH_ELEMENTS,
    SMALL_TASK_ELEMENTS,
    BlockTask,
    task_elements,
)

if TYPE_CHECKING:
    from della_cli.engine import MergeEngine

MAX_WRITES_IN_FLIGHT = 2


def run_pipeline(
    engine: MergeEngine,
    tasks: list[BlockTask],
    reads: ThreadPoolExecutor,
    writes: ThreadPoolExecutor,
) -> None:
    """Blocks read one ahead by ``reads``, merged here, written behind by ``writes``; small
    tasks travel in batches (``task_batches``)."""
    batches = task_batches(tasks, min(engine.block_elements, BATCH_ELEMENTS))
    prefetched = reads.submit(_load_batch, engine, batches[0]) if batches else None
    engine.load_kernels()  # while the first batch is read
    in_flight: deque[Future] = deque()
    for index, batch in enumerate(batches):
        loaded_batch = prefetched.result()
        if index + 1 < len(batches):
            prefetched = reads.submit(_load_batch, engine, batches[index + 1])
        merged = []
        for task, loaded in zip(batch, loaded_batch, strict=True):
            rows = engine.compute_block(task, loaded)
            merged.append((task, rows))
            engine.release(task, loaded, rows)  # the inputs are free, unless passed on as rows
        del loaded_batch, loaded, rows
        in_flight.append(writes.submit(_write_batch, engine, merged))
        del merged
        while len(in_flight) > MAX_WRITES_IN_FLIGHT:
            in_flight.popleft().result()
    for future in in_flight:
        future.result()


def run_on_devices(engine: MergeEngine, tasks: list[BlockTask], devices: int) -> None:
    """Each device's tasks (``TensorJob.device``) read, merged and written by a worker of its
    own; the writes in task order, at most ``2 * devices`` results waiting."""
    order = InOrder(len(tasks), ahead=2 * devices)
    mine: list[list[int]] = [[] for _ in range(devices)]
    for index, task in enumerate(tasks):
        mine[task.job.device if task.job.device < devices else 0].append(index)
    with (
        ThreadPoolExecutor(devices, thread_name_prefix="della-device") as workers,
        ThreadPoolExecutor(devices, thread_name_prefix="della-device-read") as reads,
    ):
        futures = [
            workers.submit(_device_worker, engine, tasks, indices, order, reads) for indices in mine
        ]
        try:
            for future in futures:
                future.result()
        except BaseException:  # Ctrl-C here, or a worker's error: the others stop too
            order.stop()
            raise


def _device_worker(
    engine: MergeEngine,
    tasks: list[BlockTask],
    indices: list[int],
    order: InOrder,
    reads: ThreadPoolExecutor,
) -> None:
    """One device's share of ``run_on_devices``: its tasks in order, each read one ahead."""
    with order.failing_all_on_error():
        ahead = reads.submit(engine.load_ahead, tasks[indices[0]]) if indices else None
        for position, index in enumerate(indices):
            task = tasks[index]
            loaded = ahead.result()
            if position + 1 < len(indices):
                ahead = reads.submit(engine.load_ahead, tasks[indices[position + 1]])
            merged = engine.compute_block(task, loaded)
            engine.release(task, loaded, merged)
            del loaded
            order.deliver(index, functools.partial(engine.write, task, merged))


def task_batches(tasks: list[BlockTask], block_elements: int) -> list[list[BlockTask]]:
    """Consecutive small tasks (``SMALL_TASK_ELEMENTS``) grouped up to ``block_elements`` in
    all; any other task alone. Each batch
    is one hand-over to the reader and one to the writer: per task, those round trips (a
    thread woken, the GIL passed) cost about 0.7 ms, more than merging a small tensor."""
    batches: list[list[BlockTask]] = []
    batch: list[BlockTask] = []
    size = 0
    for task in tasks:
        elements = task_elements(task)
        small = elements <= SMALL_TASK_ELEMENTS
        if batch and (not small or size + elements > block_elements):
            batches.append(batch)
            batch, size = [], 0
        batch.append(task)
        size += elements
        if not small:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    return batches


def _load_batch(engine: MergeEngine, batch: list[BlockTask]) -> list[list]:
    return [engine.load_ahead(task) for task in batch]


def _write_batch(engine: MergeEngine, merged: list[tuple[BlockTask, object]]) -> None:
    for task, chunk in merged:
        engine.write(task, chunk)


def run_in_chunks(
    engine: MergeEngine, tasks: list[BlockTask], helpers: ThreadPoolExecutor | None, count: int
) -> None:
    """Chunks each read, merged and written by one thread: this one and ``count`` helpers."""
    order = InOrder(len(tasks), ahead=2 * (count + 1))
    others = [helpers.submit(_merge_chunks, engine, tasks, order) for _ in range(count)]
    try:
        _merge_chunks(engine, tasks, order)
    finally:
        for future in others:
            future.result()


def _merge_chunks(engine: MergeEngine, tasks: list[BlockTask], order: InOrder) -> None:
    """One thread's share of ``run_in_chunks``: chunks until none is left."""
    with order.failing_all_on_error():
        while (index := order.claim()) is not None:
            task = tasks[index]
            merged, nonfinite = engine.merge_chunk(task)
            order.deliver(index, functools.partial(engine.write_merged, task, merged, nonfinite))


class InOrder:
    """Hands out task indices to threads and writes their results in index order.

    A thread that finishes a task out of turn leaves its write queued and goes on to the next
    task rather than wait; the thread whose result fills the gap writes every queued result
    that follows. A thread stays at most ``ahead`` tasks ahead of the last one written, which
    bounds the memory held by queued results.
    """

    def __init__(self, count: int, ahead: int):
        self.count = count
        self.ahead = ahead
        self._claimed = 0
        self._written = 0  # tasks written (all those before this index)
        self._queued: dict[int, Callable[[], None]] = {}
        self._writing = False  # whether a thread is writing queued results
        self._failed = False
        self._condition = threading.Condition()

    def stop(self) -> None:
        """Stop every thread at its next claim or delivery (the caller was interrupted)."""
        with self._condition:
            self._failed = True
            self._condition.notify_all()

    def claim(self) -> int | None:
        """The next task nobody took, or None when all are taken (or a thread failed)."""
        with self._condition:
            if self._failed or self._claimed == self.count:
                return None
            self._claimed += 1
            return self._claimed - 1

    def deliver(self, index: int, write: Callable[[], None]) -> None:
        """Queue ``write``, the result of task ``index``, and write in order whatever is due;
        first wait while the task is ``ahead`` or more past the last one written."""
        with self._condition:
            self._condition.wait_for(lambda: index < self._written + self.ahead or self._failed)
            if self._failed:
                raise _OtherThreadFailed
            self._queued[index] = write
            if self._writing:  # the writing thread takes it when its turn comes
                return
            self._writing = True
        while True:
            with self._condition:
                due = self._queued.pop(self._written, None)
                if due is None or self._failed:
                    self._writing = False
                    return
            due()  # if it raises, failing_all_on_error stops every thread
            with self._condition:
                self._written += 1
                self._condition.notify_all()

    @contextmanager
    def failing_all_on_error(self) -> Iterator[None]:
        """If the body raises, stops the other threads (their waits end) and re-raises; a
        thread stopped so returns quietly, leaving the error to the thread that had it."""
        try:
            yield
        except _OtherThreadFailed:
            return
        except BaseException:
            with self._condition:
                self._failed = True
                self._condition.notify_all()
            raise


class _OtherThreadFailed(Exception):
    """Raised in a thread waiting for its turn when another thread failed."""
