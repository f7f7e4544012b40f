"""Which backend and kernel runs each tensor job, and with which settled parameters.

Decided once, at plan time, from the recipe, the headers and the device (docs/BACKENDS.md):

- ``cpu/streamed_sum``: a weighted sum (task arithmetic, linear; nothing sparsified or
  elected) on the CPU, whose chunks are read straight from the input files, a piece at a time,
  into the numba weighted-sum kernel;
- ``cpu/chunked_sum``: the same kernel on chunks read into buffers (no positioned reads on this
  platform, or the streamed reads turned off);
- ``cpu/weighted_sum``: the same kernel in the pipeline's blocks (inputs fitted to another
  vocabulary, or rows that are not in the files as merged);
- ``cpu/block``: the numba kernel that merges a block of rows in one pass (every other method;
  TIES and breadcrumbs select over the whole tensor first, also in numba);
- ``torch/merge``: the torch backend, the reference: CUDA, float16 or float64 inputs, inputs of
  mixed dtypes (but for weighted sums), the L1 rescale, MAGPRUNE rows of one entry, or numba
  not installed;
- ``cpu/<method>``: sce, ram, ramplus_tl and arcee_fusion in numba (``backends.cpu.catalog``),
  in the passes of their torch kernels, with the same bytes; ``cpu/nearswap``, one compiled
  pass entry by entry (``backends.cpu.nearswap``; float16 too); ``cpu/passthrough``: a copy of
  the input as stored (no scale, the same dtype), which imports neither numba nor torch;
- ``torch/<method>``: a method of the catalog (slerp, passthrough, ...) on the torch backend,
  in the passes over the row blocks its statistics need (``methods.streamed``);
- ``cpu/<method>``: slerp, nuslerp, multislerp, karcher and model_stock on the CPU backend's
  numba kernels, in the same passes (``backends.cpu.spherical_methods``), where the inputs
  are bfloat16 or float32 of one dtype and the vectors are the tensor's rows (not nuslerp's
  columns).

Each merge job also gets its experts' parameters settled here: weight, how the task vector is
sparsified, the density and window, and the key of its random draws. The engine runs what the
plan says and asks nothing again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from della_cli.io import streamed_sum
from della_cli.methods import ExpertParams, GlobalParams, Rescale, Sparsifier
from della_cli.methods.catalog import BasePolicy
from della_cli.methods.counts import magnitude_rank_window
from della_cli.methods.randomness import derive_key
from della_cli.methods.streamed import BASE_INPUT, keys_kept
from della_cli.methods.streamed import passes as method_passes

if TYPE_CHECKING:
    from della_cli.io.reader import ModelReader
    from della_cli.plan import Plan, TensorJob
    from della_cli.recipe import Recipe

BASE = -1  # as plan.BASE
CPU_DTYPES = ("BF16", "F32")  # what the CPU kernels read and write
ENTRYWISE_DTYPES = ("BF16", "F16", "F32")  # and what ``cpu/nearswap`` reads and writes
WHOLE_TENSOR_SPARSIFIERS = (Sparsifier.MAGNITUDE, Sparsifier.MAGNITUDE_OUTLIERS)

# The catalog methods the CPU backend runs that select (``backends.cpu.catalog``).
CPU_SELECTING_METHODS = ("sce", "ram", "ramplus_tl", "arcee_fusion")
# The catalog methods the CPU backend runs entry by entry (``backends.cpu.nearswap``).
CPU_ENTRYWISE_METHODS = ("nearswap",)
# The kernels of the generalized pipeline; any other name is a catalog method's.
PIPELINE_KERNELS = ("merge", "block", "weighted_sum", "streamed_sum", "chunked_sum")

# The catalog methods the CPU backend runs by coefficients (``backends.cpu.spherical_methods``,
# not imported to plan).
CPU_SPHERICAL_METHODS = ("slerp", "nuslerp", "multislerp", "karcher", "model_stock")

# How an expert's task vector is sparsified.
KEEP, RANDOM, MAGPRUNE, WINDOW = "keep", "random", "magprune", "window"


@dataclass(frozen=True)
class ExpertStep:
    """One expert's settled part in one job."""

    model: int  # index in the recipe
    params: ExpertParams  # as the recipe resolves them for this tensor
    sparsify: str = KEEP
    window: tuple[int, int] | None = None  # WINDOW: kept stable magnitude ranks [low, high)
    key: int = 0  # RANDOM, MAGPRUNE: the key of its draws (``randomness.derive_key``)


@dataclass(frozen=True)
class Kernel:
    """What runs a merge job: ``backend`` ("cpu" or "torch") and ``name``."""

    backend: str
    name: str
    experts: tuple[ExpertStep, ...]
    # The merge-wide parameters for this tensor (gradients and filters may vary them).
    shared: GlobalParams
    passes: int = 1  # over the tensor's row blocks: statistics passes, then the merge
    values: tuple[tuple[str, object], ...] = ()  # a catalog method's shared parameters

    @property
    def label(self) -> str:
        suffix = f", {self.passes} passes" if self.passes > 1 else ""
        return f"{self.backend}/{self.name}{suffix}"

    @property
    def streamed(self) -> bool:
        """Whether a catalog method runs this job (``methods.streamed``)."""
        return self.name not in PIPELINE_KERNELS

    @property
    def compiled(self) -> bool:
        """Whether numba compiles what runs this job: every CPU kernel (the block kernel, the
        weighted sums, ``cpu/<method>``) but ``cpu/passthrough``, a copy."""
        return self.backend == "cpu" and self.name != "passthrough"

    @property
    def settings(self) -> dict[str, object]:
        return dict(self.values)

    @property
    def in_chunks(self) -> bool:
        """Whether the job runs in chunks that one thread reads, merges and writes."""
        return self.name in ("streamed_sum", "chunked_sum")


def cpu_backend_installed() -> bool:
    """Whether the CPU backend can run (numba is installed), without importing numba."""
    return importlib.util.find_spec("numba") is not None


def assign_kernels(
    plan: Plan,
    recipe: Recipe,
    base: ModelReader | None,
    experts: list[ModelReader],
    device: str = "cpu",
    backend: str | None = None,
    stream_reads: bool = True,
) -> Plan:
    """``plan`` with a kernel for each merge job. ``backend``: "torch" or "cpu" to prefer one
    (a job the CPU backend cannot take still gets torch); ``stream_reads``: whether weighted
    sums may be read by the streamed reader (off to compare with the buffered reads)."""
    chooser = _Chooser(recipe, base, experts, str(device), backend, stream_reads)
    jobs = [chooser.assign(job) for job in plan.jobs]
    return dataclasses.replace(plan, jobs=jobs)


class _Chooser:
    def __init__(self, recipe, base, experts, device, backend, stream_reads):
        self.recipe = recipe
        self.readers = {BASE: base, **dict(enumerate(experts))}
        cpu = device == "cpu" and backend != "torch"
        self.cpu = cpu
        self.numba = cpu and cpu_backend_installed()
        self.stream_reads = stream_reads and streamed_sum.AVAILABLE

    def assign(self, job: TensorJob) -> TensorJob:
        if job.action != "merge":
            return job
        steps = tuple(self.step(job, source.model) for source in job.experts)
        method = self.recipe.method
        if method.catalog is not None:
            values = self.recipe.method_values(job.name)
            if method.catalog.contract.base is BasePolicy.IGNORED:
                schema = self.recipe.schema
                listed = schema.base_model in self.recipe.model_refs
                values[BASE_INPUT] = job.has_base and not listed
            compute = "F64" if self.recipe.schema.dtype == "float64" else "F32"
            shared = self.recipe.global_params(job.name)
            on_cpu = self.catalog_on_cpu(job, method.name, values, compute, steps)
            backend = "cpu" if on_cpu else "torch"
            kept = on_cpu and keys_kept(method.name, job.numel)
            passes = method_passes(method.name, values, len(steps), compute, kept)
            kernel = Kernel(backend, method.name, steps, shared, passes, tuple(values.items()))
            return dataclasses.replace(job, kernel=kernel)
        shared = self.recipe.global_params(job.name)
        name = self.cpu_kernel(job, steps, shared)
        backend = "torch" if name is None else "cpu"
        return dataclasses.replace(job, kernel=Kernel(backend, name or "merge", steps, shared))

    def step(self, job: TensorJob, model: int) -> ExpertStep:
        params = self.recipe.expert_params(model, job.name)
        sparsifier = self.recipe.method.sparsifier
        if sparsifier is Sparsifier.NONE or params.density is None or params.density >= 1.0:
            return ExpertStep(model, params)  # d = 1 keeps everything: no rescale, no draws
        if sparsifier in WHOLE_TENSOR_SPARSIFIERS:
            gamma = None if sparsifier is Sparsifier.MAGNITUDE else (params.gamma or 0.0)
            window = magnitude_rank_window(job.numel, params.density, gamma)
            return ExpertStep(model, params, WINDOW, window=window)
        mode = MAGPRUNE if sparsifier is Sparsifier.MAGPRUNE else RANDOM
        return ExpertStep(model, params, mode, key=derive_key(self.recipe.seed, job.name, model))

    def loaded_dtypes(self, job: TensorJob) -> list[str | None]:
        """The dtype of each input's rows as the engine loads them (None: not known here):
        as stored, except an expert fitted to another vocabulary, which arrives in the
        compute dtype, and a reference filled from another model of another dtype; rows
        re-indexed to a built tokenizer arrive in the compute dtype too."""
        dtypes = []
        for index, source in enumerate([job.reference, *job.experts]):
            stored = self.readers[source.model].tensors[source.tensor].dtype
            if source.aligned:
                stored = "F32"  # re-indexed rows are built in the compute dtype
            elif self.readers[source.model].computes(source.tensor):
                stored = "F32"  # a LoRA adapter merged in (``io.lora``): computed in float32
            elif source.rows is not None and index > 0:
                stored = "F32"  # the compute dtype (the CPU kernels need float32 math)
            elif source.rows is not None and source.fill is not None:
                fill = self.readers[source.fill.model].tensors[source.fill.tensor].dtype
                stored = stored if fill == stored else None
            dtypes.append(stored)
        return dtypes

    def catalog_on_cpu(
        self,
        job: TensorJob,
        method: str,
        values: dict,
        compute: str,
        steps: tuple[ExpertStep, ...],
    ) -> bool:
        """Whether the CPU backend runs this job of a catalog method: a passthrough without a
        scale into its own dtype (a copy: no numba, no torch); else one of its methods, numba,
        float32 math, inputs of one CPU dtype and an output it writes (float16 too for
        nearswap, ``ENTRYWISE_DTYPES``), and, for the spherical ones, vectors that are the
        tensor's rows (nuslerp per column, and per-row methods on tensors of more than two
        dimensions, whose rows are their last dimension, stay on torch)."""
        inputs = self.loaded_dtypes(job)
        if method == "passthrough":
            unscaled = steps[0].params.scale is None
            return self.cpu and unscaled and inputs[-1] == job.out_dtype
        if not self.numba or compute != "F32":
            return False
        if method not in (*CPU_SELECTING_METHODS, *CPU_ENTRYWISE_METHODS, *CPU_SPHERICAL_METHODS):
            return False
        dtypes = [*inputs, job.out_dtype]
        readable = ENTRYWISE_DTYPES if method in CPU_ENTRYWISE_METHODS else CPU_DTYPES
        if not all(dtype in readable for dtype in dtypes) or len(set(inputs)) != 1:
            return False
        if method == "nuslerp" and not values["nuslerp_flatten"]:
            return not values["nuslerp_row_wise"] and len(job.shape) <= 2
        return not (method == "model_stock" and values["filter_wise"] and len(job.shape) > 2)

    def cpu_kernel(
        self, job: TensorJob, steps: tuple[ExpertStep, ...], shared: GlobalParams
    ) -> str | None:
        """The CPU kernel that merges ``job``, or None where only torch does."""
        if not self.numba:
            return None
        dtypes = [*self.loaded_dtypes(job), job.out_dtype]
        cpu_dtypes = all(dtype in CPU_DTYPES for dtype in dtypes)
        # the CPU kernels compute in float32: a float64 recipe goes to torch
        if not cpu_dtypes or self.recipe.schema.dtype == "float64":
            return None
        method = self.recipe.method
        summing = not method.sign_consensus and all(step.sparsify == KEEP for step in steps)
        if summing:
            sources = [job.reference, *job.experts]
            fitted = any(s.rows is not None or s.aligned for s in sources)
            if fitted or not all(self.readers[s.model].has_row_spans(s.tensor) for s in sources):
                return "weighted_sum"  # in the pipeline's blocks: rows not as in a file
            return "streamed_sum" if self.stream_reads else "chunked_sum"
        if len(set(dtypes[:-1])) != 1:
            return None
        if shared.rescale not in (Rescale.KEEP_PROB, Rescale.NONE):
            return None
        row_length = math.prod(job.shape[1:]) if len(job.shape) > 1 else job.numel
        if any(step.sparsify == MAGPRUNE for step in steps) and row_length <= 1:
            return None  # a row of one entry has q = 1/2, which the torch backend computes
        return "block"
