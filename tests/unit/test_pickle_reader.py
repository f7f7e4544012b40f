"""pytorch_model*.bin folders: refused by default; read by the weights-only loader if allowed."""

from __future__ import annotations

import json
import os

import pytest
import torch

from della_cli.errors import ModelError
from della_cli.io.dtypes import to_torch
from della_cli.io.pickle_reader import PickleModelReader, has_only_pickle_weights
from della_cli.io.reader import ModelReader

STATE = {
    "embed.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3),
    "norm.weight": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16),
    "position_ids": torch.arange(5),
    "empty": torch.zeros(0, 4),
}


def read(reader, name):
    return to_torch(reader.read(name))


def read_rows(reader, name, start, stop):
    return to_torch(reader.read_rows(name, start, stop))


def test_reads_tensors_rows_and_dtypes_like_the_safetensors_reader(tmp_path):
    torch.save(STATE, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert has_only_pickle_weights(tmp_path)
    reader = PickleModelReader(tmp_path, "pickled")
    assert {n: (i.dtype, i.shape) for n, i in reader.tensors.items()} == {
        "embed.weight": ("F32", (4, 3)),
        "norm.weight": ("BF16", (3,)),
        "position_ids": ("I64", (5,)),
        "empty": ("F32", (0, 4)),
    }
    assert reader.config == {"model_type": "llama"}
    for name, tensor in STATE.items():
        assert torch.equal(read(reader, name), tensor)
    assert torch.equal(read_rows(reader, "embed.weight", 1, 3), STATE["embed.weight"][1:3])
    assert read_rows(reader, "empty", 0, 0).shape == (0, 4)
    assert torch.equal(read_rows(reader, "norm.weight", 0, 1), STATE["norm.weight"].reshape(1, -1))
    # Reads are copies: writing into one does not change the next.
    read(reader, "embed.weight").zero_()
    assert torch.equal(read(reader, "embed.weight"), STATE["embed.weight"])
    reader.close()


def test_sharded_folder_reads_every_shard_through_its_index(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {
        "a": "pytorch_model-00001-of-00002.bin",
        "b": "pytorch_model-00002-of-00002.bin",
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reader = PickleModelReader(tmp_path, "sharded")
    assert torch.equal(read(reader, "b"), torch.zeros(3))
    assert torch.equal(read(reader, "a"), torch.ones(2))  # switches back to the first file


def test_legacy_format_without_zip_is_read_whole(tmp_path):
    torch.save(STATE, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    reader = PickleModelReader(tmp_path, "legacy")
    assert torch.equal(read(reader, "embed.weight"), STATE["embed.weight"])


class _RunsCode:
    """An object whose unpickling would create a folder: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(
        {"weight": torch.zeros(2), "payload": _RunsCode(marker)}, tmp_path / "pytorch_model.bin"
    )
    with pytest.raises(ModelError, match="weights-only loader refused it"):
        PickleModelReader(tmp_path, "evil")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [([torch.zeros(2)], "holds a list, not a dict of tensors"), ({"a": 3}, "'a' is not a named")],
)
def test_anything_but_a_dict_of_tensors_is_refused(tmp_path, content, message):
    torch.save(content, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match=message):
        PickleModelReader(tmp_path, "odd")


def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    torch.save({"a": torch.ones(2)}, tmp_path / "outside.bin")
    index = {"weight_map": {"a": "../outside.bin"}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="outside the model folder"):
        PickleModelReader(folder, "escaping")


def test_without_permission_the_safetensors_reader_refuses_with_the_flag_named(tmp_path):
    torch.save(STATE, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="--allow-pickle"):
        ModelReader(tmp_path, "pickled")
