"""The engine's blocks are mapped where they lie in the page cache (``io.mapped``) instead of
copied into pool buffers: the same bytes, private to the process, released with their last
view, refused past a file's end, and copied instead wherever a mapping cannot be made."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import della_cli.io.mapped as mapped
import della_cli.io.reader as reader_module
from della_cli.errors import ModelError
from della_cli.io.buffers import PAGE_BYTES, SLOW_GAP, BufferPool, RelayPool
from della_cli.io.reader import ModelReader

MMAP = mapped.mmap.mmap
BLOCK_ELEMENTS = 256  # the tiny Llama's matrices in several blocks


def _mappings_of(path: Path) -> int:
    """How many of this process's memory mappings are of ``path``."""
    text = Path("/proc/self/maps").read_text()
    return sum(line.endswith(str(path)) for line in text.splitlines())


@pytest.fixture
def data_file(tmp_path) -> tuple[Path, bytes]:
    content = np.random.default_rng(0).integers(0, 256, 3 * PAGE_BYTES + 123, np.uint8)
    path = tmp_path / "data.bin"
    path.write_bytes(content.tobytes())
    return path, content.tobytes()


@pytest.mark.skipif(not mapped.AVAILABLE, reason="no private mappings on this platform")
def test_a_mapped_span_holds_the_files_bytes_and_a_write_stays_private(data_file):
    path, content = data_file
    descriptor = os.open(path, os.O_RDONLY)
    try:
        for offset, count in [(0, 10), (7, PAGE_BYTES), (PAGE_BYTES - 3, PAGE_BYTES + 9)]:
            span = mapped.mapped_bytes(descriptor, offset, count)
            assert span is not None and span.flags.writeable
            assert span.tobytes() == content[offset : offset + count]
            span[:] = 0  # the mapping's own copy of the page; the file keeps its bytes
            assert path.read_bytes() == content
    finally:
        os.close(descriptor)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="no /proc/self/maps")
def test_a_mapping_goes_with_its_last_view(data_file):
    path, _ = data_file
    descriptor = os.open(path, os.O_RDONLY)
    try:
        span = mapped.mapped_bytes(descriptor, 5, 2 * PAGE_BYTES)
        view = span[10:20].view(np.uint16)
        del span
        assert _mappings_of(path) == 1  # a view still holds it
        del view
        assert _mappings_of(path) == 0
    finally:
        os.close(descriptor)


def test_a_span_past_the_files_end_is_refused(data_file):
    path, content = data_file
    descriptor = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(mapped.FileTooShort):
            mapped.mapped_bytes(descriptor, len(content) - 10, 11)
    finally:
        os.close(descriptor)


def _bf16_model(tmp_path) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    folder.mkdir()
    weight = torch.randn(512, 1024, generator=torch.Generator().manual_seed(3))
    save_file({"w": weight.to(torch.bfloat16)}, folder / "model.safetensors")
    return folder


def test_the_reader_maps_a_pools_rows_and_refuses_a_shrunk_file(tmp_path, monkeypatch):
    monkeypatch.setattr(reader_module, "MAP_MIN_BYTES", 0)
    folder = _bf16_model(tmp_path)
    reader = ModelReader(folder, "m")
    expected = reader.read("w")  # copied
    rows = reader.read_rows("w", 8, 40, BufferPool(1 << 20))
    assert _is_mapped(rows) == mapped.AVAILABLE
    assert np.array_equal(rows.view(np.uint16), expected[8:40].view(np.uint16))
    del rows
    file = folder / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)
    with pytest.raises(ModelError, match="ended early while reading 'w'"):
        reader.read_rows("w", 500, 512, BufferPool(1 << 20))
    reader.close()


def _is_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` views a mapping (numpy holds it through a memoryview of it)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return isinstance(array.base, memoryview) and isinstance(array.base.obj, MMAP)


def test_the_reader_copies_where_a_mapping_is_refused(tmp_path, monkeypatch):
    """A file system that cannot map (the mmap call fails): the rows are read into the pool's
    buffers, and the reader stops trying."""
    monkeypatch.setattr(reader_module, "MAP_MIN_BYTES", 0)

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(mapped.mmap, "mmap", refuse)
    reader = ModelReader(_bf16_model(tmp_path), "m")
    expected = reader.read("w")
    rows = reader.read_rows("w", 0, 512, BufferPool(1 << 20))
    assert not _is_mapped(rows)
    assert np.array_equal(rows.view(np.uint16), expected.view(np.uint16))
    assert reader._maps is False
    reader.close()


def test_a_mebibyte_or_more_is_mapped_less_is_copied(tmp_path):
    reader = ModelReader(_bf16_model(tmp_path), "m")  # 512 rows of 2 KiB
    pool = BufferPool(1 << 20)
    assert mapped.MAP_MIN_BYTES == 1 << 20
    assert not _is_mapped(reader.read_rows("w", 0, 511, pool))
    assert _is_mapped(reader.read_rows("w", 0, 512, pool)) == mapped.AVAILABLE
    assert not _is_mapped(reader.read_rows("w", 0, 512))  # no pool: a whole read, copied
    reader.close()


def test_a_relayed_read_is_mapped_unless_its_write_would_be_slow():
    """A mapping sits at its file offset's place in a page; the writer copies out of it to
    ``write_at``, slow where that lands 1 to ``SLOW_GAP`` bytes past it."""
    relay = RelayPool(BufferPool(1 << 12), write_at=4096 * 3 + 100)
    assert relay.maps_well(100)  # the same place in a page
    assert relay.maps_well(100 + 64)  # the write lands before its source
    assert not relay.maps_well(100 - 1)
    assert not relay.maps_well(100 - SLOW_GAP)
    assert relay.maps_well(100 - SLOW_GAP - 1)
    assert BufferPool(1 << 12).maps_well(12345)


METHODS = {
    "model_stock": {},
    "slerp": {"t": 0.3},
    "arcee_fusion": {},
    "passthrough": None,
    "ties": {"density": 0.5, "weight": 0.5},
    "sce": {"select_topk": 0.5},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_merge_writes_the_same_bytes_mapped_and_copied(
    method, model_zoo, write_recipe, tmp_path, monkeypatch
):
    """Every block of every tensor mapped (the tiny model's blocks are far below the size
    that is mapped by default), against every block copied."""
    import della_cli.engine as engine_module

    monkeypatch.setattr(engine_module, "SMALL_TASK_ELEMENTS", 0)
    base = str(model_zoo("llama", dtype=torch.bfloat16))
    experts = [str(model_zoo("llama", expert=e, dtype=torch.bfloat16)) for e in (1, 2)]
    parameters = METHODS[method]
    if parameters is None:
        recipe = {"merge_method": method, "models": [{"model": experts[0]}]}
    elif method == "slerp":
        recipe = {"merge_method": method, "base_model": base, "models": [{"model": experts[0]}]}
        recipe["parameters"] = parameters
    elif method == "ties":
        recipe = {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": e, "parameters": parameters} for e in experts],
        }
    else:
        models = experts[:1] if method == "arcee_fusion" else experts
        recipe = {
            "merge_method": method,
            "base_model": base,
            "models": [{"model": e} for e in models],
            "parameters": parameters,
        }
    path = write_recipe(recipe)
    maps = []
    real = reader_module.mapped_bytes

    def counted(*args):
        span = real(*args)
        maps.append(span is not None)
        return span

    monkeypatch.setattr(reader_module, "mapped_bytes", counted)
    monkeypatch.setattr(reader_module, "MAP_MIN_BYTES", 1 << 62)
    copied = _merged(path, tmp_path / "copied")
    assert maps == []
    monkeypatch.setattr(reader_module, "MAP_MIN_BYTES", 0)
    mapped_output = _merged(path, tmp_path / "mapped")
    assert copied == mapped_output
    assert len(maps) > 20 and (all(maps) or not mapped.AVAILABLE)


def _merged(recipe_path, folder) -> dict[str, bytes]:
    from della_cli.api import MergeOptions, prepare
    from della_cli.engine import MergeEngine
    from della_cli.io.writer import ShardWriter

    recipe, inputs, plan = prepare(recipe_path, MergeOptions(device="cpu", seed=7))
    engine = MergeEngine(recipe, plan, inputs, "cpu", block_elements=BLOCK_ELEMENTS)
    folder.mkdir()
    writer = ShardWriter(folder, plan.shards)
    engine.run(writer)
    return {name: (folder / name).read_bytes() for name in writer.close()}
