"""Small tasks travel between the pipeline's threads in batches (issue 19): every task once,
in order, a batch never past its element budget, and any task that is not small alone."""

from __future__ import annotations

import math
from fractions import Fraction

from della_cli.engine.schedule import task_batches
from della_cli.engine.shared import SMALL_TASK_ELEMENTS, BlockTask, task_elements
from della_cli.methods.counts import fraction_count
from della_cli.plan import BASE, Source, TensorJob


def task(name: str, shape: tuple[int, ...], start: int = 0, stop: int | None = None):
    job = TensorJob(name, "merge", shape, "BF16", Source(BASE, name), (Source(0, name),))
    stop = shape[0] if stop is None else stop
    return BlockTask(job, start, stop, last=stop == shape[0])


def test_small_tasks_are_batched_in_order_within_the_budget():
    small = [task(f"t{i}", (96, 64)) for i in range(50)]  # 6,144 elements each
    large = task("large", (1024, 64), 0, 1024)  # 65,536: not small
    copy = BlockTask(
        TensorJob("norm", "copy", (64,), "BF16", Source(BASE, "norm")), 0, 1, last=True
    )
    tasks = [*small[:30], large, copy, *small[30:]]
    budget = 10 * 6144
    batches = task_batches(tasks, budget)
    assert [t for batch in batches for t in batch] == tasks
    assert [large] in batches
    assert [len(b) for b in batches] == [10, 10, 10, 1, 10, 10, 1]
    for batch in batches:
        if batch != [large]:
            assert sum(task_elements(t) for t in batch) <= budget
            assert all(task_elements(t) <= SMALL_TASK_ELEMENTS for t in batch)


def test_a_task_counts_its_rows_and_a_copy_its_whole_tensor():
    assert task_elements(task("w", (300, 7), 100, 250)) == 150 * 7
    copy = BlockTask(TensorJob("b", "copy", (3, 5), "F32", Source(BASE, "b")), 0, 1, True)
    assert task_elements(copy) == 15
    assert task_batches([], 100) == []


def test_fraction_count_is_the_floor_of_the_decimal_written():
    for fraction in (0.29, 0.1, 0.7, 0.3333, 1e-7, 0.5, 1.0, 0.0):
        for numel in (0, 1, 7, 100, 6144, 10**12 + 3):
            assert fraction_count(fraction, numel) == math.floor(Fraction(repr(fraction)) * numel)
    assert fraction_count(0.29, 100) == 29  # float multiplication gives 28.999999999999996
