"""The per-tensor half of planning: each output tensor's sources, its vocabulary rows fitted to
the output's, and the checks that make every problem surface before any tensor data is read.

Vocabulary rows and tied embeddings are recognised by shape and by name patterns every Hugging
Face causal LM shares; ``della_cli.plan`` walks the tensors and calls ``Planner.job_for``.
"""

from __future__ import annotations

import re
from dataclasses import replace

from della_cli.io.dtypes import DTYPE_NAMES
from della_cli.io.reader import ModelReader, TensorInfo
from della_cli.methods import Sparsifier
from della_cli.methods.counts import fraction_count
from della_cli.plan_types import BASE, Source, TensorJob
from della_cli.quant.requantize import requantization
from della_cli.quant.view import written_dtype
from della_cli.recipe import Recipe
from della_cli.vocab_rows import VocabularyAlignment

_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)
_VOCAB_NAME = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|embed_out|lm_head|"
    r"tok_embeddings|output)(\.|$)"
)


def find_embedding(reader: ModelReader) -> str | None:
    """The input embedding matrix of a model, found by the names transformers models use."""
    for name, info in reader.tensors.items():
        if name.endswith(_EMBEDDING_SUFFIXES) and len(info.shape) == 2:
            return name
    return None


def _vocab_size(reader: ModelReader) -> int | None:
    config = reader.config or {}
    value = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return value if isinstance(value, int) else None


def _is_vocab_mismatch(name: str, ref: TensorInfo, other: TensorInfo, vocab: set[int]) -> bool:
    """Shapes that differ only in their first dimension, on a vocabulary-indexed tensor."""
    if len(ref.shape) != len(other.shape) or ref.shape[1:] != other.shape[1:]:
        return False
    return bool(_VOCAB_NAME.search(name)) or ref.shape[0] in vocab or other.shape[0] in vocab


def is_tied(reader: ModelReader) -> bool:
    return find_embedding(reader) is not None and not any(
        n.endswith("lm_head.weight") for n in reader.tensors
    )


class Planner:
    """Turns each output tensor into its job, gathering every problem and warning on the way
    (``build_plan`` raises them all at once)."""

    def __init__(
        self,
        recipe: Recipe,
        reference: ModelReader,
        ref_model: int,
        experts: list[ModelReader],
        strict: bool,
        alignment: VocabularyAlignment | None = None,
    ):
        self.recipe = recipe
        self.alignment = alignment
        self.reference = reference
        self.ref_model = ref_model
        self.experts = experts
        self.problems: list[str] = []
        self.warnings: list[str] = []
        # Per model: (tensor, its shape, the base's) where they differ, reported as one line.
        self.mismatched: dict[int, list[tuple[str, tuple, tuple]]] = {}
        self.strict = strict
        self.vocab = {v for v in map(_vocab_size, [reference, *experts]) if v}
        # Without out_dtype, dtype is also the output's dtype (mergekit's rule).
        self.out_dtype = DTYPE_NAMES.get(recipe.schema.out_dtype or recipe.schema.dtype or "")
        self.requantizing = recipe.schema.out_dtype in ("fp8", "mxfp4")
        self.tokenizer_model = recipe.tokenizer_model
        if self.tokenizer_model == ref_model or alignment is not None:
            self.tokenizer_model = None  # the reference is the source: nothing to refit
        embedding = find_embedding(reference)
        self.vocab_rows = reference.tensors[embedding].shape[0] if embedding else None

    def aligned_target(
        self, name: str, ref: TensorInfo, own: Source
    ) -> tuple[TensorInfo, Source] | None:
        """A vocabulary tensor's output shape and reference when the merge re-indexes rows to
        the tokenizer it builds (``della_cli.vocab_rows``); None for any other tensor."""
        if self.alignment is None or not ref.shape or ref.shape[0] != self.vocab_rows:
            return None
        if not (_VOCAB_NAME.search(name) and ref.is_floating):
            return None
        shape = (self.alignment.padded_size, *ref.shape[1:])
        return replace(ref, shape=shape), replace(own, aligned=True)

    def vocabulary_target(
        self, name: str, ref: TensorInfo, own: Source
    ) -> tuple[TensorInfo, Source]:
        """The output shape of ``name`` and its reference source: the reference's own, unless
        ``tokenizer_source`` names a model whose rows differ, whose row count is then the
        output's. Reference rows past that are cropped; rows the reference lacks (tokens only
        the source model has) are the source model's own, so their task vectors are zero for
        every model that lacks them too."""
        if self.tokenizer_model is None or not ref.shape:
            return ref, own
        source = self.experts[self.tokenizer_model]
        tensor = name
        if name not in source.tensors and name.endswith("lm_head.weight") and is_tied(source):
            tensor = find_embedding(source)
        info = source.tensors.get(tensor)
        if (
            info is None
            or info.shape == ref.shape
            or not _is_vocab_mismatch(name, ref, info, self.vocab)
        ):
            return ref, own
        rows = info.shape[0]
        label = self.recipe.model_refs[self.tokenizer_model]
        if rows > ref.shape[0]:
            how = f"its {rows - ref.shape[0]} extra rows are taken from '{label}'"
            fill = Source(self.tokenizer_model, tensor)
        else:
            how = f"the base's last {ref.shape[0] - rows} rows are dropped"
            fill = None
        self.warnings.append(
            f"tokenizer_source '{label}': '{name}' gets its {rows} rows (the base has "
            f"{ref.shape[0]}); {how}"
        )
        target = replace(ref, shape=(rows, *ref.shape[1:]))
        return target, replace(own, rows=ref.shape[0], fill=fill)

    def source_for(
        self,
        index: int,
        name: str,
        ref: TensorInfo,
        tensor: str | None = None,
        aligned: bool = False,
    ) -> Source | None:
        """Expert ``index``'s input for output tensor ``name``: its own ``tensor`` of that name
        unless given (None: it sits this one out); ``aligned``: re-indexed to the tokenizer the
        merge builds."""
        expert = self.experts[index]
        label = self.recipe.model_refs[index]
        tensor = tensor or name
        if tensor not in expert.tensors and name.endswith("lm_head.weight") and is_tied(expert):
            tensor = find_embedding(expert)  # a tied model's lm_head is its embedding matrix
        info = expert.tensors.get(tensor)
        if info is None:
            message = f"'{label}' has no '{tensor}'"
            if self.strict:
                self.problems.append(f"{message} (--strict)")
            else:
                self.warnings.append(f"{message}; it is left out of that tensor")
            return None
        if aligned and info.shape[1:] == ref.shape[1:] and len(info.shape) == len(ref.shape):
            return Source(index, tensor, aligned=True)  # any row count: re-indexed by token
        if info.shape == ref.shape and not aligned:
            if ref.is_floating and not info.is_floating:
                self.problems.append(
                    f"'{label}' has '{name}' as {info.dtype} but the reference has {ref.dtype}"
                )
            return Source(index, tensor)
        if _is_vocab_mismatch(name, ref, info, self.vocab):
            how = "cropped" if info.shape[0] > ref.shape[0] else "padded with zero deltas"
            whose = "the base's" if self.tokenizer_model is None else "the output's"
            self.warnings.append(
                f"'{label}' has {info.shape[0]} rows in '{name}', the output "
                f"{ref.shape[0]}: {how} to {whose} vocabulary"
            )
            return Source(index, tensor, rows=info.shape[0])
        self.mismatched.setdefault(index, []).append((name, info.shape, ref.shape))
        return None

    def job_for(
        self,
        name: str,
        ref: TensorInfo,
        ref_source: Source,
        inputs: tuple[tuple[int, str], ...] | None = None,
    ) -> TensorJob:
        """The job of output tensor ``name``, merged from ``inputs`` ((model, tensor) each;
        by default every model's tensor of that name)."""
        aligned = self.aligned_target(name, ref, ref_source)
        if aligned is None:
            ref, ref_source = self.vocabulary_target(name, ref, ref_source)
        else:
            ref, ref_source = aligned
        out_dtype = self.out_dtype if (self.out_dtype and ref.is_floating) else written_dtype(ref)
        if not ref.is_floating:
            return TensorJob(name, "copy", ref.shape, ref.dtype, ref_source)
        if inputs is None:
            inputs = tuple((i, name) for i in range(len(self.experts)))
        sources = [
            self.source_for(i, name, ref, tensor, aligned is not None) for i, tensor in inputs
        ]
        present = tuple(s for s in sources if s is not None)
        if aligned is not None:
            self.check_row_donors(name, (ref_source, *present))
        if not present:
            if inputs:  # a slice of its base alone has nothing to merge: no warning
                self.warnings.append(f"no model has '{name}'; copied from the base")
            return TensorJob(name, "copy", ref.shape, out_dtype, ref_source)
        self.check_keep_count(name, ref, present)
        self.check_contract(name, present, [model for model, _ in inputs])
        return TensorJob(name, "merge", ref.shape, out_dtype, ref_source, present)

    def check_row_donors(self, name: str, sources: tuple[Source, ...]) -> None:
        """Every model whose rows give other models' default rows must have this tensor."""
        for model in sorted(self.alignment.models_read - {s.model for s in sources}):
            label = (
                self.recipe.schema.base_model if model == BASE else self.recipe.model_refs[model]
            )
            self.problems.append(
                f"tokenizer: '{label}' gives tokens' rows to the other models but has no '{name}'"
            )

    def requantized(self, job: TensorJob) -> TensorJob:
        """``job`` written in the base's FP8 or MXFP4 format where the base stores it so:
        merged in float32, quantized as it is written (``della_cli.quant.requantize``)."""
        how = requantization(self.reference, job.name)
        return job if how is None else replace(job, out_dtype="F32", requantize=how)

    def check_contract(self, name: str, present: tuple[Source, ...], inputs: list[int]) -> None:
        """A catalog method with a fixed number of models (nuslerp's two) cannot merge a
        tensor that one of its ``inputs`` lacks; mergekit fails there too."""
        catalog = self.recipe.method.catalog
        if catalog is None or len(present) >= catalog.contract.min_models:
            return
        lacking = [self.recipe.model_refs[i] for i in inputs if i not in {s.model for s in present}]
        self.problems.append(
            f"{catalog.name} needs {catalog.contract.min_models} models for '{name}', but "
            f"{', '.join(map(repr, lacking))} lack it"
        )

    def check_keep_count(self, name: str, ref: TensorInfo, present: tuple[Source, ...]) -> None:
        """Trim methods must keep at least one entry of every tensor (ALGORITHMS.md)."""
        sparsifier = self.recipe.method.sparsifier
        if sparsifier not in (Sparsifier.MAGNITUDE, Sparsifier.MAGNITUDE_OUTLIERS):
            return
        if ref.numel == 0:
            return  # an empty tensor has nothing to keep
        for source in present:
            density = self.recipe.expert_params(source.model, name).density or 1.0
            if density < 1 and fraction_count(density, ref.numel) < 1:
                self.problems.append(
                    f"density {density} keeps no entry of '{name}' ({ref.numel} entries) for "
                    f"'{self.recipe.model_refs[source.model]}'; raise it to at least "
                    f"{1 / ref.numel:.3g}"
                )


def row_limit(reader: ModelReader) -> int | None:
    """The rows a model's tokens must lie under: its config's vocab_size, at most the rows of
    its embedding."""
    embedding = find_embedding(reader)
    rows = reader.tensors[embedding].shape[0] if embedding else None
    limits = [v for v in (_vocab_size(reader), rows) if v is not None]
    return min(limits) if limits else None
