"""Several merges of the same tensors in one pass over the inputs (``della sweep``'s batches).

The candidates of a sweep differ only in their parameters: their plans have the same jobs
(names, shapes, sources), each with its own kernel. So a block's rows are read once and merged
by every candidate's engine, each writing its own output. Each engine computes exactly as it
does alone (same kernel, same block, same key for random draws), so each output's bytes are
those of its merge run alone.

What is shared is the read of the block rows. Two reads stay per candidate: a trim method's
whole-tensor selection (TIES, breadcrumbs) reads its tensor for each candidate's masks, and a
catalog method's statistics pass (slerp) reads its blocks for each candidate; a job whose
candidates block it differently (their kernels differ) is read once per candidate. Weighted
sums, which alone read straight from the files (``cpu/streamed_sum``), are merged here from the
shared rows (``cpu/chunked_sum``'s arithmetic, the same bytes), in chunks that one thread reads,
sums into every target and writes, as a merge alone schedules them.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from della_cli.engine.schedule import run_in_chunks, run_pipeline
from della_cli.engine.shared import BlockTask
from della_cli.io.writer import ShardWriter

if TYPE_CHECKING:
    from della_cli.engine import MergeEngine


@dataclass(frozen=True)
class FannedTask:
    """One block of rows, read once for ``targets`` (indices of engines), each merging its own
    ``tasks`` entry (the same rows of its own job)."""

    targets: tuple[int, ...]
    tasks: tuple[BlockTask, ...]

    # What the schedule reads of a task to size its hand-overs (``shared.task_elements``):
    # the rows of the first target's job, which every target's task shares.
    @property
    def job(self):
        return self.tasks[0].job

    @property
    def start(self) -> int:
        return self.tasks[0].start

    @property
    def stop(self) -> int:
        return self.tasks[0].stop


def same_tensors(engines: list[MergeEngine]) -> bool:
    """Whether the engines' plans merge the same tensors from the same sources, in order."""

    def layout(engine: MergeEngine) -> list[tuple]:
        return [
            (job.name, job.action, job.shape, job.reference, job.experts)
            for job in engine.plan.jobs
        ]

    first = layout(engines[0])
    return all(layout(engine) == first for engine in engines[1:])


class BatchEngine:
    """Runs the engines of several merges over one pass of their shared inputs; each engine
    writes with its own writer from its own first job (``starts``: a resumed merge's next
    job; the jobs before it are skipped for that engine only)."""

    def __init__(self, engines: list[MergeEngine]):
        if not engines or not same_tensors(engines):
            raise ValueError("a batch needs merges of the same tensors from the same inputs")
        self.engines = engines

    def run(self, writers: list[ShardWriter], starts: list[int]) -> None:
        engines = self.engines
        helpers = engines[0].threads.chunk_helpers
        with (
            ThreadPoolExecutor(1, thread_name_prefix="della-read") as reads,
            ThreadPoolExecutor(1, thread_name_prefix="della-write") as writes,
            ThreadPoolExecutor(max(helpers, 1), thread_name_prefix="della-sum") as sums,
            contextlib.ExitStack() as attached,
        ):
            for engine, writer in zip(engines, writers, strict=True):
                attached.enter_context(_attached(engine, writer, sums if helpers > 0 else None))
            fanned = _Fanned(engines)
            for in_chunks, group in itertools.groupby(self.fanned_tasks(starts), key=_in_chunks):
                tasks = list(group)
                if in_chunks:
                    run_in_chunks(fanned, tasks, sums if helpers > 0 else None, helpers)
                else:
                    run_pipeline(fanned, tasks, reads, writes)

    def fanned_tasks(self, starts: list[int]) -> list[FannedTask]:
        """Every block of every job some engine still has to merge, in plan order: one task
        for all of them where they block the job alike, else one per engine."""
        fanned = []
        for index in range(min(starts), len(self.engines[0].plan.jobs)):
            targets = [k for k, start in enumerate(starts) if start <= index]
            per_target = [
                self.engines[k].block_tasks(self.engines[k].plan.jobs[index]) for k in targets
            ]
            spans = {tuple((task.start, task.stop) for task in tasks) for tasks in per_target}
            if len(spans) == 1:
                for tasks in zip(*per_target, strict=True):
                    fanned.append(FannedTask(tuple(targets), tasks))
            else:
                for k, tasks in zip(targets, per_target, strict=True):
                    fanned.extend(FannedTask((k,), (task,)) for task in tasks)
        return fanned


def _in_chunks(fanned: FannedTask) -> bool:
    """Whether every target sums the chunk (``cpu/streamed_sum``, ``cpu/chunked_sum``): then
    one thread reads, sums and writes it, as a merge alone does (``schedule.run_in_chunks``)."""
    return all(task.job.action == "merge" and task.job.kernel.in_chunks for task in fanned.tasks)


class _Fanned:
    """What ``run_pipeline`` drives, for fanned tasks: the first target's engine reads a
    block into its buffers, every target's engine merges it, each writes its own result, and
    the block's buffers are given back once all have merged."""

    def __init__(self, engines: list[MergeEngine]):
        self.engines = engines
        self.block_elements = min(engine.block_elements for engine in engines)

    def load(self, fanned: FannedTask) -> list[np.ndarray]:
        return self.engines[fanned.targets[0]].load(fanned.tasks[0])

    def load_kernels(self) -> None:
        for engine in self.engines:
            engine.load_kernels()

    def load_ahead(self, fanned: FannedTask) -> list[np.ndarray]:
        """``load``: the rows go to several engines, so none copies them to a device ahead
        (each takes them from the host, as a block of its own that was not staged)."""
        return self.load(fanned)

    def compute_block(self, fanned: FannedTask, loaded: list[np.ndarray]) -> list[np.ndarray]:
        """Each target's output rows. The block's buffers are shared and given back after
        all have merged, so an engine that passed an input on as its output (passthrough)
        gets a copy of its own."""
        merged = []
        for k, task in zip(fanned.targets, fanned.tasks, strict=True):
            engine = self.engines[k]
            rows = engine.compute_block(task, loaded)
            if any(rows is array for array in loaded):
                out = engine.output_buffer(task, rows.shape)
                np.copyto(out, rows)
                rows = out
            merged.append(rows)
        return merged

    def release(self, fanned: FannedTask, loaded: list[np.ndarray], merged=None) -> None:
        """Give the shared block's buffers back, all of them: ``merged`` (what
        ``run_pipeline`` passes) holds no input, as ``compute_block`` copied any."""
        self.engines[fanned.targets[0]].release(fanned.tasks[0], loaded)

    def write(self, fanned: FannedTask, chunks: list[np.ndarray]) -> None:
        for k, task, chunk in zip(fanned.targets, fanned.tasks, chunks, strict=True):
            self.engines[k].write(task, chunk)

    def merge_chunk(self, fanned: FannedTask) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """A chunk of a weighted sum (``run_in_chunks``), read once and summed by every
        target's kernel into its own output buffer: each one's rows and non-finite flags."""
        loaded = self.load(fanned)
        merged, nonfinite = [], []
        for k, task in zip(fanned.targets, fanned.tasks, strict=True):
            engine = self.engines[k]
            out = engine.output_buffer(task, (task.stop - task.start, loaded[0].shape[1]))
            rows, flags = engine.cpu.weighted_sum(task.job, loaded, out)
            merged.append(rows)
            nonfinite.append(flags)
        self.release(fanned, loaded)
        return merged, nonfinite

    def write_merged(self, fanned: FannedTask, merged: list, nonfinite: list) -> None:
        for k, task, rows, flags in zip(
            fanned.targets, fanned.tasks, merged, nonfinite, strict=True
        ):
            self.engines[k].write_merged(task, rows, flags)


@contextlib.contextmanager
def _attached(
    engine: MergeEngine, writer: ShardWriter, helpers: ThreadPoolExecutor | None
) -> Iterator[None]:
    """Give ``engine`` what ``MergeEngine.run`` gives it while it runs: its writer, recycled
    block buffers and the helpers that split weighted sums."""
    engine._writer = writer
    engine._buffers = engine.block_pool()
    engine._helpers = helpers
    try:
        yield
    finally:
        engine._helpers = engine._buffers = engine._writer = None
