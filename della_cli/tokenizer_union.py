"""The output vocabulary of a merge that builds its tokenizer, and the files that carry it.

mergekit 0.1.5 (``tokenizer/build.py``) builds the output tokenizer from the models' own: the
base's (stripped of tokens at ids at or past its config ``vocab_size``), a model's as it is, or
the union: the base's tokens, then each ordinary token of the other models the base lacks, then
every model's added tokens (base first, each model's by ascending id; the first model's settings
win), then the tokens ``tokens:`` names that are still missing. Each new token is appended as an
added token at the next id, as ``transformers``' ``add_tokens`` does.

Two choices where mergekit's order is not reproducible: it walks the models after the base in a
set's order and each model's tokens in a hash map's order, so the ids of new tokens change from
run to run when there are several. della takes the models in recipe order and each model's
tokens by ascending id.

Everything is read from and written to ``tokenizer.json`` (and ``tokenizer_config.json``'s
``added_tokens_decoder``, ``added_tokens.json``) as JSON: no tokenizer library is loaded, and the
other files of the source tokenizer (special tokens map, chat template) are kept as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from della_cli.errors import PlanError

TOKENIZER_FILE = "tokenizer.json"
STRIPPABLE = ("BPE", "WordPiece", "WordLevel")  # a vocabulary that maps tokens to ids
# The settings of an added token, as tokenizer.json writes them; add_tokens' defaults for a
# plain string (what a model's ordinary token or a name under tokens: becomes).
ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
ORDINARY_FLAGS = {"single_word": False, "lstrip": False, "rstrip": False}
ORDINARY_FLAGS |= {"normalized": True, "special": False}


@dataclass
class ModelVocabulary:
    """One model's tokenizer as a merge reads it: every token (ordinary and added) with an
    id below ``limit``, the added tokens' entries by id, and the ids at or past it."""

    ids: dict[str, int]
    added: dict[int, dict]
    skipped: list[str] = field(default_factory=list)
    model_type: str = ""


@dataclass
class OutputVocabulary:
    """The output tokenizer: its tokens by id; what changes in the source tokenizer's files
    (tokens stripped, added-token entries appended); and who contributed the new tokens."""

    tokens: list[str]
    appended: list[dict] = field(default_factory=list)
    stripped: list[str] = field(default_factory=list)
    contributions: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.tokens)


def read_vocabulary(folder: Path, label: str, limit: int | None) -> ModelVocabulary | None:
    """The vocabulary of the model in ``folder`` (None without a ``tokenizer.json``); tokens
    at ids at or past ``limit`` (its config's ``vocab_size``) are set aside."""
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        vocab = model["vocab"]
        if isinstance(vocab, list):  # Unigram: [token, score] pairs, the id is the position
            vocab = {entry[0]: index for index, entry in enumerate(vocab)}
        ids = dict(vocab)  # JSON gives str keys; the ids are checked to be integers below
        added = {int(entry["id"]): entry for entry in data.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise PlanError(
            [f"'{label}': its {TOKENIZER_FILE} cannot be read as a tokenizer ({error})"]
        ) from None
    for index, entry in added.items():
        ids[entry["content"]] = index
    if not all(type(index) is int for index in ids.values()):
        raise PlanError([f"'{label}': its {TOKENIZER_FILE} gives a token an id that is no integer"])
    limit = max(ids.values(), default=-1) + 1 if limit is None else limit
    skipped = sorted((t for t, i in ids.items() if i >= limit), key=ids.__getitem__)
    kept = {t: i for t, i in ids.items() if i < limit}
    added = {i: e for i, e in added.items() if i < limit}
    return ModelVocabulary(kept, added, skipped, str(model.get("type", "")))


def build_output(
    source: ModelVocabulary,
    label: str,
    others: list[tuple[str, ModelVocabulary]],
    extra: list[str],
) -> OutputVocabulary:
    """The output vocabulary: ``source``'s tokens (the base's, stripped; or the tokenizer a
    recipe names), then, for a union, the tokens of ``others`` (each model after the base, in
    recipe order) it lacks, then the ``extra`` tokens ``tokens:`` names that are missing."""
    if source.skipped and source.model_type not in STRIPPABLE:
        raise PlanError(
            [
                f"tokenizer: '{label}''s {source.model_type} tokenizer has "
                f"{len(source.skipped)} tokens at ids past its config's vocab_size, which della "
                f"removes only from a {', '.join(STRIPPABLE)} tokenizer"
            ]
        )
    by_id = sorted(source.ids.items(), key=lambda item: item[1])
    if [index for _, index in by_id] != list(range(len(by_id))):
        raise PlanError(
            [
                f"tokenizer: the ids of '{label}''s tokenizer leave gaps; della builds a "
                "tokenizer only on one whose ids run from 0 without a gap"
            ]
        )
    output = OutputVocabulary([token for token, _ in by_id], stripped=list(source.skipped))
    present = set(output.tokens)
    added: dict[str, dict] = {}
    for vocabulary in [source, *(v for _, v in others)]:
        for index in sorted(vocabulary.added):
            entry = vocabulary.added[index]
            added.setdefault(entry["content"], entry)  # the first settings win
    owner = {}
    for other_label, vocabulary in others:
        for token in sorted(vocabulary.ids, key=vocabulary.ids.__getitem__):
            owner.setdefault(token, other_label)
            if token not in present and token not in added:
                _append(output, present, token, ORDINARY_FLAGS, other_label)
    for content, entry in added.items():
        if content not in present:
            flags = {flag: bool(entry.get(flag, False)) for flag in ADDED_FLAGS}
            _append(output, present, content, flags, owner.get(content, label))
    for token in extra:
        if token not in present:
            _append(output, present, token, ORDINARY_FLAGS, "tokens:")
    return output


def _append(output: OutputVocabulary, present: set, token: str, flags: dict, who: str) -> None:
    output.appended.append({"id": output.size, "content": token, **flags})
    output.tokens.append(token)
    present.add(token)
    output.contributions[who] = output.contributions.get(who, 0) + 1


def write_tokenizer(folder: Path, output: OutputVocabulary) -> None:
    """Rewrite the tokenizer files copied into ``folder`` to hold ``output``: the stripped
    tokens removed and the new ones appended, in ``tokenizer.json``, in
    ``tokenizer_config.json``'s ``added_tokens_decoder`` and in ``added_tokens.json`` where the
    source had one."""
    path = folder / TOKENIZER_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    stripped = set(output.stripped)
    if stripped:
        _strip(data, stripped)
    data["added_tokens"] = [*data.get("added_tokens", []), *output.appended]
    _write_json(path, data)
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = {
            index: entry
            for index, entry in (config.get("added_tokens_decoder") or {}).items()
            if entry.get("content") not in stripped
        }
        for entry in data["added_tokens"]:
            settings = {key: value for key, value in entry.items() if key != "id"}
            decoder.setdefault(str(entry["id"]), settings)
        config["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda i: int(i[0])))
        _write_json(config_path, config)
    legacy = folder / "added_tokens.json"
    if legacy.is_file():
        mapping = json.loads(legacy.read_text(encoding="utf-8"))
        mapping = {token: index for token, index in mapping.items() if token not in stripped}
        mapping.update({entry["content"]: entry["id"] for entry in output.appended})
        _write_json(legacy, mapping)


def _strip(data: dict, stripped: set[str]) -> None:
    """Remove tokens from a tokenizer.json, as mergekit's ``get_stripped_tokenizer`` does: from
    the added tokens, the model's vocabulary, and the BPE merges that use them."""
    model = data["model"]
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["content"] not in stripped]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in stripped}
    if "merges" in model:
        model["merges"] = [
            merge
            for merge in model["merges"]
            if not any(part in stripped for part in _merge_parts(merge))
        ]


def _merge_parts(merge: str | list) -> list[str]:
    return merge.split(" ") if isinstance(merge, str) else list(merge)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
