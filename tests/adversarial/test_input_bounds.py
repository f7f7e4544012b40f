"""Issue #14, finding 8: tiny hostile inputs must not hang della or exhaust its memory.

Each test is the finding's reproduction, bounded in time: a header whose shape promises 2**62
rows of nothing, a FIFO where the weights should be, a YAML alias bomb, and files far larger
than any recipe, config or header. Each must end at once with exit 2 and one line naming the
file (or, for verify, an unhealthy report)."""

from __future__ import annotations

import json
import os

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

from della_cli.errors import ModelError, RecipeError
from della_cli.io.reader import ModelReader
from della_cli.recipe import load_recipe


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_shape_of_two_to_the_62_rows_of_nothing_is_refused_at_once(tmp_path):
    # 96 bytes: a header promising 2**62 empty rows made verify loop over them for hours.
    weights = safetensors_bytes({"t": entry("F32", [2**62, 0], 0, 0)})
    model_folder(tmp_path / "m", weights=weights)
    result = della("verify", tmp_path / "m", timeout_s=30)
    assert result.returncode == 1, result.stderr
    assert "NOT healthy" in result.stdout
    assert "4611686018427387904" in result.stdout and "'t'" in result.stdout


@pytest.mark.parametrize(
    ("shape", "problem"),
    [
        ([2**40, 2**40, 0], "overflows"),  # partial products past int64
        ([2**63, 0], "invalid shape"),  # a dimension past int64
    ],
)
def test_shapes_past_int64_are_refused(tmp_path, shape, problem):
    model_folder(tmp_path / "m", weights=safetensors_bytes({"t": entry("F32", shape, 0, 0)}))
    with pytest.raises(ModelError, match=problem):
        ModelReader(tmp_path / "m", "m")


@pytest.mark.parametrize("command", ["verify", "merge"])
def test_a_fifo_as_the_weights_file_is_refused_not_waited_on(tmp_path, command):
    recipe, base = merge_inputs(tmp_path)
    (base / "model.safetensors").unlink()
    os.mkfifo(base / "model.safetensors")
    args = ["verify", base] if command == "verify" else ["merge", recipe, tmp_path / "out"]
    result = della(*args, timeout_s=30)  # a hang raises TimeoutExpired
    assert result.returncode == (1 if command == "verify" else 2), result.stderr
    output = result.stdout if command == "verify" else one_error_line(result)
    assert "model.safetensors: not a regular file" in output
    assert not (tmp_path / "out").exists()


def test_a_fifo_as_a_shard_or_config_is_refused(tmp_path):
    folder = model_folder(tmp_path / "m")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    with pytest.raises(ModelError, match=r"config\.json: not a regular file"):
        ModelReader(folder, "m")


# 9**8 "lol"s (about 300 MB once printed) from a recipe of about 500 bytes: merge_method is
# checked first, and its message used to print the whole value.
ALIAS_BOMB = (
    "merge_method: [&a [lol,lol,lol,lol,lol,lol,lol,lol,lol],\n"
    + "".join(
        f"  &{name} [{', '.join(['*' + previous] * 9)}],\n"
        for previous, name in zip("abcdefg", "bcdefgh", strict=True)
    )
    + "  *h]\nmodels: []\n"
)


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 600
    result = della("plan", recipe, timeout_s=30)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert str(recipe) in line and "alias" in line and len(line) < 300


def test_a_value_in_a_recipe_error_is_shown_truncated(tmp_path):
    # 32 aliases of 1000 strings: within the expansion limit, but printing the value in
    # "models: must be a list of models, got ..." took a 400 kB line.
    items = ", ".join(["xxxxxxxx"] * 1000)
    aliases = ", ".join(f"k{i}: *a" for i in range(1, 32))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels: {{k0: &a [{items}], {aliases}}}\n")
    with pytest.raises(RecipeError) as raised:
        load_recipe(recipe)
    message = str(raised.value)
    assert message.startswith("models: must be a list of models, got {")
    assert len(message) < 200


def test_a_recursive_alias_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels: &m [*m]\n")
    with pytest.raises(RecipeError, match="alias"):
        load_recipe(recipe)


def test_a_huge_recipe_is_refused_by_size_before_it_is_parsed(tmp_path):
    recipe = tmp_path / "huge.yaml"
    with recipe.open("w") as handle:  # 50 MB of a valid YAML list: over 3 GB once parsed
        handle.write("merge_method: linear\nmodels:\n")
        line = "  - model: " + "m" * 88 + "\n"
        handle.write(line * (50_000_000 // len(line)))
    result = della("plan", recipe, timeout_s=30)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert str(recipe) in line and "1 MiB" in line


def test_a_huge_config_is_refused_by_size_before_it_is_parsed(tmp_path):
    recipe, base = merge_inputs(tmp_path)
    with (base / "config.json").open("w") as handle:  # 200 MB of JSON: 7 GB once parsed
        handle.write('{"model_type": "toy", "pad": [')
        handle.write("0," * 100_000_000)
        handle.write("0]}")
    result = della("plan", recipe, timeout_s=30)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert "config.json" in line and "16 MiB" in line


def test_a_huge_index_is_refused_by_size(tmp_path):
    folder = model_folder(tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    with (folder / "model.safetensors.index.json").open("w") as handle:
        handle.write('{"weight_map": {')
        handle.write('"x": "model-00001-of-00001.safetensors", ' * 1_000_000)
        handle.write('"y": "model-00001-of-00001.safetensors"}}')
    with pytest.raises(ModelError, match=r"index\.json: .*larger than the 32 MiB limit"):
        ModelReader(folder, "m")


def test_a_header_over_the_limit_names_the_limit(tmp_path):
    path = tmp_path / "m" / "model.safetensors"
    model_folder(tmp_path / "m")
    with path.open("wb") as handle:  # a header length of 200 MB, in a sparse 200 MB file
        handle.write((200 << 20).to_bytes(8, "little"))
        handle.truncate(8 + (200 << 20) + 16)
    with pytest.raises(ModelError) as raised:
        ModelReader(tmp_path / "m", "m")
    assert str(raised.value).startswith(f"{path}: ")
    assert "100 MiB limit" in str(raised.value)


def test_tensors_file_helper_is_valid(tmp_path):
    # The builders above produce files the reader accepts: the refusals are the hostile part.
    folder = model_folder(tmp_path / "m", weights=tensors_file(TENSORS))
    assert set(ModelReader(folder, "m").tensors) == set(TENSORS)
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "toy"}
