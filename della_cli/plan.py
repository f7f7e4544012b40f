"""From safetensors headers alone, the list of tensor jobs of a merge.

Every presence, shape and dtype problem surfaces here, all at once, before any tensor data is
read. Output tensors follow the reference model (the base, or the first model of a ``linear``
merge without one) in its file order, so reads are sequential. Merging is by tensor name with no
per-architecture table: only vocabulary rows and tied embeddings get special handling, and they
are recognised by shape and by name patterns every Hugging Face causal LM shares.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Literal

from della_cli.architecture import config_differences, layer_differences, shape_summary
from della_cli.errors import PlanError
from della_cli.io.dtypes import CONFIG_NAMES, DTYPE_NAMES, itemsize
from della_cli.io.reader import ModelReader, TensorInfo
from della_cli.io.writer import OutputTensor, split_into_shards
from della_cli.kernels import Kernel, assign_kernels
from della_cli.layer_map import LayerMap, SlicedTensor, plan_slices
from della_cli.methods import Sparsifier
from della_cli.methods.counts import fraction_count
from della_cli.methods.streamed import statistics_bytes
from della_cli.quant.requantize import (
    Requantize,
    fp8_output_problem,
    output_shards,
    requantization,
)
from della_cli.quant.view import written_dtype
from della_cli.quantized import refuse_quantized
from della_cli.recipe import Recipe
from della_cli.vocab_rows import VocabularyAlignment, align_vocabulary

BASE = -1  # model index of the base model in a Source

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


@dataclass(frozen=True)
class Source:
    """Where one input of a job comes from: a model (BASE or a recipe index) and a tensor name."""

    model: int
    tensor: str
    rows: int | None = None  # set when the rows must be cropped or padded to the job's shape
    fill: Source | None = None  # a reference's rows past ``rows`` come from here
    aligned: bool = False  # rows re-indexed to the output vocabulary (``Plan.vocabulary``)


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: merged from sources, or copied from the reference model."""

    name: str
    action: Literal["merge", "copy"]
    shape: tuple[int, ...]
    out_dtype: str
    reference: Source  # the base of a delta merge, or what a copy copies
    experts: tuple[Source, ...] = ()
    kernel: Kernel | None = None  # what merges it (``della_cli.kernels``); None for a copy
    requantize: Requantize | None = None  # written in the base's FP8 format (out_dtype: fp8)
    reference_is_base: bool = False  # a slice's own base_model, one of the recipe's models

    @property
    def has_base(self) -> bool:
        """Whether the reference is a base the method merges into (not one of its inputs)."""
        return self.reference.model == BASE or self.reference_is_base

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Plan:
    """Everything the engine needs, and what a dry run reports."""

    jobs: list[TensorJob]
    shards: list[list[OutputTensor]]
    warnings: list[str] = field(default_factory=list)
    compute_dtype: str = "F32"
    tie_word_embeddings: bool | None = None
    vocab_size: int | None = None  # set when tokenizer_source changes the vocabulary rows
    vocabulary: VocabularyAlignment | None = None  # a tokenizer the merge builds (union, ...)
    quantization: dict | None = None  # the quantization_config of an FP8 output
    layer_map: LayerMap | None = None  # a merge by slices: the output's layers

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for shard in self.shards for t in shard)

    @property
    def config_dtype(self) -> str | None:
        """The dtype name config.json should carry: that of the floating tensors written, the
        one of most entries where they differ (a DeepSeek-V3 keeps its router biases in
        float32 beside bfloat16 weights, and transformers loads the model in this dtype)."""
        entries: dict[str, int] = {}
        for job in self.jobs:
            if job.out_dtype in CONFIG_NAMES:
                entries[job.out_dtype] = entries.get(job.out_dtype, 0) + job.numel
        if not entries:
            return None
        return CONFIG_NAMES[max(entries, key=entries.__getitem__)]  # a tie: the first

    def working_memory_bytes(self, block_elements: int, whole_tensor_selection: bool) -> int:
        """An upper estimate of the memory the engine holds at once, beyond the runtime.

        A merge works on blocks of about ``block_elements`` (whole rows): two blocks of raw
        inputs in flight (read-ahead), the block's inputs and task vectors in the compute dtype
        with a few temporaries, and up to three output blocks waiting to be written. Trim
        methods (``whole_tensor_selection``) also hold, per tensor, the reference as stored,
        one expert's task vector and a keep mask per expert. A copy holds its tensor twice. A
        catalog method's statistics pass reads one more block of each input while the
        read-ahead holds its own, and keeps the tensor's summed statistics until its merge
        pass ends.
        """
        compute = itemsize(self.compute_dtype)
        worst = 0
        for job in self.jobs:
            stored = itemsize(job.out_dtype)
            if job.reference.aligned:  # re-indexed rows are built in the compute dtype
                stored = max(stored, compute)
            if job.action == "copy":
                worst = max(worst, 2 * job.numel * stored)
                continue
            experts = len(job.experts)
            row = job.numel // max(job.shape[0], 1) if len(job.shape) > 1 else job.numel
            block = min(job.numel, max(row, block_elements // max(row, 1) * row))
            need = block * (2 * (experts + 1) * stored + (2 * experts + 5) * compute + 3 * stored)
            if job.kernel is not None and job.kernel.passes > 1:
                need += block * (experts + 1) * (stored + compute)
                kernel = job.kernel
                need += statistics_bytes(kernel.name, kernel.settings, job.shape, experts + 1)
            if whole_tensor_selection:
                need += job.numel * (2 * stored + 2 * compute + experts)
            worst = max(worst, need)
        return worst


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


def _is_tied(reader: ModelReader) -> bool:
    return find_embedding(reader) is not None and not any(
        n.endswith("lm_head.weight") for n in reader.tensors
    )


class _Planner:
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
        self.requantizing = recipe.schema.out_dtype == "fp8"
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
        if name not in source.tensors and name.endswith("lm_head.weight") and _is_tied(source):
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
        if tensor not in expert.tensors and name.endswith("lm_head.weight") and _is_tied(expert):
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
        """``job`` written in the base's FP8 format where the base stores it so: merged in
        float32, quantized as it is written (``della_cli.quant.requantize``)."""
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


def build_plan(
    recipe: Recipe,
    base: ModelReader | None,
    experts: list[ModelReader],
    max_shard_bytes: int,
    strict: bool = False,
    device: str = "cpu",
) -> Plan:
    """Plan the merge on ``device`` from headers; raise PlanError listing every problem found.
    Under ``strict``, a tensor missing from a model is a problem rather than a warning. Each
    merge job gets the backend and kernel that run it (``della_cli.kernels``)."""
    refuse_quantized([base, *experts])  # before anything is planned from their raw values
    reference, ref_model = (base, BASE) if base is not None else (experts[0], 0)
    alignment = None
    if recipe.aligns_vocabulary:
        limits = {model: _row_limit(reader) for model, reader in _readers(base, experts)}
        alignment = align_vocabulary(recipe, base, experts, limits)
    planner = _Planner(recipe, reference, ref_model, experts, strict, alignment)
    layer_map = None
    if recipe.schema.slices is not None:
        layer_map, jobs = _sliced_jobs(planner, base)
    else:
        ordered = sorted(reference.tensors.values(), key=lambda t: (str(t.path), t.offset))
        jobs = [planner.job_for(t.name, t, Source(ref_model, t.name)) for t in ordered]
        jobs += _untied_lm_head_jobs(planner, {t.name for t in ordered})
    if planner.requantizing:
        problem = fp8_output_problem(reference)
        planner.problems += [problem] if problem else []
        jobs = [planner.requantized(job) for job in jobs]
    _report_architecture(planner, depths=layer_map is None)
    for index, expert in enumerate(experts if layer_map is None else ()):
        if not set(expert.tensors) & set(reference.tensors):
            planner.problems.append(
                f"'{recipe.model_refs[index]}' shares no tensor name with the base; it is "
                "another architecture, and all models must share the base's"
            )
            continue
        extra = sorted(set(expert.tensors) - set(reference.tensors) - {j.name for j in jobs})
        if extra:
            planner.warnings.append(
                f"'{recipe.model_refs[index]}' has {len(extra)} tensor(s) the base lacks "
                f"(first '{extra[0]}'); they are not in the output"
            )
    if planner.problems:
        raise PlanError(planner.problems)
    outputs = [OutputTensor(j.name, j.out_dtype, j.shape) for j in jobs]
    compute = "F64" if recipe.schema.dtype == "float64" else "F32"
    tied = None
    vocab_size = None
    embedding = find_embedding(reference)
    if embedding is not None:
        tied = not any(j.name.endswith("lm_head.weight") for j in jobs)
        rows = next(j.shape[0] for j in jobs if j.name == embedding)
        vocab_size = rows if rows != reference.tensors[embedding].shape[0] else None
    shards, quantization = split_into_shards(outputs, max_shard_bytes), None
    if planner.requantizing:
        shards, quantization = output_shards(reference, jobs, max_shard_bytes)
    warnings = [*recipe.schema.notes, *planner.warnings]  # the recipe's notes first
    if alignment is not None:
        vocab_size = alignment.padded_size
        warnings += [alignment.summary, *alignment.warnings]
    plan = Plan(
        jobs, shards, warnings, compute, tied, vocab_size, alignment, quantization, layer_map
    )
    return assign_kernels(plan, recipe, base, experts, device)


def _readers(base: ModelReader | None, experts: list[ModelReader]):
    return [*([(BASE, base)] if base is not None else []), *enumerate(experts)]


def _row_limit(reader: ModelReader) -> int | None:
    """The rows a model's tokens must lie under: its config's vocab_size, at most the rows of
    its embedding."""
    embedding = find_embedding(reader)
    rows = reader.tensors[embedding].shape[0] if embedding else None
    limits = [v for v in (_vocab_size(reader), rows) if v is not None]
    return min(limits) if limits else None


def _sliced_jobs(planner: _Planner, base: ModelReader | None) -> tuple[LayerMap, list[TensorJob]]:
    """The jobs of a merge by slices, in output order (``layer_map``)."""
    sliced = plan_slices(planner.recipe, base, planner.experts)
    planner.problems += sliced.problems
    first, last = planner.recipe.schema.slices[0], planner.recipe.schema.slices[-1]
    if len(last.sources) > len(first.sources):
        planner.warnings.append(
            f"{last.path}: the final norm and lm_head are merged from its {len(last.sources)} "
            f"sources; mergekit 0.1.5 would take only its first {len(first.sources)} (as many "
            f"as {first.path} has)"
        )

    def job(tensor: SlicedTensor) -> TensorJob:
        model, name = tensor.reference
        reader = base if model == BASE else planner.experts[model]
        if name not in reader.tensors:  # an lm_head the tied reference has as its embedding
            name = find_embedding(reader)
        info = reader.tensors[name]
        made = planner.job_for(tensor.name, info, Source(model, name), tensor.inputs)
        return replace(made, reference_is_base=tensor.reference_is_base)

    return sliced.layer_map, [job(tensor) for tensor in sliced.tensors]


def _report_architecture(planner: _Planner, depths: bool = True) -> None:
    """One problem per model that is not the base's architecture, naming the cause (a width
    in config.json, a different number of layers, unless slices pick the layers) before the
    tensors it shows in."""
    reference = planner.reference
    for index, expert in enumerate(planner.experts):
        if expert is reference:
            continue
        label = planner.recipe.model_refs[index]
        widths = config_differences(reference.config, expert.config)
        stacks = layer_differences(reference.tensors, expert.tensors) if depths else []
        mismatches = planner.mismatched.get(index, [])
        if mismatches:
            planner.problems.append(shape_summary(label, mismatches, widths + stacks))
        elif stacks:
            planner.problems.append(
                f"'{label}' has {', '.join(stacks)} (the base's depth); models of different "
                "depths cannot be merged tensor by tensor"
            )


def _untied_lm_head_jobs(planner: _Planner, reference_names: set[str]) -> list[TensorJob]:
    """A tied reference merged with untied experts: the output gets an lm_head, whose
    reference is the reference model's embedding matrix."""
    if not _is_tied(planner.reference):
        return []
    untied = [e for e in planner.experts if any(n == "lm_head.weight" for n in e.tensors)]
    if not untied or "lm_head.weight" in reference_names:
        return []
    embedding = find_embedding(planner.reference)
    ref = planner.reference.tensors[embedding]
    planner.warnings.append(
        "the base ties its embeddings but an expert has its own lm_head; "
        "the output gets an untied lm_head.weight"
    )
    return [planner.job_for("lm_head.weight", ref, Source(planner.ref_model, embedding))]
