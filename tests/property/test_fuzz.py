"""Fuzzing the two parsers that read untrusted input: the recipe and the safetensors header.

Every input either parses or raises the project's own error (RecipeError, ModelError): never
another exception, never a hang. Examples are bounded so the default run stays fast.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from della_cli.errors import ModelError, RecipeError
from della_cli.io.reader import read_header
from della_cli.recipe import parse_recipe

FUZZ = settings(
    max_examples=int(os.environ.get("DELLA_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

VALID_RECIPE = {
    "merge_method": "della",
    "base_model": "base",
    "models": [
        {"model": "a", "parameters": {"weight": 1.0, "density": 0.7}},
        {"model": "b", "parameters": {"weight": 0.5}},
    ],
    "parameters": {"density": 0.7, "epsilon": 0.07, "lambda": 1.1, "rescale": True},
    "seed": 1,
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def parses_or_recipe_error(text: str) -> None:
    try:
        parse_recipe(text)
    except RecipeError as error:
        assert str(error) and "\n" not in str(error)  # one line


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text_parses_or_gives_a_recipe_error(text):
    parses_or_recipe_error(text)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


ALL_PATHS = [p for p in _paths(VALID_RECIPE) if p]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), values), min_size=1, max_size=3))
def test_mutated_recipes_parse_or_give_a_recipe_error(mutations):
    recipe = copy.deepcopy(VALID_RECIPE)
    for path, value in mutations:
        node = recipe
        try:
            for step in path[:-1]:
                node = node[step]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    text = json.dumps(recipe, allow_nan=True)  # JSON is YAML; NaN becomes YAML's .nan-ish
    parses_or_recipe_error(text)


def _valid_file_bytes() -> bytes:
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}
    return save(tensors, metadata={"format": "pt"})


VALID_FILE = _valid_file_bytes()


def reads_or_model_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        path.write_bytes(data)
        try:
            infos = read_header(path)
        except ModelError as error:
            assert str(path) in str(error)
            return
        for info in infos.values():  # what parsed is internally consistent
            assert info.offset + info.nbytes <= len(data)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_read_or_give_a_model_error(data):
    reads_or_model_error(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_FILE) - 1), st.integers(0, 255)), max_size=6))
def test_mutated_files_read_or_give_a_model_error(flips):
    data = bytearray(VALID_FILE)
    for position, value in flips:
        data[position] = value
    reads_or_model_error(bytes(data))


@FUZZ
@given(values)
def test_any_json_header_reads_or_gives_a_model_error(header):
    raw = json.dumps(header).encode()
    reads_or_model_error(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
