"""The one loop over tensors: read inputs, merge on the device, hand the result to the writer.

Only the current job's tensors are alive at any time, so peak memory is bounded by the largest
tensor (see ``Plan.peak_tensor_bytes``), never by the model's size. The engine never prints:
progress and warnings go to callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from della_cli.io.dtypes import TORCH_DTYPES
from della_cli.io.reader import ModelReader
from della_cli.io.writer import ShardWriter
from della_cli.methods import Rescale, Sparsifier, merge_tensor
from della_cli.methods.randomness import derive_key, uniform_from_key
from della_cli.methods.sparsify import as_rows, magnitude_keep_mask, outlier_keep_mask
from della_cli.plan import BASE, Plan, Source, TensorJob
from della_cli.recipe import Recipe

# 4M elements: each float32 temporary of a block is 16 MiB, small next to any real model.
DEFAULT_BLOCK_ELEMENTS = 1 << 22
ProgressCallback = Callable[[TensorJob], None]
WarningCallback = Callable[[str], None]


@dataclass
class MergeInputs:
    """The opened models of a merge: the base (if any) and the recipe's models, in order."""

    base: ModelReader | None
    experts: list[ModelReader]

    def reader(self, model: int) -> ModelReader:
        if model == BASE:
            assert self.base is not None  # the plan only names BASE when there is one
            return self.base
        return self.experts[model]


class MergeEngine:
    """Runs a plan: one tensor at a time, on ``device``, in plan order."""

    def __init__(
        self,
        recipe: Recipe,
        plan: Plan,
        inputs: MergeInputs,
        device: torch.device,
        on_progress: ProgressCallback | None = None,
        on_warning: WarningCallback | None = None,
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ):
        self.recipe = recipe
        self.plan = plan
        self.inputs = inputs
        self.device = device
        self.compute_dtype = TORCH_DTYPES[plan.compute_dtype]
        self.on_progress = on_progress or (lambda job: None)
        self.on_warning = on_warning or (lambda message: None)
        self.block_elements = block_elements

    def run(self, writer: ShardWriter, start: int = 0) -> None:
        """Compute and write the jobs from position ``start`` on (later ones on resume)."""
        for job in self.plan.jobs[start:]:
            writer.write(job.name, self.compute(job))
            self.on_progress(job)

    def read(self, source: Source) -> torch.Tensor:
        """One input tensor, as stored, on the CPU."""
        return self.inputs.reader(source.model).read(source.tensor)

    def compute(self, job: TensorJob) -> torch.Tensor:
        """The output tensor of one job, on the CPU in its output dtype."""
        out_dtype = TORCH_DTYPES[job.out_dtype]
        if job.action == "copy":
            self.warn_if_experts_differ(job)
            return self.read(job.reference).to(out_dtype)
        reference = self.read(job.reference)
        models = [self.read(source) for source in job.experts]
        output = torch.empty(job.shape, dtype=out_dtype)
        out_rows = as_rows(output)
        masks = self.global_keep_masks(job, reference, models)
        for start, stop in self.row_blocks(job):
            merged = self.merge_rows(job, reference, models, masks, start, stop)
            out_rows[start:stop] = merged.to(out_dtype)
        return output

    def row_blocks(self, job: TensorJob) -> list[tuple[int, int]]:
        """Blocks of whole rows to merge at a time, so temporaries stay small.

        Every step of the pipeline is element-wise or row-wise once whole-tensor selections
        (TIES, breadcrumbs) are made up front, so merging by blocks gives the same bytes as
        merging the whole tensor; only the L1 rescale, a whole-tensor norm, needs it whole.
        """
        rows = as_rows(torch.empty(job.shape, device="meta"))
        total_rows, row_length = rows.shape
        whole = self.recipe.global_params().rescale is Rescale.L1 and self.recipe.method.is_random
        if whole or total_rows * row_length <= self.block_elements:
            return [(0, total_rows)]
        step = max(1, self.block_elements // max(row_length, 1))
        return [(r, min(r + step, total_rows)) for r in range(0, total_rows, step)]

    def rows(self, tensor: torch.Tensor, start: int, stop: int, like: torch.Tensor | None = None):
        """Rows ``start:stop`` on the device in the compute dtype; rows an expert lacks (a
        smaller vocabulary) are taken from ``like``, the reference, so their delta is zero."""
        if like is not None and tensor.dim() == 1 and tensor.shape != like.shape:
            # A 1-D vocabulary tensor (an lm_head bias) is a single row: fit its entries.
            kept = min(tensor.shape[0], like.shape[0])
            parts = (tensor[:kept], like[kept:])
            tensor = torch.cat([part.to(self.compute_dtype) for part in parts])
        tensor_rows = as_rows(tensor)
        have = tensor_rows.shape[0]
        if like is not None and stop > have:
            parts = [tensor_rows[start:have]] if start < have else []
            parts.append(as_rows(like)[max(start, have) : stop])
            block = torch.cat([p.to(self.compute_dtype) for p in parts])
        else:
            block = tensor_rows[start:stop]
        return block.to(self.device, dtype=self.compute_dtype, non_blocking=True)

    def merge_rows(self, job, reference, models, masks, start: int, stop: int) -> torch.Tensor:
        base = self.rows(reference, start, stop)
        blocks = [
            self.rows(model, start, stop, like=reference if source.rows else None)
            for model, source in zip(models, job.experts, strict=True)
        ]
        recipe_indices = [source.model for source in job.experts]
        mask_blocks = None if masks is None else [as_rows(m)[start:stop] for m in masks]
        merged = merge_tensor(
            self.recipe.method,
            base,
            blocks,
            [self.recipe.expert_params(i, job.name) for i in recipe_indices],
            self.recipe.global_params(),
            uniform=self.uniform_draws(job, recipe_indices, base.shape, start * base.shape[1]),
            keep_masks=mask_blocks,
        )
        return merged.cpu()

    def global_keep_masks(self, job, reference, models) -> list[torch.Tensor] | None:
        """Whole-tensor selections (TIES trim, breadcrumbs), made once before blocking."""
        sparsifier = self.recipe.method.sparsifier
        if sparsifier not in (Sparsifier.MAGNITUDE, Sparsifier.MAGNITUDE_OUTLIERS):
            return None
        masks = []
        total_rows = as_rows(reference).shape[0]
        for model, source in zip(models, job.experts, strict=True):
            params = self.recipe.expert_params(source.model, job.name)
            like = reference if source.rows else None
            delta = self.rows(model, 0, total_rows, like) - self.rows(reference, 0, total_rows)
            delta = delta.reshape(job.shape)
            if params.density is None or params.density >= 1:
                masks.append(torch.ones_like(delta, dtype=torch.bool))
            elif sparsifier is Sparsifier.MAGNITUDE:
                masks.append(magnitude_keep_mask(delta, params.density))
            else:
                masks.append(outlier_keep_mask(delta, params.density, params.gamma or 0.0))
            del delta
        return masks

    def uniform_draws(self, job: TensorJob, recipe_indices: Sequence[int], shape, start: int):
        """Draws for the expert at each position, keyed by its index in the recipe and by the
        flat index of the block's first element, so blocks draw what the whole tensor would."""
        if not self.recipe.method.is_random:
            return None
        seed = self.recipe.seed

        def draw(position: int) -> torch.Tensor:
            key = derive_key(seed, job.name, recipe_indices[position])
            return uniform_from_key(key, shape, start=start, device=self.device)

        return draw

    def warn_if_experts_differ(self, job: TensorJob) -> None:
        """Non-floating tensors (buffers, masks) are copied from the reference; say so if an
        expert disagrees, since that usually means a different architecture setting."""
        reference = None
        for index, expert in enumerate(self.inputs.experts):
            info = expert.tensors.get(job.name)
            if info is None or info.is_floating or index == job.reference.model:
                continue
            if reference is None:
                reference = self.inputs.reader(job.reference.model).read(job.reference.tensor)
            other = expert.read(job.name)
            if other.shape != reference.shape or not torch.equal(other, reference):
                self.on_warning(
                    f"'{self.recipe.model_refs[index]}' differs from the base in "
                    f"non-float tensor '{job.name}'; the base's is kept"
                )
