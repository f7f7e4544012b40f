"""The reader (headers, validation, confinement), the shard writer and the output staging."""

from __future__ import annotations

import itertools
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from della_cli.errors import ModelError
from della_cli.io.dtypes import from_torch, to_torch, torch_code
from della_cli.io.output import TEMP_MARKER, staged_folder
from della_cli.io.reader import INDEX_NAME, ModelReader, read_header
from della_cli.io.writer import OutputTensor, ShardWriter, split_into_shards

# --- helpers ---------------------------------------------------------------------------------


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(6, 4, generator=generator),
        "layer.bias": torch.randn(4, generator=generator).to(torch.bfloat16),
        "layer.steps": torch.arange(3, dtype=torch.int64),
    }


def raw_file(header: dict, data: bytes = b"", declared_length: int | None = None) -> bytes:
    """A safetensors file from a header dict and data, optionally lying about its length."""
    raw = json.dumps(header).encode()
    length = len(raw) if declared_length is None else declared_length
    return struct.pack("<Q", length) + raw + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], per_shard: int) -> dict:
    """Save ``tensors`` in shards of ``per_shard`` tensors with an index; return the index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        file_name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, folder / file_name)
        weight_map.update(dict.fromkeys(group, file_name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    return index


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


def read_all(reader: ModelReader) -> dict[str, torch.Tensor]:
    try:
        return {name: to_torch(reader.read(name)) for name in reader.tensors}
    finally:
        reader.close()


# --- reader ----------------------------------------------------------------------------------


def test_reader_reads_a_single_file(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text('{"vocab_size": 6}')
    reader = ModelReader(tmp_path, "single")
    assert reader.config == {"vocab_size": 6}
    infos = reader.tensors
    assert infos["layer.bias"].dtype == "BF16" and infos["layer.bias"].shape == (4,)
    assert infos["layer.steps"].is_floating is False
    assert infos["embed.weight"].numel == 24
    assert_same(read_all(reader), tensors)


def test_reader_reads_a_sharded_index(tmp_path):
    tensors = sample_tensors()
    index = write_sharded(tmp_path, tensors, per_shard=2)
    reader = ModelReader(tmp_path, "sharded")
    assert {info.path.name for info in reader.tensors.values()} == set(index["weight_map"].values())
    assert_same(read_all(reader), tensors)


def test_reader_refuses_an_index_naming_absent_tensors(tmp_path):
    write_sharded(tmp_path, sample_tensors(), per_shard=2)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"ghost\.weight"):
        ModelReader(tmp_path, "ghost")


F32_PAIR = entry("F32", [2], 0, 8)
# name: (file content, what the error must say)
CORRUPT_FILES = {
    "shorter than the length prefix": (b"\x01\x02\x03", "shorter than 8 bytes"),
    "header length past the end": (
        raw_file({"t": F32_PAIR}, bytes(8), declared_length=10_000),
        "header length 10000 runs past the end",
    ),
    "header not JSON": (struct.pack("<Q", 8) + b"not json", "not valid JSON"),
    "header not an object": (raw_file([1, 2]), "not a JSON object"),  # type: ignore[arg-type]
    "unknown dtype": (raw_file({"t": entry("F12", [2], 0, 8)}, bytes(8)), "dtype 'F12'"),
    "size not matching shape": (
        raw_file({"t": entry("F32", [3], 0, 8)}, bytes(8)),
        "holds 8 bytes but F32 (3,) needs 12",
    ),
    "negative shape": (raw_file({"t": entry("F32", [-2], 0, 8)}, bytes(8)), "invalid shape"),
    "offsets past the data": (
        raw_file({"t": entry("F32", [4], 0, 16)}, bytes(8)),
        "'t' runs past the end of the file",
    ),
    "reversed offsets": (
        raw_file({"t": entry("F32", [2], 8, 0)}, bytes(8)),
        "invalid data offsets",
    ),
    "overlapping tensors": (
        raw_file({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, bytes(12)),
        "'a' and 'b' overlap",
    ),
}


@pytest.mark.parametrize(("content", "reason"), CORRUPT_FILES.values(), ids=CORRUPT_FILES.keys())
def test_corrupt_headers_are_refused_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelError) as raised:
        read_header(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert reason in str(raised.value)
    with pytest.raises(ModelError, match=r"model\.safetensors"):
        ModelReader(tmp_path, "corrupt")


def test_a_truncated_real_file_is_refused(tmp_path):
    save_file(sample_tensors(), tmp_path / "whole.safetensors")
    whole = (tmp_path / "whole.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(whole[:-5])
    with pytest.raises(ModelError, match="past the end") as raised:
        read_header(path)
    assert str(path) in str(raised.value)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/outside.safetensors", "link"])
def test_index_cannot_name_a_shard_outside_the_folder(tmp_path, shard):
    outside = tmp_path / "outside.safetensors"
    save_file(sample_tensors(), outside)
    folder = tmp_path / "model"
    folder.mkdir()
    if shard == "link":
        (folder / "link.safetensors").symlink_to(outside)
        shard = "link.safetensors"
    elif shard.startswith("/"):
        shard = str(outside)
    weight_map = dict.fromkeys(sample_tensors(), shard)
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelError, match="outside the model folder"):
        ModelReader(folder, "escape")


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    write_sharded(tmp_path, sample_tensors(), per_shard=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelError, match="does not exist"):
        ModelReader(tmp_path, "missing")


@pytest.mark.parametrize(
    "index",
    [
        "{not json",
        "[]",
        '{"metadata": {}}',
        '{"weight_map": ["a"]}',
        '{"weight_map": {"a": 5}}',
        '{"weight_map": {"a": ["model.safetensors"]}}',
        '{"weight_map": {"a": "model.safetensors", "b": null}}',
    ],
)
def test_invalid_index_is_refused(tmp_path, index):
    save_file({"a": torch.zeros(2)}, tmp_path / "model.safetensors")
    (tmp_path / INDEX_NAME).write_text(index)
    with pytest.raises(ModelError, match="not a valid index") as raised:
        ModelReader(tmp_path, "bad-index")
    assert str(tmp_path / INDEX_NAME) in str(raised.value)


def test_pickle_only_folder_is_refused_with_a_hint(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match="pickle") as raised:
        ModelReader(tmp_path, "pickled")
    assert "safetensors" in str(raised.value) and "save_pretrained" in str(raised.value)


def test_empty_folder_and_missing_folder_are_refused(tmp_path):
    with pytest.raises(ModelError, match=r"no model\.safetensors"):
        ModelReader(tmp_path, "empty")
    with pytest.raises(ModelError, match="not a folder"):
        ModelReader(tmp_path / "nowhere", "nowhere")


# --- writer ----------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    if dtype == torch.int64:
        return torch.randint(-(2**40), 2**40, shape, generator=generator)
    return torch.randn(shape, generator=generator).to(dtype)


def write_model(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list:
    outputs = [OutputTensor(n, torch_code(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    shards = split_into_shards(outputs, max_shard_bytes)
    writer = ShardWriter(folder, shards)
    for name, tensor in tensors.items():
        writer.write(name, from_torch(tensor))
    writer.close()
    return shards


tensor_specs = st.lists(
    st.tuples(
        st.sampled_from(DTYPES),
        st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=30, deadline=None)
@given(specs=tensor_specs, max_shard_bytes=st.sampled_from([1, 16, 64, 10**9]))
def test_writer_round_trips_any_dtype_and_shard_size(specs, max_shard_bytes):
    tensors = {
        f"t{i}.weight": random_tensor(dtype, shape, seed=i)
        for i, (dtype, shape) in enumerate(specs)
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        shards = write_model(folder, tensors, max_shard_bytes)
        files = sorted(folder.glob("*.safetensors"))
        assert len(files) == len(shards)
        assert (folder / INDEX_NAME).exists() == (len(shards) > 1)
        read_back: dict[str, torch.Tensor] = {}
        for path in files:
            read_back.update(load_file(path))
        assert_same(read_back, tensors)
        assert_same(read_all(ModelReader(folder, "written")), tensors)


def test_writer_hashes_in_slices_what_it_writes(tmp_path, monkeypatch):
    """The shard's digest, made a slice at a time beside the writes, is that of the file's
    bytes, for a tensor that spans several slices and a short last one."""
    from della_cli.io import writer as writer_module
    from della_cli.io.journal import file_digest

    monkeypatch.setattr(writer_module, "HASHED_SLICE_BYTES", 96)
    finished = {}
    tensor = random_tensor(torch.float32, (7, 13), seed=3)
    outputs = [OutputTensor("t.weight", torch_code(tensor.dtype), tuple(tensor.shape))]
    writer = ShardWriter(tmp_path, split_into_shards(outputs, 10**9), 0, finished.__setitem__)
    writer.write("t.weight", from_torch(tensor))
    writer.close()
    path = tmp_path / "model.safetensors"
    assert finished == {"model.safetensors": file_digest(path)}
    assert_same(load_file(path), {"t.weight": tensor})


def test_shards_follow_hugging_face_names_and_index(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((4, 4), float(i)) for i in range(5)}  # 64 B each
    shards = write_model(tmp_path, tensors, max_shard_bytes=128)
    assert [len(s) for s in shards] == [2, 2, 1]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        INDEX_NAME,
    ]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 5 * 64
    assert index["weight_map"] == {
        "layer.0.weight": "model-00001-of-00003.safetensors",
        "layer.1.weight": "model-00001-of-00003.safetensors",
        "layer.2.weight": "model-00002-of-00003.safetensors",
        "layer.3.weight": "model-00002-of-00003.safetensors",
        "layer.4.weight": "model-00003-of-00003.safetensors",
    }
    for name, file_name in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / file_name)[name], tensors[name])


def test_single_shard_is_model_safetensors_without_index(tmp_path):
    write_model(tmp_path, sample_tensors(), max_shard_bytes=10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert load_file(tmp_path / "model.safetensors")["layer.steps"].tolist() == [0, 1, 2]


def test_writer_starts_write_back_as_it_goes_and_drops_only_older_chunks(tmp_path, monkeypatch):
    """Every WRITEBACK_BYTES the new bytes' write-back starts and the chunk before is
    dropped from the cache; the file is the same either way, and a file system that refuses
    the advice is written as before."""
    from della_cli.io import writer as writer_module

    calls = []
    monkeypatch.setattr(writer_module, "WRITEBACK_BYTES", 1000)
    monkeypatch.setattr(
        os,
        "posix_fadvise",
        lambda fd, start, length, advice: calls.append((start, start + length, advice)),
    )
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(12)}  # 400 B each
    (tmp_path / "advised").mkdir()
    write_model(tmp_path / "advised", tensors, max_shard_bytes=10**9)
    h = (tmp_path / "advised" / "model.safetensors").stat().st_size - 12 * 400  # the header
    # Each call covers the chunk just written (1200 B: the first write to reach 1000) and the
    # one before it, whose pages are clean by then.
    assert calls == [
        (0, h + 1200, os.POSIX_FADV_DONTNEED),
        (h, h + 2400, os.POSIX_FADV_DONTNEED),
        (h + 1200, h + 3600, os.POSIX_FADV_DONTNEED),
        (h + 2400, h + 4800, os.POSIX_FADV_DONTNEED),
    ]

    def refuse(*args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    (tmp_path / "refused").mkdir()
    write_model(tmp_path / "refused", tensors, max_shard_bytes=10**9)
    written = (tmp_path / "advised" / "model.safetensors").read_bytes()
    assert written == (tmp_path / "refused" / "model.safetensors").read_bytes()


def test_writer_refuses_tensors_out_of_plan(tmp_path):
    shards = [[OutputTensor("a", "F32", (2,)), OutputTensor("b", "F32", (2,))]]
    writer = ShardWriter(tmp_path, shards)
    with pytest.raises(RuntimeError, match="expected 'a'"):
        writer.write("b", np.zeros(2, dtype=np.float32))
    with pytest.raises(RuntimeError, match="F32"):
        writer.write("a", np.zeros(2, dtype=np.float16))
    writer.write("a", np.zeros(2, dtype=np.float32))
    with pytest.raises(RuntimeError, match="before 'b'"):
        writer.close()
    writer.abort()


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 50), min_size=0, max_size=20),
    max_shard_bytes=st.integers(1, 120),
)
def test_split_into_shards_respects_the_limit(sizes, max_shard_bytes):
    tensors = [OutputTensor(f"t{i}", "U8", (size,)) for i, size in enumerate(sizes)]
    shards = split_into_shards(tensors, max_shard_bytes)
    assert [t for shard in shards for t in shard] == tensors  # order kept, nothing lost
    assert len(shards) >= 1
    for shard in shards:
        total = sum(t.nbytes for t in shard)
        assert total <= max_shard_bytes or len(shard) == 1
    # Greedy: a shard was closed only because the next tensor did not fit.
    for shard, following in itertools.pairwise(shards):
        assert sum(t.nbytes for t in shard) + following[0].nbytes > max_shard_bytes


# --- output staging --------------------------------------------------------------------------


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_staged_folder_removes_the_temporary_folder_on_failure(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ValueError), staged_folder(out) as staging:
        assert TEMP_MARKER in staging.name and staging.parent == out.parent
        (staging / "partial.safetensors").write_bytes(b"half")
        raise ValueError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert (out / "old.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


def test_staged_folder_cleans_up_on_interrupt_without_creating_the_output(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt), staged_folder(out) as staging:
        (staging / "partial").write_text("x")
        raise KeyboardInterrupt
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_staged_folder_replaces_the_destination_on_success(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("old")
    with staged_folder(out, overwrite=True) as staging:
        (staging / "model.safetensors").write_text("new")
        assert (out / "config.json").exists()  # the old output stays until the new one is whole
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert leftovers(tmp_path) == []


def test_staged_folder_creates_a_new_destination(tmp_path):
    out = tmp_path / "deep" / "merged"
    with staged_folder(out) as staging:
        (staging / "model.safetensors").write_bytes(b"x")
    assert (out / "model.safetensors").read_bytes() == b"x"
    assert leftovers(out.parent) == []
    assert os.listdir(tmp_path) == ["deep"]


def test_writer_knows_where_each_tensors_bytes_land_in_its_shard(tmp_path):
    """The engine places output buffers by these offsets; they must be the file's own."""
    tensors = {f"layer.{i}.weight": torch.full((4, 3 + i), float(i)) for i in range(5)}
    outputs = [OutputTensor(n, "F32", tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardWriter(tmp_path, split_into_shards(outputs, max_shard_bytes=150))
    offsets = {name: writer.file_offset(name, 4) for name in tensors}
    for name, tensor in tensors.items():
        writer.write(name, from_torch(tensor))
    for file_name in writer.close():
        raw = (tmp_path / file_name).read_bytes()
        header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin = 8 + struct.unpack("<Q", raw[:8])[0] + entry["data_offsets"][0]
            assert offsets[name] == begin + 4
            assert raw[begin : begin + 4] == from_torch(tensors[name]).tobytes()[:4]
