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
from della_cli.methods import merge_tensor
from della_cli.methods.randomness import derive_key, uniform_from_key
from della_cli.plan import BASE, Plan, Source, TensorJob
from della_cli.recipe import Recipe

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


def fit_rows(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Crop extra vocabulary rows, or pad missing ones with the reference's rows (zero delta)."""
    rows = reference.shape[0]
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, reference[tensor.shape[0] :]], dim=0)


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
    ):
        self.recipe = recipe
        self.plan = plan
        self.inputs = inputs
        self.device = device
        self.compute_dtype = TORCH_DTYPES[plan.compute_dtype]
        self.on_progress = on_progress or (lambda job: None)
        self.on_warning = on_warning or (lambda message: None)

    def run(self, writer: ShardWriter) -> None:
        for job in self.plan.jobs:
            writer.write(job.name, self.compute(job))
            self.on_progress(job)

    def load(self, source: Source, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self.inputs.reader(source.model).read(source.tensor)
        return tensor.to(self.device, dtype=dtype, non_blocking=True)

    def compute(self, job: TensorJob) -> torch.Tensor:
        """The output tensor of one job, on the CPU in its output dtype."""
        out_dtype = TORCH_DTYPES[job.out_dtype]
        if job.action == "copy":
            self.warn_if_experts_differ(job)
            return self.inputs.reader(job.reference.model).read(job.reference.tensor).to(out_dtype)
        reference = self.load(job.reference, self.compute_dtype)
        models = [self.load_expert(source, reference) for source in job.experts]
        recipe_indices = [source.model for source in job.experts]
        merged = merge_tensor(
            self.recipe.method,
            reference,
            models,
            [self.recipe.expert_params(i, job.name) for i in recipe_indices],
            self.recipe.global_params(),
            uniform=self.uniform_draws(job, recipe_indices),
        )
        return merged.to(out_dtype).cpu()

    def load_expert(self, source: Source, reference: torch.Tensor) -> torch.Tensor:
        tensor = self.load(source, self.compute_dtype)
        return fit_rows(tensor, reference) if source.rows is not None else tensor

    def uniform_draws(self, job: TensorJob, recipe_indices: Sequence[int]):
        """Draws for the expert at each position, keyed by its index in the recipe."""
        if not self.recipe.method.is_random:
            return None
        seed = self.recipe.seed

        def draw(position: int) -> torch.Tensor:
            key = derive_key(seed, job.name, recipe_indices[position])
            return uniform_from_key(key, job.shape, device=self.device)

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
