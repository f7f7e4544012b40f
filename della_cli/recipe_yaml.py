"""YAML as della reads it from recipes: safe, bounded, and refusing what YAML allows but a
recipe never needs.

PyYAML's safe loader builds no objects from tags, but it will expand aliases without limit (a
400-byte "billion laughs" document of nested aliases is 9**8 strings, gigabytes once printed in
an error message), follow an alias into itself, accept a list or mapping as a key (which Python
cannot hash), and keep the last of two equal keys silently. This loader refuses each of these
with a YAML error that carries the line and column. ``seed_edit`` changes a recipe's seed at
the marks the parser reports, so that any syntax YAML allows (block, flow, JSON) stays valid.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from della_cli.errors import shown

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes
# Values a recipe may hold once its aliases are expanded (each node, plus each character of
# its scalars): no real recipe comes near, and a 400-byte alias bomb of 9**8 strings does.
MAX_EXPANDED_SIZE = MAX_RECIPE_BYTES
MAX_DEPTH = 64
MAX_DOCUMENTS = 64  # stages of a multi-stage file


def _expanded_size(node: yaml.Node, depth: int, sizes: dict[int, int], open_: set[int]) -> int:
    """The size of ``node`` with every alias expanded (nodes plus scalar characters),
    computed once per node, so a bomb of nested aliases is measured without expanding it."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_ or depth > MAX_DEPTH:
        problem = "a recursive alias" if key in open_ else f"over {MAX_DEPTH} levels of nesting"
        raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)
    open_.add(key)
    if isinstance(node, yaml.ScalarNode):
        size = 1 + len(node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, depth + 1, sizes, open_) for item in node.value)
    else:
        size = 1 + sum(
            _expanded_size(k, depth + 1, sizes, open_) + _expanded_size(v, depth + 1, sizes, open_)
            for k, v in node.value
        )
    open_.discard(key)
    sizes[key] = size
    return size


class RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing duplicate keys (which would silently keep the last), keys
    that are lists or mappings, and documents whose aliases expand past a bound (an alias
    bomb: a few hundred bytes that expand to gigabytes once constructed or printed)."""

    # Values of the documents read so far: the bound holds for a file of several documents
    # together (aliases stay within a document, but a file may repeat a bomb in each).
    expanded_total = 0
    documents = 0

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        self.documents += 1
        if self.documents > MAX_DOCUMENTS:
            raise yaml.composer.ComposerError(
                None, None, f"more than {MAX_DOCUMENTS} documents", self.peek_event().start_mark
            )
        if node is not None:
            self.expanded_total += _expanded_size(node, 0, {}, set())
        if self.expanded_total > MAX_EXPANDED_SIZE:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"the document expands to over {MAX_EXPANDED_SIZE} values through its aliases",
                node.start_mark if node is not None else None,
            )
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    "a key must be a plain value, not a list or a mapping",
                    key_node.start_mark,
                )
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                self._check_same_value(node, key, key_node)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    # Set when a key was given twice with one value: only then is the text walked again for
    # the keys' paths (recipe_compat.duplicate_key_notes, a millisecond not every recipe pays).
    key_given_twice = False

    def _check_same_value(self, node: yaml.MappingNode, key: str, key_node: yaml.Node) -> None:
        """A key given twice with two values is an error (YAML would silently keep the last);
        twice with one value is read once, as mergekit does (a note says so)."""
        values = [
            self.construct_object(value, deep=True)
            for name, value in node.value
            if isinstance(name, yaml.ScalarNode) and self.construct_object(name) == key
        ]
        if any(value != values[0] for value in values[1:]):
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key '{key}' with two values, {shown(values[0])} then "
                f"{shown(values[1])}; keep one",
                key_node.start_mark,
            )
        self.key_given_twice = True


def load_yaml(text: str) -> Any:
    """The values of a YAML text, read as recipes are: safe, bounded, unique keys."""
    return yaml.load(text, Loader=RecipeLoader)


def load_documents(text: str) -> list[Any]:
    """Every document of a YAML text (a multi-stage file), read as recipes are, under the
    bounds of one recipe for all of them together; empty documents are left out."""
    loader = RecipeLoader(text)
    try:
        documents = []
        while loader.check_data():
            documents.append(loader.get_data())
        return [document for document in documents if document is not None]
    finally:
        loader.dispose()


# A document marker: "---" or "..." at the start of a line (YAML allows no such line inside a
# document, block scalars included).
_MARKER = re.compile(r"^(?:---|\.\.\.)(?=[ \t\r\n]|$)", re.MULTILINE)


def split_documents(text: str) -> list[str]:
    """The text of each non-empty document of ``text`` (for each stage's own recipe text)."""
    pieces, start = [], 0
    for marker in _MARKER.finditer(text):
        pieces.append(text[start : marker.start()])
        start = marker.end()
    pieces.append(text[start:])
    return [piece for piece in pieces if load_yaml(piece) is not None]


def seed_edit(text: str, seed: int) -> str | None:
    """``text`` with the top-level seed set to ``seed`` by an edit at the marks YAML's parser
    reports (None when the document is no mapping)."""
    root = yaml.compose(text, Loader=RecipeLoader)
    if not isinstance(root, yaml.MappingNode):
        return None
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "seed":
            begin, end = value.start_mark.index, value.end_mark.index
            spacer = " " if begin == end else ""  # an empty value: keep "seed:" a key
            return f"{text[:begin]}{spacer}{seed}{text[end:]}"
    at = root.start_mark.index
    if root.flow_style:  # {...} or JSON: a first entry, in JSON's own spelling
        return f'{text[: at + 1]}"seed": {seed}, {text[at + 1 :]}' if text[at] == "{" else None
    indent = " " * root.start_mark.column  # the first key's line keeps its indentation
    return f"{text[:at]}seed: {seed}  # set by della merge --seed\n{indent}{text[at:]}"
