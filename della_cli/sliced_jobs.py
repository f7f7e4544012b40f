"""The jobs of a merge by slices: each output tensor of ``della_cli.layer_map``'s plan, made a
tensor job by the planner from the model and tensor it is taken from."""

from __future__ import annotations

from dataclasses import replace

from della_cli.io.reader import ModelReader
from della_cli.layer_map import LayerMap, SlicedTensor, plan_slices
from della_cli.plan_types import BASE, Source, TensorJob
from della_cli.planner import Planner, find_embedding


def sliced_jobs(planner: Planner, base: ModelReader | None) -> tuple[LayerMap, list[TensorJob]]:
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
