"""``chat_template``: the named templates are mergekit's files, ``auto`` picks the most common
template, and the chosen one is written where every transformers version reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from della_cli.chat_template import (
    TEMPLATES_DIR,
    choose_auto,
    model_chat_template,
    named_templates,
    template_text,
    write_chat_template,
)

CHATML = template_text("chatml")


def test_the_named_templates_are_mergekits_five():
    assert named_templates() == ["alpaca", "chatml", "exaone", "llama3", "mistral"]
    assert CHATML.startswith("{% for message in messages %}{{'<|im_start|>'")
    notice = (TEMPLATES_DIR / "NOTICE").read_text()
    assert "LGPL-3.0-only" in notice


def test_a_jinja_template_is_used_verbatim():
    text = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert template_text(text) == text


def model(tmp_path: Path, name: str, jinja: str | None = None, config: object = None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": config}))
    return folder


def test_a_models_template_is_read_as_transformers_reads_it(tmp_path):
    assert model_chat_template(model(tmp_path, "jinja", "A", "B")) == "A"  # the file wins
    assert model_chat_template(model(tmp_path, "config", config="B")) == "B"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert model_chat_template(model(tmp_path, "named", config=named)) == "D"
    assert model_chat_template(model(tmp_path, "none")) is None


def test_auto_takes_the_most_common_template_stripped(tmp_path):
    folders = [
        ("base", model(tmp_path, "b", "X")),
        ("one", model(tmp_path, "1", "Y\n")),
        ("two", model(tmp_path, "2", config="Y")),
    ]
    template, note = choose_auto(folders)
    assert template == "Y"
    assert note == "chat_template: auto chose the template of 'one' (2 of 3 models have it)"


def test_auto_breaks_a_tie_by_recipe_order_and_may_find_nothing(tmp_path):
    folders = [("a", model(tmp_path, "a")), ("b", model(tmp_path, "b", "B")), ("c", tmp_path)]
    (tmp_path / "chat_template.jinja").write_text("C")
    assert choose_auto(folders)[0] == "B"
    template, note = choose_auto([("a", model(tmp_path, "empty"))])
    assert template is None and "found no chat template" in note


@pytest.mark.parametrize("in_config", [True, False])
def test_the_template_is_written_to_the_file_and_the_config(tmp_path, in_config):
    folder = tmp_path / "out"
    (folder / "additional_chat_templates").mkdir(parents=True)
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("T")
    config = {"model_max_length": 8, **({"chat_template": "old"} if in_config else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert write_chat_template(folder, CHATML)
    assert (folder / "chat_template.jinja").read_text() == CHATML
    written = json.loads((folder / "tokenizer_config.json").read_text())
    assert written == ({**config, "chat_template": CHATML} if in_config else config)
    assert not (folder / "additional_chat_templates").exists()


def test_no_tokenizer_no_template(tmp_path):
    assert not write_chat_template(tmp_path, CHATML)
    assert not (tmp_path / "chat_template.jinja").exists()
