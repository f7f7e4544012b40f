"""Block buffers go back to the pool once, and only when no longer used: passthrough hands
the rows it read to the writer (``CatalogJobs._passed_on``), in buffers placed for both
copies and given back once written; a sweep's batch, whose blocks its merges share, copies
them; rows read once as the reference and an expert are given back once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from della_cli.io.buffers import (
    ALIGNMENT,
    PAGE_BYTES,
    SLOW_GAP,
    BufferPool,
    read_offset,
    relay_offset,
)

BLOCK_ELEMENTS = 256  # the tiny Llama's matrices in several blocks


def _slow(destination: int, source: int) -> bool:
    return 1 <= (destination - source) % PAGE_BYTES <= SLOW_GAP


def test_a_relayed_buffer_is_placed_for_its_read_and_its_write():
    """For every pair of file offsets (read from, written at), neither copy lands 1 to 32
    bytes past its source, and the buffer stays 64-byte aligned."""
    for read_from in range(0, PAGE_BYTES, 4):
        for write_at in range(0, PAGE_BYTES, 4):
            place = relay_offset(read_offset(read_from), write_at)
            assert place % ALIGNMENT == 0
            assert not _slow(place, read_from), (read_from, write_at)
            assert not _slow(write_at, place), (read_from, write_at)
    assert relay_offset(128, 128 + 8) == 64  # moved: the write would have been 8 bytes past
    assert relay_offset(128, 128 + 40) == 128


@pytest.fixture
def poisoned_pool(monkeypatch):
    """Buffers given back to a pool are overwritten at once, so that one given back before
    its bytes were written shows in the output; a buffer given back twice since it was
    last taken (the reader may have taken it again in between) is listed."""
    take, give = BufferPool.take, BufferPool.give
    lent: set[int] = set()
    given_twice: list[int] = []

    def raw_of(array):
        while isinstance(array.base, np.ndarray):
            array = array.base
        return array

    def recorded_take(pool, nbytes, page_offset):
        buffer = take(pool, nbytes, page_offset)
        lent.add(id(raw_of(buffer)))
        return buffer

    def poisoning_give(pool, array):
        raw = raw_of(array)
        if pool._owned.get(id(raw)) is raw:
            if id(raw) not in lent:
                given_twice.append(id(raw))
            lent.discard(id(raw))
        raw.view(np.uint8)[:] = 0xFF
        give(pool, array)

    monkeypatch.setattr(BufferPool, "take", recorded_take)
    monkeypatch.setattr(BufferPool, "give", poisoning_give)
    return given_twice


def _engine(recipe, folder):
    from della_cli.api import MergeOptions, prepare
    from della_cli.engine import MergeEngine
    from della_cli.io.writer import ShardWriter

    recipe, inputs, plan = prepare(recipe, MergeOptions(device="cpu"))
    engine = MergeEngine(recipe, plan, inputs, "cpu", block_elements=BLOCK_ELEMENTS)
    folder.mkdir()
    return engine, ShardWriter(folder, plan.shards)


def _outputs(folder, writer) -> dict[str, np.ndarray]:
    tensors = {}
    for name in writer.close():
        tensors.update(load_file(folder / name))
    return tensors


def _same(written: dict[str, np.ndarray], stored: dict[str, np.ndarray]) -> bool:
    return written.keys() == stored.keys() and all(
        np.array_equal(written[n].view(np.uint8), stored[n].view(np.uint8)) for n in stored
    )


@pytest.fixture
def passthrough(model_zoo, write_recipe, monkeypatch):
    """A passthrough recipe of a bf16 model, whose blocks all go through the buffer pool,
    and the model's tensors."""
    import della_cli.engine as engine_module

    monkeypatch.setattr(engine_module, "SMALL_TASK_ELEMENTS", 0)
    model = model_zoo("llama", expert=1, dtype=torch.bfloat16)
    recipe = write_recipe({"merge_method": "passthrough", "models": [{"model": str(model)}]})
    stored = {}
    for path in model.glob("*.safetensors"):
        stored.update(load_file(path))
    return recipe, stored


def test_passthrough_writes_the_buffers_it_read_once_written(passthrough, poisoned_pool, tmp_path):
    """Each block is written from the buffer it was read into (no copy), which goes back to
    the pool only after its write: the output is the input's bytes."""
    recipe, stored = passthrough
    engine, writer = _engine(recipe, tmp_path / "out")
    read_into, written_from = {}, {}
    read_block, write = engine.read_block, engine.write

    def recorded_read(task):
        loaded = read_block(task)
        read_into[(task.job.name, task.start)] = loaded[-1].ctypes.data
        return loaded

    def recorded_write(task, chunk):
        written_from[(task.job.name, task.start)] = chunk.ctypes.data
        write(task, chunk)

    engine.read_block, engine.write = recorded_read, recorded_write
    engine.run(writer)
    assert poisoned_pool == []
    assert _same(_outputs(tmp_path / "out", writer), stored)
    merged = [key for key in written_from if key in read_into]
    assert len(merged) > len({name for name, _ in merged})  # tensors in several blocks
    assert all(written_from[key] == read_into[key] for key in merged)


def test_a_batch_copies_the_rows_its_merges_share(passthrough, poisoned_pool, tmp_path):
    """In a sweep's batch the block's buffers are given back once every merge is done with
    them, before the writes: each merge writes a copy, and both outputs are the input's."""
    from della_cli.engine.batch import BatchEngine

    recipe, stored = passthrough
    (first, first_writer), (second, second_writer) = (
        _engine(recipe, tmp_path / name) for name in ("first", "second")
    )
    BatchEngine([first, second]).run([first_writer, second_writer], [0, 0])
    assert _same(_outputs(tmp_path / "first", first_writer), stored)
    assert _same(_outputs(tmp_path / "second", second_writer), stored)
    assert poisoned_pool == []


def test_rows_that_are_the_reference_and_an_expert_go_back_once(
    model_zoo, write_recipe, poisoned_pool, monkeypatch, tmp_path
):
    """karcher, without a base, takes its first model as the reference and reads its rows
    once for both: the buffer goes back to the pool once (given twice, the second give could
    return it while the reader filled it again), and the output is that of a merge without
    the pool."""
    import della_cli.engine as engine_module

    base = model_zoo("llama", dtype=torch.bfloat16)
    other = model_zoo("llama", expert=1, dtype=torch.bfloat16)
    recipe = write_recipe(
        {
            "merge_method": "karcher",
            "models": [{"model": str(base)}, {"model": str(other)}],
        }
    )
    engine, writer = _engine(recipe, tmp_path / "unpooled")
    engine.run(writer)
    unpooled = _outputs(tmp_path / "unpooled", writer)
    monkeypatch.setattr(engine_module, "SMALL_TASK_ELEMENTS", 0)
    engine, writer = _engine(recipe, tmp_path / "pooled")
    engine.run(writer)
    assert _same(_outputs(tmp_path / "pooled", writer), unpooled)
    assert poisoned_pool == []
