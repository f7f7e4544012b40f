"""From safetensors headers alone, the list of tensor jobs of a merge.

Every presence, shape and dtype problem surfaces here, all at once, before any tensor data is
read. Output tensors follow the reference model (the base, or the first model of a ``linear``
merge without one) in its file order, so reads are sequential. Merging is by tensor name with no
per-architecture table: only vocabulary rows and tied embeddings get special handling, and they
are recognised by shape and by name patterns every Hugging Face causal LM shares.
"""

from __future__ import annotations

from della_cli.architecture import config_differences, layer_differences, shape_summary
from della_cli.device_plan import spread_jobs
from della_cli.errors import PlanError
from della_cli.io.reader import ModelReader
from della_cli.io.writer import OutputTensor, split_into_shards
from della_cli.kernels import assign_kernels
from della_cli.plan_types import BASE, Plan, Source, TensorJob
from della_cli.planner import Planner, find_embedding, is_tied, row_limit
from della_cli.quant.placement import place_dequantization
from della_cli.quant.requantize import output_problem, output_shards
from della_cli.quantized import refuse_quantized
from della_cli.recipe import Recipe
from della_cli.sliced_jobs import sliced_jobs
from della_cli.vocab_rows import align_vocabulary

# Re-exported: the engine, parts and reports import the plan's types from here.
__all__ = ["BASE", "Plan", "Source", "TensorJob", "build_plan", "find_embedding"]


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
    merge job gets the backend and kernel that run it (``della_cli.kernels``) and, where
    ``device`` lists several (``cuda:0,cuda:1``), the device that merges it
    (``della_cli.device_plan``)."""
    refuse_quantized([base, *experts])  # before anything is planned from their raw values
    reference, ref_model = (base, BASE) if base is not None else (experts[0], 0)
    alignment = None
    if recipe.aligns_vocabulary:
        limits = {model: row_limit(reader) for model, reader in _readers(base, experts)}
        alignment = align_vocabulary(recipe, base, experts, limits)
    planner = Planner(recipe, reference, ref_model, experts, strict, alignment)
    layer_map = None
    if recipe.schema.slices is not None:
        layer_map, jobs = sliced_jobs(planner, base)
    else:
        ordered = sorted(reference.tensors.values(), key=lambda t: (str(t.path), t.offset))
        jobs = [planner.job_for(t.name, t, Source(ref_model, t.name)) for t in ordered]
        jobs += _untied_lm_head_jobs(planner, {t.name for t in ordered})
    if planner.requantizing:
        problem = output_problem(reference, recipe.schema.out_dtype)
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
    plan = assign_kernels(plan, recipe, base, experts, device)
    plan = place_dequantization(plan, base, experts, str(device).startswith("cuda"))
    return spread_jobs(plan, str(device).split(","))


def _readers(base: ModelReader | None, experts: list[ModelReader]):
    return [*([(BASE, base)] if base is not None else []), *enumerate(experts)]


def _report_architecture(planner: Planner, depths: bool = True) -> None:
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


def _untied_lm_head_jobs(planner: Planner, reference_names: set[str]) -> list[TensorJob]:
    """A tied reference merged with untied experts: the output gets an lm_head, whose
    reference is the reference model's embedding matrix."""
    if not is_tied(planner.reference):
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
