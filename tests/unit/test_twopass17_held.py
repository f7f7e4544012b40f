"""Tensors read once between a method's statistics passes and its merge pass (``engine.held``):
the same bytes as reading them again for each pass, each block read once where the tensor's
inputs fit in the budget, the budget respected, and ``della plan`` saying which."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

# Every method that makes statistics passes on the CPU backend, with its models besides the base.
METHODS = {
    "slerp": ({"t": 0.3}, 1),
    "nuslerp": ({}, 2),
    "multislerp": ({}, 2),
    "karcher": ({}, 2),
    "model_stock": ({}, 2),
    "sce": ({"select_topk": 0.5}, 2),
    "ramplus_tl": ({}, 2),
    "arcee_fusion": ({}, 1),
}
BLOCK_ELEMENTS = 256  # the tiny Llama's matrices in several blocks
ALL_KEPT = 1 << 30  # a budget every tensor's inputs fit in


@pytest.fixture
def method_recipe(model_zoo, write_recipe):
    def write(method: str):
        parameters, count = METHODS[method]
        weight = {"parameters": {"weight": 0.6}} if method in ("nuslerp", "multislerp") else {}
        experts = [
            {"model": str(model_zoo("llama", expert=e, dtype=torch.bfloat16)), **weight}
            for e in range(1, count + 1)
        ]
        return write_recipe(
            {
                "merge_method": method,
                "base_model": str(model_zoo("llama", dtype=torch.bfloat16)),
                "models": experts,
                "parameters": parameters,
            }
        )

    return write


def run_merge(recipe_path, budget, folder, watch=None):
    """The merge's shard bytes and how often each block was read from the files (by job name
    and first row), with ``budget`` bytes for a tensor's inputs read once."""
    from della_cli.api import MergeOptions, prepare
    from della_cli.engine import MergeEngine
    from della_cli.io.writer import ShardWriter

    recipe, inputs, plan = prepare(recipe_path, MergeOptions())
    plan.read_once_bytes = budget
    engine = MergeEngine(recipe, plan, inputs, "cpu", block_elements=BLOCK_ELEMENTS)
    reads: Counter[tuple[str, int]] = Counter()
    read_block = engine.read_block

    def counted(task):
        reads[(task.job.name, task.start)] += 1
        return read_block(task)

    engine.read_block = counted
    if watch is not None:
        watch(engine)
    folder.mkdir()
    writer = ShardWriter(folder, plan.shards)
    engine.run(writer)
    shards = {name: (folder / name).read_bytes() for name in writer.close()}
    return plan, inputs, shards, reads


@pytest.mark.parametrize("method", sorted(METHODS))
def test_read_once_gives_the_bytes_of_reading_each_pass(method, method_recipe, tmp_path):
    """Kept or read again, the blocks are the same rows: the same shards. Kept, every block is
    read once; read again, each block after a tensor's first is read once a pass."""
    recipe = method_recipe(method)
    plan, _, kept, once = run_merge(recipe, ALL_KEPT, tmp_path / "kept")
    _, _, again, each = run_merge(recipe, 0, tmp_path / "again")
    assert kept == again
    several = [job for job in plan.jobs if job.kernel and job.kernel.passes > 1]
    assert {job.kernel.backend for job in several} == {"cpu"}
    assert set(once.values()) == {1}
    starts = [start for (name, start) in each if name == several[0].name]
    assert len(starts) > 1  # a tensor of several blocks
    for job in several:
        for (name, start), count in each.items():
            if name == job.name:
                assert count == (1 if start == 0 else job.kernel.passes), (name, start)


def test_only_tensors_within_the_budget_are_kept_and_they_hold_what_the_plan_counts(
    method_recipe, tmp_path
):
    """With a budget between the tensors' sizes, the smaller ones are read once and the
    larger read again; a kept tensor's blocks hold exactly its counted bytes, never more
    than the budget."""
    from della_cli.engine.held import HeldBlocks, held_input_bytes

    recipe = method_recipe("model_stock")
    plan, inputs, _, _ = run_merge(recipe, ALL_KEPT, tmp_path / "sizes")
    sizes = {
        job.name: held_input_bytes(job, inputs)
        for job in plan.jobs
        if job.kernel and job.kernel.passes > 1 and job.numel > BLOCK_ELEMENTS
    }
    budget = sorted(sizes.values())[len(sizes) // 2]
    assert min(sizes.values()) <= budget < max(sizes.values())
    held: dict[str, int] = {}
    real_load = HeldBlocks.load

    def watch(engine):
        def load(task, tasks, read):
            loaded = real_load(engine.held, task, tasks, read)
            kept = engine.held._for_passes.get(task.job.name)
            if kept is not None and task.start == 0:
                held[task.job.name] = sum(array.nbytes for block in kept for array in block)
            return loaded

        engine.held.load = load

    _, _, _, reads = run_merge(recipe, budget, tmp_path / "budget", watch)
    assert held == {name: size for name, size in sizes.items() if size <= budget}
    assert max(held.values()) <= budget
    for name, size in sizes.items():
        again = max(count for (job, _), count in reads.items() if job == name)
        assert again == (1 if size <= budget else 2), name


def test_the_plan_says_which_tensors_are_read_once(method_recipe, monkeypatch):
    """``della plan``: each statistics-pass group's reads, and the budget (the default's, as
    ``budget_of`` lowers it to the tiny Llama's MLP matrices, 3 × 4 KiB)."""
    from typer.testing import CliRunner

    import della_cli.engine
    from della_cli.cli import app
    from della_cli.engine import held

    monkeypatch.setattr(della_cli.engine, "block_elements_for", lambda device: BLOCK_ELEMENTS)
    recipe = method_recipe("nuslerp")
    shown = CliRunner().invoke(app, ["plan", str(recipe)])
    assert shown.exit_code == 0, shown.output
    assert "[cpu/nuslerp, 2 passes, inputs read once]" in shown.output
    # the default budget is what the layers' tensors need: the embeddings and head, the two
    # largest, are read again
    assert "lm_head.weight  [cpu/nuslerp, 2 passes, inputs read 2 times]" in shown.output
    assert "embed_tokens.weight  [cpu/nuslerp, 2 passes, inputs read 2 times]" in shown.output
    assert "statistics passes: 14 of 16 tensors of several blocks read once" in shown.output
    assert "(up to 12.3 kB a tensor); the others read again for each pass" in shown.output
    monkeypatch.setattr(held, "READ_ONCE_BYTES", 0)
    shown = CliRunner().invoke(app, ["plan", str(recipe)])
    assert "[cpu/nuslerp, 2 passes, inputs read 2 times]" in shown.output
    assert "statistics passes: the 16 tensors of several blocks read again for each pass" in (
        shown.output
    )
    assert "(none kept in memory)" in shown.output


def test_the_next_tensor_is_read_while_this_one_is_merged(method_recipe, tmp_path):
    """Where two tensors read once follow each other, the reader reads the second when it
    hands over the first's second block, so the reads overlap the first's passes: every read
    of the second comes before the first's second block is merged. After a tensor of one
    block, the next is read with it."""
    events: list[tuple[str, str, int]] = []

    def watch(engine):
        read_block, compute_block = engine.read_block, engine.compute_block

        def read(task):
            events.append(("read", task.job.name, task.start))
            return read_block(task)

        def compute(task, loaded):
            events.append(("merge", task.job.name, task.start))
            return compute_block(task, loaded)

        engine.read_block, engine.compute_block = read, compute

    plan, _, _, _ = run_merge(method_recipe("model_stock"), ALL_KEPT, tmp_path / "ahead", watch)
    kept = [job.name for job in plan.jobs if job.kernel.passes > 1 and job.numel > 3 * 256]
    pairs = [
        (a.name, b.name) for a, b in itertools.pairwise(plan.jobs) if {a.name, b.name} <= set(kept)
    ]
    assert pairs
    for first, second in pairs:
        second_block = [e for e in events if e[:2] == ("merge", first)][1]
        reads = [i for i, e in enumerate(events) if e[:2] == ("read", second)]
        assert reads and max(reads) < events.index(second_block), (first, second)
    # after a tensor of one block, the next kept one is read with it, before its merge
    after_one = [
        (a.name, b.name)
        for a, b in itertools.pairwise(plan.jobs)
        if b.name in kept and a.numel <= BLOCK_ELEMENTS
    ]
    assert after_one
    for first, second in after_one:
        reads = [i for i, e in enumerate(events) if e[:2] == ("read", second)]
        assert max(reads) < events.index(("merge", first, 0)), (first, second)


def test_a_tensor_read_ahead_but_not_asked_for_next_is_dropped(method_recipe):
    """A sweep's batch may read the next job through another engine: the tensor this engine
    read ahead is forgotten at the next first block it is asked for, and read again if asked
    for later, to the same bytes."""
    from della_cli.api import MergeOptions, prepare
    from della_cli.engine import MergeEngine

    recipe, inputs, plan = prepare(method_recipe("model_stock"), MergeOptions())
    plan.read_once_bytes = ALL_KEPT
    engine = MergeEngine(recipe, plan, inputs, "cpu", block_elements=BLOCK_ELEMENTS)
    expected = {job.name: engine.compute(job).tobytes() for job in plan.jobs}
    kept = [job.numel > 3 * BLOCK_ELEMENTS for job in plan.jobs]
    index = next(i for i in range(len(kept) - 2) if kept[i] and kept[i + 1])
    first, ahead, other = plan.jobs[index], plan.jobs[index + 1], plan.jobs[-1]
    engine = MergeEngine(recipe, plan, inputs, "cpu", block_elements=BLOCK_ELEMENTS)
    assert engine.compute(first).tobytes() == expected[first.name]
    assert set(engine.held._first) == {ahead.name}  # read while the first was merged
    assert engine.compute(other).tobytes() == expected[other.name]
    assert not engine.held._first and ahead.name not in engine.held._for_merge
    assert engine.compute(ahead).tobytes() == expected[ahead.name]


def _count_pool_buffers(monkeypatch) -> dict[str, int]:
    """Buffers the engine's pool made, and the most taken and not yet given back at once;
    every block uses the pool (no task counts as small)."""
    import della_cli.engine as engine_module
    from della_cli.io.buffers import BufferPool

    monkeypatch.setattr(engine_module, "SMALL_TASK_ELEMENTS", 0)
    counts = {"made": 0, "in_use": 0, "peak": 0}
    take, give = BufferPool.take, BufferPool.give

    def counted_take(pool, nbytes, page_offset):
        counts["made"] += not pool._free and nbytes <= pool.capacity
        counts["in_use"] += 1
        counts["peak"] = max(counts["peak"], counts["in_use"])
        return take(pool, nbytes, page_offset)

    def counted_give(pool, array):
        raw = array
        while isinstance(raw.base, np.ndarray):
            raw = raw.base
        counts["in_use"] -= pool._owned.get(id(raw)) is raw
        give(pool, array)

    monkeypatch.setattr(BufferPool, "take", counted_take)
    monkeypatch.setattr(BufferPool, "give", counted_give)
    return counts


def test_the_buffers_of_a_tensor_read_once_serve_the_next(method_recipe, tmp_path, monkeypatch):
    """The pool keeps free the buffers of the tensors read once, so it makes no more than it
    ever lends at once: a buffer given back to the allocator is faulted in and zeroed again
    when the next tensor needs it. With only the pipeline's buffers kept, it makes more."""
    import della_cli.engine as engine_module

    counts = _count_pool_buffers(monkeypatch)
    recipe = method_recipe("model_stock")
    _, _, kept_shards, reads = run_merge(recipe, ALL_KEPT, tmp_path / "kept")
    assert counts["peak"] > engine_module.PIPELINE_FREE_BUFFERS  # held tensors need more
    assert counts["made"] == counts["peak"]
    assert set(reads.values()) == {1}

    counts.update(made=0, in_use=0, peak=0)
    monkeypatch.setattr(engine_module, "held_buffers", lambda budget, elements: 0)
    _, _, shards, _ = run_merge(recipe, ALL_KEPT, tmp_path / "pipeline only")
    assert counts["made"] > counts["peak"]
    assert shards == kept_shards


def test_the_default_budget_keeps_the_tensors_that_repeat(method_recipe, tmp_path):
    """By default a tensor is read once where at least ``REPEATED_TENSORS`` tensors need as
    much or more (their buffers serve each other); the larger ones without such peers are read
    for each pass. A budget the plan sets is taken as it is."""
    from della_cli.engine.held import REPEATED_TENSORS, budget_of, held_input_bytes

    recipe = method_recipe("model_stock")
    plan, inputs, shards, reads = run_merge(recipe, None, tmp_path / "default")
    sizes = {
        job.name: held_input_bytes(job, inputs)
        for job in plan.jobs
        if job.kernel.passes > 1 and job.numel > BLOCK_ELEMENTS
    }
    budget = budget_of(None, plan.jobs, inputs, BLOCK_ELEMENTS)
    assert budget == sorted(sizes.values(), reverse=True)[REPEATED_TENSORS - 1]
    larger = {name for name, size in sizes.items() if size > budget}
    assert larger == {"lm_head.weight", "model.embed_tokens.weight"}
    for name in sizes:
        again = max(count for (job, _), count in reads.items() if job == name)
        assert again == (2 if name in larger else 1), name
    assert budget_of(12345, plan.jobs, inputs, BLOCK_ELEMENTS) == 12345
    # fewer tensors of several blocks than REPEATED_TENSORS: none has peers, none is kept
    few = [job for job in plan.jobs if job.name in sizes][: REPEATED_TENSORS - 1]
    assert budget_of(None, few, inputs, BLOCK_ELEMENTS) == 0
    assert shards == run_merge(recipe, ALL_KEPT, tmp_path / "all kept")[2]
