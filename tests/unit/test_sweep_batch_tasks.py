"""Which blocks a batch reads once for all its merges, and which it reads per merge."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from della_cli.engine.batch import BatchEngine, FannedTask
from della_cli.engine.shared import BlockTask
from della_cli.plan import Source, TensorJob


def job(name: str, shape=(8, 4)) -> TensorJob:
    return TensorJob(name, "merge", shape, "F32", Source(-1, name), (Source(0, name),))


def engine(jobs: list[TensorJob], rows_per_block: dict[str, int]):
    """A stand-in for a MergeEngine: its plan's jobs, blocked ``rows_per_block[name]`` rows
    at a time."""

    def block_tasks(of: TensorJob) -> list[BlockTask]:
        step, rows = rows_per_block[of.name], of.shape[0]
        spans = [(r, min(r + step, rows)) for r in range(0, rows, step)]
        return [BlockTask(of, a, b, last=b == rows) for a, b in spans]

    return SimpleNamespace(plan=SimpleNamespace(jobs=jobs), block_tasks=block_tasks)


def spans(fanned: list[FannedTask]) -> list[tuple]:
    return [(f.targets, f.tasks[0].job.name, f.tasks[0].start, f.tasks[0].stop) for f in fanned]


def test_blocks_alike_are_read_once_for_all_and_others_per_engine():
    jobs = [job("a"), job("b")]
    first = engine(jobs, {"a": 4, "b": 8})
    second = engine(jobs, {"a": 4, "b": 2})  # blocks b differently (another kernel)
    fanned = BatchEngine([first, second]).fanned_tasks([0, 0])
    assert spans(fanned) == [
        ((0, 1), "a", 0, 4),
        ((0, 1), "a", 4, 8),
        ((0,), "b", 0, 8),
        ((1,), "b", 0, 2),
        ((1,), "b", 2, 4),
        ((1,), "b", 4, 6),
        ((1,), "b", 6, 8),
    ]


def test_a_resumed_merge_joins_at_its_next_job():
    jobs = [job("a"), job("b"), job("c")]
    blocks = {"a": 8, "b": 8, "c": 8}
    fanned = BatchEngine([engine(jobs, blocks), engine(jobs, blocks)]).fanned_tasks([2, 1])
    assert spans(fanned) == [((1,), "b", 0, 8), ((0, 1), "c", 0, 8)]


def test_merges_of_other_tensors_are_not_batched():
    with pytest.raises(ValueError, match="same tensors"):
        BatchEngine([engine([job("a")], {"a": 8}), engine([job("b")], {"b": 8})])
