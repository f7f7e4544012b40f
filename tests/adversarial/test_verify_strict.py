"""Issue #14, finding 12: `della verify` is at least as strict as the safetensors library,
and the reader it shares with `merge` refuses what it refuses.

The library (``safetensors.safe_open``) refuses holes between tensors, bytes after the last
tensor and shapes whose size overflows; della also refuses a name given twice in one header
(the library silently keeps one) and a model with no tensor. A tensor in two shards is read
from the shard the index names, and `verify` reports the other copy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hostile_files import (
    TENSORS,
    della,
    entry,
    merge_inputs,
    model_folder,
    safetensors_bytes,
    tensors_file,
)
from safetensors import SafetensorError, safe_open

from della_cli.errors import ModelError
from della_cli.io.reader import INDEX_NAME, ModelReader

F32_2 = bytes(8)  # two float32 zeros


def verify_json(folder: Path) -> tuple[int, dict]:
    """`della verify --json` in a subprocess, killed after a minute: some of these shapes
    made it loop for hours."""
    result = della("verify", folder, "--json", timeout_s=60)
    return result.returncode, json.loads(result.stdout)


def files_problem(report: dict) -> str:
    (files,) = [check for check in report["checks"] if check["name"] == "files"]
    assert not files["ok"], report
    return files["detail"]


# name: (file content, what the problem must say, whether safetensors itself refuses it)
CORRUPT = {
    "hole between tensors": (
        safetensors_bytes(
            {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}, bytes(20)
        ),
        "4 bytes between 'a' and 'b' belong to no tensor",
        True,
    ),
    "hole before the first tensor": (
        safetensors_bytes({"a": entry("F32", [2], 4, 12)}, bytes(12)),
        "4 bytes before 'a' belong to no tensor",
        True,
    ),
    "trailing bytes": (
        safetensors_bytes({"a": entry("F32", [2], 0, 8)}, bytes(8) + b"hidden"),
        "6 bytes after the last tensor belong to no tensor",
        True,
    ),
    "duplicate name": (
        safetensors_bytes(
            b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
            b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
            bytes(16),
        ),
        "names 'a' twice",
        False,  # the library keeps one of the two and says nothing
    ),
    "shape overflowing int64": (
        safetensors_bytes({"a": entry("F32", [2**40, 2**40, 0], 0, 0)}),
        "overflows int64",
        True,
    ),
    "dimension past int64": (
        safetensors_bytes({"a": entry("F32", [2**64, 0], 0, 0)}),
        "invalid shape",
        True,
    ),
    "metadata that is not strings": (
        safetensors_bytes({"__metadata__": {"format": 1}, "a": entry("F32", [2], 0, 8)}, F32_2),
        "__metadata__ must map strings to strings",
        True,
    ),
    "no tensors": (
        safetensors_bytes({"__metadata__": {"format": "pt"}}),
        "holds no tensors",
        False,  # the library opens it; there is nothing in it to merge or load
    ),
}


@pytest.mark.parametrize(("content", "problem", "library"), CORRUPT.values(), ids=CORRUPT.keys())
def test_verify_refuses_what_safetensors_refuses_and_more(tmp_path, content, problem, library):
    folder = model_folder(tmp_path / "m", weights=content)
    if library:  # the library's own verdict, so the two cannot drift apart unnoticed
        with pytest.raises(SafetensorError), safe_open(folder / "model.safetensors", "np"):
            pass
    code, report = verify_json(folder)
    assert code == 1 and not report["healthy"]
    assert problem in files_problem(report)


@pytest.mark.parametrize("name", ["hole between tensors", "trailing bytes", "duplicate name"])
def test_merge_refuses_the_same_files_naming_them(tmp_path, name):
    content, problem, _ = CORRUPT[name]
    base = model_folder(tmp_path / "base", weights=content)
    recipe, _ = merge_inputs(tmp_path, base)
    result = della("merge", recipe, tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert problem in result.stderr and "model.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def two_shards_with_a_copy(folder: Path, indexed: str) -> None:
    """Shards 1 and 2 both hold layer 0 (with different values), and one tensor of their own
    each; the index names ``indexed`` for layer 0."""
    folder.mkdir()
    name, other = list(TENSORS)
    extra = np.ones(2, dtype=np.float32)
    (folder / "s1.safetensors").write_bytes(tensors_file({name: TENSORS[name], "extra": extra}))
    (folder / "s2.safetensors").write_bytes(
        tensors_file({name: TENSORS[name] + 100, other: TENSORS[other]})
    )
    weight_map = {name: indexed, other: "s2.safetensors", "extra": "s1.safetensors"}
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text("{}")


@pytest.mark.parametrize("indexed", ["s1.safetensors", "s2.safetensors"])
def test_a_tensor_in_two_shards_is_read_from_the_one_the_index_names(tmp_path, indexed):
    two_shards_with_a_copy(tmp_path / "m", indexed)
    reader = ModelReader(tmp_path / "m", "m")
    name = next(iter(TENSORS))
    expected = TENSORS[name] + (100 if indexed == "s2.safetensors" else 0)
    assert np.array_equal(reader.read(name), expected)
    code, report = verify_json(tmp_path / "m")
    assert code == 1
    assert files_problem(report) == (
        f"'{name}' is in both s1.safetensors and s2.safetensors; the index names {indexed}"
    )


def test_an_index_naming_the_wrong_shard_for_a_tensor_is_refused(tmp_path):
    folder = tmp_path / "m"
    two_shards_with_a_copy(folder, "s1.safetensors")
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"][list(TENSORS)[1]] = "s1.safetensors"  # it is only in s2
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"absent from the shards it gives for them"):
        ModelReader(folder, "m")


def test_a_nan_in_a_copied_base_tensor_is_a_warning(tmp_path):
    # The experts lack "norm", so it is copied from the base: its NaN went unnoticed.
    base = model_folder(
        tmp_path / "base", {**TENSORS, "norm": np.array([1.0, np.nan], dtype=np.float32)}
    )
    recipe, _ = merge_inputs(tmp_path, base)
    result = della("merge", recipe, tmp_path / "out", "--allow-nonfinite")
    assert result.returncode == 0, result.stderr
    assert "NaN or Inf values in 'norm'" in result.stderr and "copied" in result.stderr
    refused = della("merge", recipe, tmp_path / "out3")  # the NaN would be published
    assert refused.returncode == 2 and "the merged output holds" in refused.stderr
    assert not (tmp_path / "out3").exists()
    strict = della("merge", recipe, tmp_path / "out2", "--strict")
    assert strict.returncode == 2 and "'norm'" in strict.stderr, strict.stderr
    assert not (tmp_path / "out2").exists()
