"""Where each row of a re-indexed vocabulary tensor comes from, for every input of a merge.

When a recipe builds its tokenizer (``tokenizer_source: union``, or a ``tokenizer:`` block with
``tokens`` or ``pad_to_multiple_of``), mergekit 0.1.5 re-indexes every input's vocabulary rows
(``embed_tokens``, ``lm_head``) to the output vocabulary before the merge method sees them
(``tokenizer/embed.py``). An input that has a token keeps its own row, unless the token's
``tokens:`` entry says ``force: true``. An input that lacks it gets the token's default row:
the ``tokens:`` entry's source (zero, a model's row for the same token, a model's row for
another token or id); else, automatically, the row of the only model that has it, else the
base's row if the base has it, else the mean of the rows of the models that have it, else
zero. Rows past the vocabulary (``pad_to_multiple_of``) are each input's mean aligned row.

This module decides all of that at plan time from the tokenizer files: per input, its row for
each output token (-1 where it takes the default), and each default as the rows it averages.
The engine (``engine.aligned_rows``) builds each block's rows from it, reading only the rows a
block needs; the padding means are the one thing that needs a pass over a whole tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from della_cli.errors import PlanError
from della_cli.io.metadata import metadata_files
from della_cli.io.reader import ModelReader
from della_cli.recipe import Recipe
from della_cli.recipe_tokenizer import TokenSetting
from della_cli.tokenizer_union import (
    TOKENIZER_FILE,
    ModelVocabulary,
    OutputVocabulary,
    build_output,
    read_vocabulary,
)

BASE = -1  # as plan.BASE


@dataclass(frozen=True)
class DefaultRow:
    """A token's row for the inputs that lack it: the mean of ``rows`` ((model, row) pairs,
    each a row of that model's same tensor), or zero when there are none."""

    rows: tuple[tuple[int, int], ...] = ()


@dataclass
class VocabularyAlignment:
    """The output vocabulary and, per input model, where each of its rows comes from."""

    tokenizer: OutputVocabulary
    padded_size: int
    own: dict[int, np.ndarray]  # per model: its row of each output token, -1: the default
    defaults: dict[int, DefaultRow]  # per output row an input may lack
    summary: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.tokenizer.size

    @property
    def models_read(self) -> set[int]:
        """The models whose rows some default row is made of."""
        return {model for row in self.defaults.values() for model, _ in row.rows}


class _Aligner:
    def __init__(self, recipe: Recipe, readers: dict[int, ModelReader], limits: dict[int, int]):
        self.recipe = recipe
        self.readers = readers
        self.limits = limits
        self.reference = BASE if BASE in readers else 0
        self.labels = {m: self.label(m) for m in readers}
        self.warnings: list[str] = []

    def label(self, model: int) -> str:
        schema = self.recipe.schema
        return str(schema.base_model) if model == BASE else self.recipe.model_refs[model]

    def index_of(self, label: str) -> int:
        """The input a reference names (the base first, where it is also listed)."""
        return next(model for model, name in self.labels.items() if name == label)

    def vocabulary(self, model: int, limit: int | None) -> ModelVocabulary | None:
        reader = self.readers[model]
        metadata_files(reader.folder, reader.root, (TOKENIZER_FILE,))  # confined to its folder
        return read_vocabulary(reader.folder, self.labels[model], limit)

    def vocabularies(self) -> dict[int, ModelVocabulary]:
        reference = self.vocabulary(self.reference, self.limits.get(self.reference))
        if reference is None:
            raise PlanError(
                [
                    f"tokenizer: '{self.labels[self.reference]}' has no {TOKENIZER_FILE}, from "
                    "which della builds the output's tokenizer"
                ]
            )
        found = {self.reference: reference}
        for model in self.readers:
            if model == self.reference:
                continue
            vocabulary = self.vocabulary(model, self.limits.get(model))
            if vocabulary is None:
                self.warnings.append(
                    f"tokenizer: '{self.labels[model]}' has no {TOKENIZER_FILE}; its vocabulary "
                    f"is taken to be '{self.labels[self.reference]}''s, as mergekit takes it"
                )
                vocabulary = reference
            found[model] = vocabulary
        for model, vocabulary in found.items():
            if vocabulary is not reference or model == self.reference:
                self._note_skipped(model, vocabulary)
        return found

    def _note_skipped(self, model: int, vocabulary: ModelVocabulary) -> None:
        if vocabulary.skipped:
            self.warnings.append(
                f"tokenizer: '{self.labels[model]}' has {len(vocabulary.skipped)} tokens at ids "
                f"at or past its vocab_size {self.limits.get(model)} (first "
                f"{vocabulary.skipped[0]!r}); they are left out, as mergekit leaves them"
            )

    def output(self, vocabularies: dict[int, ModelVocabulary]) -> OutputVocabulary:
        """The union, or the source tokenizer, with the tokens ``tokens:`` adds."""
        settings = self.recipe.schema.tokenizer
        extra = [token for token, _ in settings.tokens] if settings else []
        source = self.recipe.schema.tokenizer_source
        model = self.recipe.tokenizer_model
        if model is not None:  # a model's tokenizer as it is, not stripped
            whole = self.vocabulary(model, None)
            if whole is None:
                raise PlanError([f"tokenizer_source: '{source}' has no {TOKENIZER_FILE}"])
            return build_output(whole, self.labels[model], [], extra)
        others = []
        if source == "union":
            seen = {self.labels[self.reference]}
            for other, vocabulary in vocabularies.items():
                if self.labels[other] not in seen:
                    seen.add(self.labels[other])
                    others.append((self.labels[other], vocabulary))
        reference = vocabularies[self.reference]
        return build_output(reference, self.labels[self.reference], others, extra)


def align_vocabulary(
    recipe: Recipe,
    base: ModelReader | None,
    experts: list[ModelReader],
    limits: dict[int, int],
) -> VocabularyAlignment:
    """Plan the re-indexing of every input's vocabulary rows. ``limits``: per model (BASE or a
    recipe index), the rows its tokens must lie under (its config's ``vocab_size``, at most
    its embedding's rows)."""
    readers = {BASE: base} if base is not None else {}
    readers.update(enumerate(experts))
    aligner = _Aligner(recipe, readers, limits)
    vocabularies = aligner.vocabularies()
    output = aligner.output(vocabularies)
    own = {
        model: np.array([vocabulary.ids.get(t, -1) for t in output.tokens], dtype=np.int64)
        for model, vocabulary in vocabularies.items()
    }
    # A model listed twice (the base also under models) counts once, as in mergekit.
    labels = [aligner.labels[m] for m in own]
    groups = [m for i, m in enumerate(own) if aligner.labels[m] not in labels[:i]]
    defaults = _Defaults(aligner, output, own, groups, vocabularies).assign()
    settings = recipe.schema.tokenizer
    multiple = settings.pad_to_multiple_of if settings else None
    padded = math.ceil(output.size / multiple) * multiple if multiple else output.size
    summary = _summary(aligner, output, padded)
    return VocabularyAlignment(output, padded, own, defaults, summary, aligner.warnings)


class _Defaults:
    """The default row of each output token that some input lacks or that is forced."""

    def __init__(
        self,
        aligner: _Aligner,
        output: OutputVocabulary,
        own: dict[int, np.ndarray],
        groups: list[int],
        vocabularies: dict[int, ModelVocabulary],
    ):
        self.aligner = aligner
        self.output = output
        self.own = own
        self.groups = groups
        self.vocabularies = vocabularies
        table = np.stack([own[m] for m in groups])
        self.counts = (table >= 0).sum(axis=0)

    def assign(self) -> dict[int, DefaultRow]:
        settings = self.aligner.recipe.schema.tokenizer
        configured = dict(settings.tokens) if settings else {}
        defaults: dict[int, DefaultRow] = {}
        for row in np.flatnonzero(self.counts < len(self.groups)):
            if self.output.tokens[row] not in configured:
                defaults[int(row)] = self.automatic(int(row))
        position = {token: row for row, token in enumerate(self.output.tokens)}
        forced = []
        for token, setting in configured.items():
            row = position[token]
            if not setting.force and self.counts[row] == len(self.groups):
                continue
            defaults[row] = self.configured(token, row, setting)
            if setting.force:
                forced.append(row)
        for row in forced:  # every input takes the default, its own row or not
            for rows in self.own.values():
                rows[row] = -1
        return defaults

    def automatic(self, row: int) -> DefaultRow:
        have = [m for m in self.groups if self.own[m][row] >= 0]
        if len(have) > 1 and BASE in have:
            have = [BASE]
        return DefaultRow(tuple((m, int(self.own[m][row])) for m in have))

    def configured(self, token: str, row: int, setting: TokenSetting) -> DefaultRow:
        source = setting.source
        field = f"tokenizer.tokens.{token}.source"
        if source is None:
            return self.automatic(row)
        if source.kind == "zero":
            return DefaultRow()
        model = self.aligner.index_of(source.model)
        label = self.aligner.labels[model]
        if source.kind == "model":
            own = int(self.own[model][row])
            if own < 0:
                raise PlanError([f"{field}: '{label}' has no token {token!r} to give its row"])
            return DefaultRow(((model, own),))
        if source.token is not None:
            own = self.vocabularies[model].ids.get(source.token, -1)
            if own < 0:
                raise PlanError([f"{field}.token: '{label}' has no token {source.token!r}"])
            return DefaultRow(((model, own),))
        limit = self.aligner.limits.get(model)
        if limit is not None and source.token_id >= limit:
            raise PlanError(
                [
                    f"{field}.token_id: {source.token_id} is out of range for '{label}', whose "
                    f"vocabulary has {limit} rows (ids 0 to {limit - 1})"
                ]
            )
        return DefaultRow(((model, source.token_id),))


def _summary(aligner: _Aligner, output: OutputVocabulary, padded: int) -> str:
    """One line for the plan: the output vocabulary, where its new tokens come from."""
    source = aligner.recipe.schema.tokenizer_source
    start = output.size - sum(output.contributions.values())
    model = aligner.recipe.tokenizer_model
    owner = aligner.labels[aligner.reference if model is None else model]
    parts = [
        f"{count} named under tokens:" if who == "tokens:" else f"{count} from '{who}'"
        for who, count in output.contributions.items()
    ]
    added = f" and {', '.join(parts)}" if parts else ", no token added"
    what = "a union of" if source == "union" else "the tokenizer of"
    line = f"tokenizer: {what} '{owner}' ({start} tokens){added}; vocab_size {output.size}"
    if padded != output.size:
        line += f", padded to {padded}"
    if source == "union":
        line += " (new tokens take ids in recipe order of the models, each model's by id)"
    return line
