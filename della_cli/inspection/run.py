"""``della inspect``: the statistics of a recipe's task vectors, streamed tensor by tensor.

The recipe and the models are read and checked as ``della merge`` checks them (``api.prepare``,
so errors are the same one line and exit code); then every merged tensor of the plan is read in
blocks of whole rows, as the merge reads it (vocabulary rows cropped or padded the same way),
and summed (``stats.tensor_stats``): a tensor is read once, or three times where a density
below 1 needs its exact top-d cut. Memory holds a few blocks and per-tensor sums, never a whole
tensor (a 1-D tensor is one row, as in the merge).

``linear`` has no base: its models are compared with their mean, entry by entry (δ_t = θ_t − θ̄),
which needs no extra pass since every block holds all the models.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from della_cli.engine import MergeInputs
from della_cli.inspection.arrays import arrays_for
from della_cli.inspection.stats import FOREIGN_NORM, Sparsity, TensorStats, tensor_stats
from della_cli.plan import Source, TensorJob
from della_cli.recipe import Recipe

BLOCK_ELEMENTS = 1 << 20  # entries per model in a block; float64 sums keep a few copies
# Where the recipe gives no density (task_arithmetic, linear) or epsilon or gamma, what the
# statistics assume; epsilon and gamma are narrowed to what the density allows.
DEFAULT_DENSITY = 0.5
DEFAULT_EPSILON = 0.1
DEFAULT_GAMMA = 0.01
DUPLICATE_COSINE = 0.99
_LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class InspectReport:
    """What ``della inspect`` prints (``--json``: this as one object)."""

    recipe: str
    method: str
    device: str
    reference: str  # "base", or "mean" for a merge of the models themselves (linear)
    experts: list[dict]
    block_elements: int
    model: dict = field(default_factory=dict)
    groups: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def group_of(name: str) -> tuple[str, int | None]:
    """A tensor's group as ``della plan`` prints it, and its layer index (None outside layers)."""
    match = _LAYER.search(name)
    return _LAYER.sub(".*.", name), int(match.group(1)) if match else None


def sparsity_for(recipe: Recipe, index: int, name: str) -> tuple[Sparsity, list[str]]:
    """Expert ``index``'s density, epsilon and gamma for tensor ``name``: the recipe's, or the
    defaults above (narrowed to keep d ± ε in (0, 1] and d + γ ≤ 1), named in the list."""
    params = recipe.expert_params(index, name)
    assumed = []
    density = params.density
    if density is None:
        density, assumed = DEFAULT_DENSITY, ["density"]
    epsilon = params.epsilon
    if epsilon is None:
        epsilon = min(DEFAULT_EPSILON, density / 2, 1 - density)
        assumed.append("epsilon")
    gamma = params.gamma
    if gamma is None:
        gamma = min(DEFAULT_GAMMA, 1 - density)
        assumed.append("gamma")
    return Sparsity(density, epsilon, gamma), assumed


def inspect_models(
    recipe: Recipe,
    inputs: MergeInputs,
    jobs: list[TensorJob],
    device: str,
    block_elements: int = BLOCK_ELEMENTS,
) -> InspectReport:
    """The statistics of every merged job, per group, per layer and for the whole model."""
    on_deltas = recipe.method.on_deltas
    refs = recipe.model_refs
    experts = []
    for index, ref in enumerate(refs):
        params, assumed = sparsity_for(recipe, index, "")
        experts.append({"model": ref, **asdict(params), "assumed": assumed})
    reference = "base" if on_deltas else "mean"
    report = InspectReport(
        str(recipe.path), recipe.method.name, device, reference, experts, block_elements
    )
    total = TensorStats.zero(len(refs))
    groups: dict[str, TensorStats] = {}
    cells: dict[tuple[str, int], TensorStats] = {}
    layers: dict[int, TensorStats] = {}
    arrays = arrays_for(device)
    for job in jobs:
        if job.action != "merge":
            continue
        params = [sparsity_for(recipe, i, job.name)[0] for i in range(len(refs))]
        reader = _BlockReader(job, inputs, len(refs), arrays, on_deltas)
        blocks = row_blocks(job.shape, block_elements)
        stats = tensor_stats(reader.read, blocks, job.numel, params, arrays)
        group, layer = group_of(job.name)
        total.add(stats)
        _accumulate(groups, group, stats)
        if layer is not None:
            _accumulate(cells, (group, layer), stats)
            _accumulate(layers, layer, stats)
    report.model = total.metrics()
    for group, stats in groups.items():
        by_layer = [
            {"layer": layer, **cells[(name, layer)].metrics()}
            for name, layer in sorted(cells)  # files list layer 10 before layer 2
            if name == group
        ]
        report.groups.append({"group": group, **stats.metrics(), "layers": by_layer})
    report.layers = [{"layer": layer, **layers[layer].metrics()} for layer in sorted(layers)]
    report.warnings = model_warnings(report)
    return report


def _accumulate(table: dict, key, stats: TensorStats) -> None:
    if key not in table:
        table[key] = TensorStats.zero(len(stats.l1))
    table[key].add(stats)


def row_blocks(shape: tuple[int, ...], block_elements: int) -> list[tuple[int, int]]:
    """Blocks of whole rows of a tensor seen as (shape[0], −1) (a 1-D tensor is one row)."""
    rows = shape[0] if len(shape) > 1 else 1
    row_length = max(1, _numel(shape) // max(rows, 1))
    step = max(1, block_elements // row_length)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class _BlockReader:
    """Rows of one job from every model, fitted to the job's rows as the merge fits them:
    an expert's rows past its own are the reference's (a zero delta), the reference's come
    from its ``fill`` model; an expert without the tensor has a zero delta."""

    def __init__(self, job: TensorJob, inputs: MergeInputs, experts: int, arrays, on_deltas: bool):
        self.job, self.inputs, self.arrays, self.on_deltas = job, inputs, arrays, on_deltas
        self.sources = {source.model: source for source in job.experts}
        self.experts = experts
        self.one_row = len(job.shape) <= 1

    def read(self, start: int, stop: int) -> tuple[Any, list[Any]]:
        job = self.job
        if self.on_deltas:
            reference = self._rows(job.reference, start, stop, self._fill_rows)
            fallback = self._slice_of(reference, start)
        else:  # read only where an expert lacks rows
            fallback = self._reference_rows
        models: list[Any] = []
        for index in range(self.experts):
            source = self.sources.get(index)
            models.append(None if source is None else self._rows(source, start, stop, fallback))
        if not self.on_deltas:  # linear: the models against their mean
            present = [model for model in models if model is not None]
            reference = self.arrays.mean(present)
        return reference, [reference if model is None else model for model in models]

    def _slice_of(self, reference, start: int):
        return lambda first, last: reference[first - start : last - start]

    def _reference_rows(self, first: int, last: int):
        return self._rows(self.job.reference, first, last, self._fill_rows)

    def _fill_rows(self, first: int, last: int):
        fill = self.job.reference.fill
        assert fill is not None  # the plan sets a fill wherever the reference lacks rows
        return self._rows(fill, first, last, self._fill_rows)

    def _load(self, source: Source, start: int, stop: int):
        reader = self.inputs.reader(source.model)
        if self.one_row:
            array = reader.read(source.tensor).reshape(1, -1)
        else:
            array = reader.read_rows(source.tensor, start, stop)
        return self.arrays.float32(array)

    def _rows(self, source: Source, start: int, stop: int, fallback):
        """Rows ``start:stop`` of the job's shape from ``source``; rows (entries, for one row)
        past ``source.rows`` come from ``fallback(first, last)``."""
        if source.rows is None:
            return self._load(source, start, stop)
        if self.one_row:
            entries = self.job.numel
            have = min(source.rows, entries)
            row = self._load(source, 0, 1).reshape(-1)[:have]
            if entries > have:
                row = self.arrays.concatenate([row, fallback(0, 1).reshape(-1)[have:entries]])
            return row.reshape(1, -1)
        have = min(source.rows, stop)
        parts = [self._load(source, start, have)] if start < have else []
        if stop > have:
            parts.append(fallback(max(start, have), stop))
        return self.arrays.concatenate(parts)


def model_warnings(report: InspectReport) -> list[str]:
    """Experts that do not share the base, and pairs of near duplicates, over the whole model."""
    refs = [expert["model"] for expert in report.experts]
    against = "the base's" if report.reference == "base" else "the models' mean's"
    warnings = []
    model = report.model
    for ref, norm, share in zip(refs, model["relative_norm"], model["foreign_share"], strict=True):
        if share is not None and share > 0.5:
            overall = f"{norm:.2f}" if norm is not None else "unbounded: the reference is zero"
            warnings.append(
                f"'{ref}' does not look fine-tuned from the same weights: in tensors holding "
                f"{100 * share:.0f}% of the entries its task vector's norm is ≥ {FOREIGN_NORM} of "
                f"{against} ({overall} over the whole model); check that it shares the base"
            )
    cosine = report.model["cosine"]
    for s in range(len(refs)):
        for t in range(s + 1, len(refs)):
            if cosine[s][t] is not None and cosine[s][t] >= DUPLICATE_COSINE:
                warnings.append(
                    f"'{refs[s]}' and '{refs[t]}' are near duplicates: the cosine of their task "
                    f"vectors is {cosine[s][t]:.4f} (≥ {DUPLICATE_COSINE}); merging both counts "
                    "the same change twice"
                )
    return warnings


def inspect_recipe(
    recipe_path: Path, options, block_elements: int = BLOCK_ELEMENTS
) -> InspectReport:
    """Check ``recipe_path`` and its models as ``della merge`` does, then inspect them."""
    from della_cli.preflight import architecture_warnings
    from della_cli.session import prepare, select_device

    recipe, inputs, plan = prepare(recipe_path, options)
    try:
        device = select_device(options.device)
        report = inspect_models(recipe, inputs, plan.jobs, device, block_elements)
    finally:
        for reader in [inputs.base, *inputs.experts]:
            if reader is not None:
                reader.close()
    report.warnings = [*architecture_warnings(inputs), *plan.warnings, *report.warnings]
    return report
