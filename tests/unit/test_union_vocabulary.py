"""The union vocabulary and the row each input takes for each of its tokens, on hand-built
word-level tokenizers whose answers are worked out by hand:

- base:  <pad> <s> </s> <unk> a b c                      (7 tokens)
- X:     <pad> <s> </s> <unk> c d a e, added <|x|> (special)   (9)
- Y:     <pad> <s> </s> <unk> f b, added <|y|> (special), <|x|> (plain)   (8)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from vocabularies import save_words

from della_cli.engine.aligned_rows import AlignedRows
from della_cli.engine.shared import MergeInputs
from della_cli.errors import PlanError
from della_cli.io.reader import ModelReader
from della_cli.plan import BASE, Source, TensorJob
from della_cli.recipe import parse_recipe
from della_cli.tokenizer_union import build_output, read_vocabulary, write_tokenizer
from della_cli.vocab_rows import DefaultRow, align_vocabulary

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
UNION = [*SPECIALS, "a", "b", "c", "d", "e", "f", "<|x|>", "<|y|>"]
EMBEDDING = "model.embed_tokens.weight"


def make_model(folder: Path, number: int, words: list[str], added=()) -> Path:
    """A model whose embedding row r is (100 * number + r, -r): each row says whose it is."""
    save_words(folder, [*SPECIALS, *words], added)
    rows = len(SPECIALS) + len(words) + len(added)
    index = torch.arange(rows, dtype=torch.float32)
    embedding = torch.stack([100 * number + index, -index], dim=1)
    save_file({EMBEDDING: embedding}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"vocab_size": rows}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocabularies")
    return {
        "base": make_model(root / "base", 1, ["a", "b", "c"]),
        "X": make_model(root / "X", 2, ["c", "d", "a", "e"], (("<|x|>", True),)),
        "Y": make_model(root / "Y", 3, ["f", "b"], (("<|y|>", True), ("<|x|>", False))),
    }


def test_the_union_appends_ordinary_then_added_tokens(folders):
    base, x, y = (read_vocabulary(folders[n], n, None) for n in ("base", "X", "Y"))
    output = build_output(base, "base", [("X", x), ("Y", y)], ["<z>", "a"])
    assert output.tokens == [*UNION, "<z>"]
    assert output.contributions == {"X": 3, "Y": 2, "tokens:": 1}
    appended = {entry["content"]: entry for entry in output.appended}
    assert appended["<|x|>"]["special"] and not appended["<|x|>"]["normalized"]  # X's settings
    assert not appended["d"]["special"] and appended["d"]["normalized"]  # add_tokens' defaults


def test_tokens_at_or_past_vocab_size_are_left_out(folders):
    x = read_vocabulary(folders["X"], "X", 8)
    assert x.skipped == ["<|x|>"] and "<|x|>" not in x.ids and x.ids["e"] == 7
    base = read_vocabulary(folders["base"], "base", 6)
    output = build_output(base, "base", [], [])
    assert output.tokens == [*SPECIALS, "a", "b"] and output.stripped == ["c"]


def test_the_written_tokenizer_is_the_union(folders, tmp_path):
    from transformers import AutoTokenizer

    base, x, y = (read_vocabulary(folders[n], n, None) for n in ("base", "X", "Y"))
    output = build_output(base, "base", [("X", x), ("Y", y)], [])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folders["base"] / name, tmp_path / name)
    write_tokenizer(tmp_path, output)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 12
    assert tokenizer.convert_ids_to_tokens(list(range(12))) == UNION
    assert tokenizer("a <|x|> f")["input_ids"] == [4, 10, 9]
    decoder = json.loads((tmp_path / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert decoder["10"]["special"] and decoder["9"]["content"] == "f"


def test_stripping_removes_the_tokens_from_the_files(folders, tmp_path):
    from transformers import AutoTokenizer

    base = read_vocabulary(folders["base"], "base", 6)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folders["base"] / name, tmp_path / name)
    write_tokenizer(tmp_path, build_output(base, "base", [], ["<z>"]))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.get_vocab() == {t: i for i, t in enumerate([*SPECIALS, "a", "b", "<z>"])}


def recipe_for(folders: dict[str, Path], tokenizer: dict, tmp_path: Path):
    text = {
        "merge_method": "task_arithmetic",
        "base_model": str(folders["base"]),
        "models": [{"model": str(folders["X"])}, {"model": str(folders["Y"])}],
        "tokenizer": tokenizer,
    }
    recipe = parse_recipe(yaml.safe_dump(text))
    readers = [ModelReader(folders[name], name) for name in ("base", "X", "Y")]
    limits = {BASE: 7, 0: 9, 1: 8}
    return recipe, readers, limits


def test_each_input_keeps_its_rows_and_defaults_follow_mergekits_rules(folders, tmp_path):
    recipe, readers, limits = recipe_for(folders, {"source": "union"}, tmp_path)
    alignment = align_vocabulary(recipe, readers[0], readers[1:], limits)
    assert alignment.tokenizer.tokens == UNION and alignment.padded_size == 12
    assert alignment.own[BASE].tolist() == [0, 1, 2, 3, 4, 5, 6, -1, -1, -1, -1, -1]
    assert alignment.own[0].tolist() == [0, 1, 2, 3, 6, -1, 4, 5, 7, -1, 8, -1]
    assert alignment.own[1].tolist() == [0, 1, 2, 3, -1, 5, -1, -1, -1, 4, 7, 6]
    assert alignment.defaults == {
        4: DefaultRow(((BASE, 4),)),  # a: the base has it
        5: DefaultRow(((BASE, 5),)),  # b
        6: DefaultRow(((BASE, 6),)),  # c
        7: DefaultRow(((0, 5),)),  # d: only X has it
        8: DefaultRow(((0, 7),)),  # e
        9: DefaultRow(((1, 4),)),  # f: only Y
        10: DefaultRow(((0, 8), (1, 7))),  # <|x|>: X and Y, not the base: their mean
        11: DefaultRow(((1, 6),)),  # <|y|>
    }


def aligned_block(folders, readers, alignment, model: int) -> np.ndarray:
    job = TensorJob(
        EMBEDDING,
        "merge",
        (alignment.padded_size, 2),
        "F32",
        Source(BASE, EMBEDDING, aligned=True),
        (Source(0, EMBEDDING, aligned=True), Source(1, EMBEDDING, aligned=True)),
    )
    rows = AlignedRows(MergeInputs(readers[0], readers[1:]), alignment, "F32")
    source = job.reference if model == BASE else job.experts[model]
    first = rows.rows(job, source, 0, 5)  # two blocks: the runs and defaults of each
    return np.concatenate([first, rows.rows(job, source, 5, alignment.padded_size)])


def test_tokens_settings_force_and_padding(folders, tmp_path):
    source = {"kind": "model_token", "model": str(folders["Y"]), "token": "f"}
    tokens = {
        "c": {"source": source, "force": True},
        "<z>": {},
        "<|y|>": {"source": {"kind": "zero"}},
    }
    tokenizer = {"source": "union", "tokens": tokens, "pad_to_multiple_of": 8}
    recipe, readers, limits = recipe_for(folders, tokenizer, tmp_path)
    alignment = align_vocabulary(recipe, readers[0], readers[1:], limits)
    assert alignment.tokenizer.tokens == [*UNION, "<z>"] and alignment.padded_size == 16
    assert all(alignment.own[model][6] == -1 for model in (BASE, 0, 1))  # c is forced
    assert alignment.defaults[6] == DefaultRow(((1, 4),))  # Y's row of f
    assert alignment.defaults[11] == DefaultRow() and alignment.defaults[12] == DefaultRow()

    def row(model: int, r: int) -> list[float]:
        return [100 * model + r, -r]

    base = aligned_block(folders, readers, alignment, BASE)
    expected = [row(1, r) for r in range(6)]  # the base's own, c forced to Y's f:
    expected += [row(3, 4), row(2, 5), row(2, 7), row(3, 4)]  # c, d, e, f
    expected += [np.mean([row(2, 8), row(3, 7)], axis=0).tolist(), [0, 0], [0, 0]]
    mean = np.mean(expected, axis=0).tolist()  # <|y|> and <z> zero, padding the mean
    assert base[:13].tolist() == expected
    np.testing.assert_allclose(base[13:], [mean] * 3, rtol=1e-6)
    y = aligned_block(folders, readers, alignment, 1)
    assert y[[4, 5, 9, 10, 11]].tolist() == [row(1, 4), row(3, 5), row(3, 4), row(3, 7), row(3, 6)]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"source": "X", "force": True}, "tokenizer.tokens.b.source: 'X' has no token 'b'"),
        (
            {"source": {"kind": "model_token", "model": "Y", "token": "q"}},
            "tokenizer.tokens.b.source.token: 'Y' has no token 'q'",
        ),
        (
            {"source": {"kind": "model_token", "model": "X", "token_id": 9}, "force": True},
            "tokenizer.tokens.b.source.token_id: 9 is out of range for 'X', whose vocabulary "
            "has 9 rows (ids 0 to 8)",
        ),
    ],
)
def test_a_bad_tokens_entry_names_its_field(folders, tmp_path, entry, message):
    source = entry["source"]
    if isinstance(source, str):
        entry = {**entry, "source": str(folders[source])}
    else:
        entry = {**entry, "source": {**source, "model": str(folders[source["model"]])}}
    recipe, readers, limits = recipe_for(folders, {"tokens": {"b": entry}}, tmp_path)
    with pytest.raises(PlanError) as caught:
        align_vocabulary(recipe, readers[0], readers[1:], limits)
    for name in ("X", "Y"):
        message = message.replace(f"'{name}'", f"'{folders[name]}'")
    assert f"  - {message}" in str(caught.value)
