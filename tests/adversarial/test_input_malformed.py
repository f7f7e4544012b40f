"""Issue #14, finding 11 (malformed inputs): every malformed header, config, index or recipe
is a user's input problem, exit 2 with one line naming the file or field; none may reach
the "unexpected ..." handler (exit 1, a bug report).

First the reproductions from the issue (nesting 100k deep, ``text_config: "x"``, a YAML key
that is a list, a NUL in a weight-map name) and what fuzzing found next (``architectures: 5``,
names too long for the file system, a newline in a model name), then a seeded fuzz that puts
hostile values at the fields della reads."""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hostile_files import TENSORS, merge_inputs, model_folder, safetensors_bytes, tensors_file
from typer.testing import CliRunner

from della_cli.cli import app

DEEP = "[" * 100_000 + "]" * 100_000  # JSON and YAML nested 100k deep
EMBEDDING = {"model.embed_tokens.weight": np.ones((4, 2), dtype=np.float32), **TENSORS}


def invoke(*args: object):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_input_error(code: int, output: str, *named: str) -> None:
    """Exit 2, one line, naming what is wrong, and not the "unexpected" handler."""
    assert code == 2, output
    assert "unexpected" not in output, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    for name in named:
        assert name in lines[0], output


def sharded(folder: Path, weight_map_text: str) -> Path:
    """``folder``'s model.safetensors as one shard, with an index of the given weight map."""
    (folder / "model.safetensors").rename(folder / "s.safetensors")
    (folder / "model.safetensors.index.json").write_text(f'{{"weight_map": {weight_map_text}}}')
    return folder


CASES = {
    "config nested 100k deep": ("config", DEEP, "config.json"),
    "header nested 100k deep": ("header", f'{{"a": {DEEP}}}', "model.safetensors"),
    "index nested 100k deep": ("index", DEEP, "model.safetensors.index.json"),
    "weight-map name nested 100k deep": (
        "index",
        json.dumps(dict.fromkeys(TENSORS, "DEEP")).replace('"DEEP"', DEEP),
        "model.safetensors.index.json",
    ),
    "text_config a string": ("config", '{"text_config": "x"}', "text_config"),
    "architectures a number": ("config", '{"architectures": 5}', "architectures"),
    "architectures of numbers": ("config", '{"architectures": [1, 2]}', "architectures"),
    "a NUL in a weight-map name": (
        "index",
        json.dumps(dict.fromkeys(TENSORS, "s\0.safetensors")),
        "weight_map entry",
    ),
    "a weight-map name too long": (
        "index",
        json.dumps(dict.fromkeys(TENSORS, "s" * 5000 + ".safetensors")),
        "cannot be opened",
    ),
}


@pytest.mark.parametrize(("where", "content", "named"), CASES.values(), ids=CASES.keys())
def test_a_malformed_model_file_is_exit_2_naming_it(tmp_path, where, content, named):
    base = model_folder(tmp_path / "base", EMBEDDING)
    if where == "config":
        (base / "config.json").write_text(content)
    elif where == "header":
        (base / "model.safetensors").write_bytes(safetensors_bytes(content.encode()))
    else:
        sharded(base, content)
    recipe, _ = merge_inputs(tmp_path, base)
    assert_input_error(*invoke("plan", recipe), named)
    assert_input_error(*invoke("merge", recipe, tmp_path / "out"), named)
    assert not (tmp_path / "out").exists()
    code, output = invoke("verify", base)
    assert code == 1 and "NOT healthy" in output and named in output, output
    assert "unexpected" not in output


RECIPES = {
    "nested 100k deep": (DEEP, "nested too deeply"),
    "a key that is a list": ("? [a, b]\n: 1\nmerge_method: linear\n", "a key must be a plain"),
    "a flow key that is a list": ("{[a]: 1, merge_method: linear}", "a key must be a plain value"),
    "a number of 5000 digits": ("seed: " + "9" * 5000, "invalid YAML"),
    "an impossible date": ("seed: 2001-13-45", "invalid YAML"),
    "a model name too long": ("models: [{model: " + "x" * 5000 + "}]", "a part is too long"),
    "a newline in a model name": ('models: [{model: "/nowhere\\n"}]', "/nowhere\\n"),
    "a NUL in a model name": ('models: [{model: "/nowhere\\0"}]', "/nowhere\\x00"),
}


@pytest.mark.parametrize(("text", "named"), RECIPES.values(), ids=RECIPES.keys())
def test_a_malformed_recipe_is_exit_2_naming_it(tmp_path, text, named):
    recipe = tmp_path / "recipe.yaml"
    if text.startswith("models:"):
        text = "merge_method: linear\n" + text
    recipe.write_text(text)
    assert_input_error(*invoke("plan", recipe), named)


# --- a seeded fuzz: hostile values at the fields della reads ------------------------------------

HOSTILE = [
    "x",
    "",
    "a\0b\nc",
    -1,
    2**70,
    1.5,
    float("nan"),
    None,
    True,
    [],
    [1, "x"],
    {},
    {"vocab_size": "x"},
    "DEEP",  # replaced by JSON nested 100k deep
]
CONFIG_KEYS = [
    "text_config",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "architectures",
    "model_type",
    "quantization_config",
    "tie_word_embeddings",
    "n_embd",
]
RECIPE_PATHS = [
    ("merge_method",),
    ("base_model",),
    ("models",),
    ("models", 0),
    ("models", 0, "model"),
    ("models", 0, "parameters"),
    ("models", 0, "parameters", "weight"),
    ("parameters",),
    ("parameters", "normalize"),
    ("seed",),
    ("dtype",),
    ("tokenizer_source",),
]


def dumped(value: object) -> str:
    return json.dumps(value).replace('"DEEP"', DEEP)


def mutate_config(rng: random.Random, base: Path, _: Path) -> None:
    config = {"model_type": "llama", "vocab_size": 4, "hidden_size": 2}
    config[rng.choice(CONFIG_KEYS)] = rng.choice(HOSTILE)
    (base / "config.json").write_text(dumped(config))


def mutate_index(rng: random.Random, base: Path, _: Path) -> None:
    weight_map: object = dict.fromkeys(EMBEDDING, "s.safetensors")
    if rng.random() < 0.3:
        weight_map = rng.choice(HOSTILE)
    else:
        weight_map[rng.choice(list(EMBEDDING))] = rng.choice(HOSTILE)  # type: ignore[index]
    sharded(base, dumped(weight_map))


def mutate_header(rng: random.Random, base: Path, _: Path) -> None:
    raw = tensors_file(EMBEDDING)
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    name = rng.choice(list(header))
    if rng.random() < 0.3:
        header[name] = rng.choice(HOSTILE)
    else:
        header[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(HOSTILE)
    (base / "model.safetensors").write_bytes(safetensors_bytes(dumped(header).encode(), data))


def mutate_recipe(rng: random.Random, base: Path, recipe: Path) -> None:
    data = json.loads(recipe.read_text())
    data["models"][0]["parameters"] = {"weight": 1.0}
    data["parameters"] = {"normalize": False}
    *parents, last = rng.choice(RECIPE_PATHS)
    holder = data
    for key in parents:
        holder = holder[key]
    holder[last] = rng.choice(HOSTILE)
    recipe.write_text(dumped(data))


@pytest.mark.parametrize("mutate", [mutate_config, mutate_index, mutate_header, mutate_recipe])
def test_fuzzed_inputs_never_reach_the_unexpected_handler(tmp_path, mutate):
    rng = random.Random(f"della-14-{mutate.__name__}")
    deadline = time.monotonic() + 20  # bounded: as many cases as fit, at least a few
    for case in range(40):
        if case >= 5 and time.monotonic() > deadline:
            break
        root = tmp_path / str(case)
        base = model_folder(root / "base", EMBEDDING)
        recipe, _ = merge_inputs(root, base)
        mutate(rng, base, recipe)
        code, output = invoke("plan", recipe)
        assert "unexpected" not in output and code in (0, 2), output
        if code == 2:
            assert len(output.strip().splitlines()) == 1 or "cannot run" in output, output
        code, output = invoke("verify", base)
        assert "unexpected" not in output and code in (0, 1), output
