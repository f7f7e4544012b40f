"""The data a merge plan is made of: where each input comes from (``Source``), one output
tensor's job (``TensorJob``), and the whole plan with the memory its engine needs (``Plan``).

``della_cli.plan`` builds them from safetensors headers; the engine, parts and reports read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from della_cli.io.dtypes import CONFIG_NAMES, itemsize
from della_cli.io.writer import OutputTensor
from della_cli.kernels import Kernel
from della_cli.layer_map import LayerMap
from della_cli.methods.streamed import statistics_bytes
from della_cli.quant.requantize import Requantize
from della_cli.vocab_rows import VocabularyAlignment

BASE = -1  # model index of the base model in a Source


@dataclass(frozen=True)
class Source:
    """Where one input of a job comes from: a model (BASE or a recipe index) and a tensor name."""

    model: int
    tensor: str
    rows: int | None = None  # set when the rows must be cropped or padded to the job's shape
    fill: Source | None = None  # a reference's rows past ``rows`` come from here
    aligned: bool = False  # rows re-indexed to the output vocabulary (``Plan.vocabulary``)
    # quantized rows read as stored and dequantized on the merge's device (``quant.placement``)
    on_device: bool = False


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
    requantize: Requantize | None = None  # in the base's format (out_dtype: fp8, mxfp4)
    reference_is_base: bool = False  # a slice's own base_model, one of the recipe's models
    device: int = 0  # which of ``Plan.devices`` merges it (``della_cli.device_plan``)

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
    # The devices the jobs are spread over (``della_cli.device_plan``), and the block size
    # the plan chose to fit their free memory (None: the engine's default for the device).
    devices: tuple[str, ...] = ("cpu",)
    block_elements: int | None = None
    # The most bytes of one tensor's inputs kept in memory between a method's statistics
    # passes and its merge pass (``engine.held``; None: ``READ_ONCE_BYTES``).
    read_once_bytes: int | None = None

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
