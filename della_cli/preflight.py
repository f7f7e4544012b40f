"""Plan before download: what a merge will do and need, from headers alone, and whether it fits.

Reads only configs, indexes and safetensors headers (those of Hub models through range
requests, downloading no shard), then reports per group of tensors what happens to them
(merged, copied from the base, vocabulary rows cropped or padded), every problem at once, the
bytes still to download, the peak working memory on the chosen device, the output size and the
free disk where the output and the Hub cache go. A merge that cannot fit is refused here, before
any download or write (``della plan``, ``della merge --dry-run``, and every ``della merge``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from della_cli.device_plan import device_loads, fit_device_blocks
from della_cli.errors import PlanError
from della_cli.hub import cache_dir
from della_cli.io.lora import LoraModelReader, input_folders
from della_cli.plan import Plan, TensorJob
from della_cli.plan_parameters import group_parameters
from della_cli.plan_report import PlanReport
from della_cli.session import MergeSession, merge_fingerprint_of
from della_cli.sizes import human_size

_LAYER_INDEX = re.compile(r"\.\d+\.")


def plan_merge(recipe_path, out: Path | None, options) -> PlanReport:
    """Plan the merge of ``recipe_path`` (a file, or a recipe already read) into ``out``
    (None: only the plan, disk checked in the working directory) without downloading or
    writing anything."""
    session = MergeSession.open(recipe_path, options)
    try:
        report, _ = assess(session, out)
    finally:
        session.close()
    return report


def assess(session: MergeSession, out: Path | None) -> tuple[PlanReport, Plan | None]:
    """The plan report of the session's recipe over its models (opened from headers), and
    the plan itself (None when the tensors cannot be merged), which the session keeps."""
    from della_cli.engine import WHOLE_TENSOR_SPARSIFIERS, block_elements_for
    from della_cli.engine.held import budget_of, held_jobs, held_peak_bytes
    from della_cli.io.output import check_destination

    recipe, inputs, options, device = (
        session.recipe,
        session.inputs,
        session.options,
        session.device,
    )
    readers = [reader for reader in [inputs.base, *inputs.experts] if reader]
    if out is not None:
        folders = [folder for reader in readers for folder in input_folders(reader)]
        check_destination(out, options.overwrite, folders, recipe.path)
    report = PlanReport(recipe.method.name, device, dict(inputs.pins))
    report.adapters = {
        reader.label: reader.adapter.summary()
        for reader in readers
        if isinstance(reader, LoraModelReader)
    }
    report.download_bytes = inputs.download_bytes
    report.warnings = architecture_warnings(inputs)
    try:
        plan = session.build_plan()
    except PlanError as error:
        report.problems = list(error.problems)
        return report, None
    whole = recipe.method.sparsifier in WHOLE_TENSOR_SPARSIFIERS
    block_elements = block_elements_for(device)
    _describe_plan(report, plan, recipe.model_refs, _read_notes(plan, inputs, block_elements))
    if plan.layer_map is not None:
        report.layers = {"count": plan.layer_map.layers, "map": plan.layer_map.description}
    if recipe.varies_by_tensor:
        _describe_parameters(report, plan, recipe)
    if any(name.startswith("cuda") for name in plan.devices):
        # The host holds the read-ahead and output blocks; each device its blocks' working
        # set, which sets the block size (``device_plan.fit_device_blocks``).
        block_elements, figures, device_problems = fit_device_blocks(
            plan, block_elements, whole, lambda name: available_memory(name)
        )
        plan.block_elements = block_elements
        device = "cpu"  # the host's memory, below
    else:
        figures, device_problems = [], []
    report.devices = device_report(plan, figures, block_elements)
    report.working_memory_bytes = plan.working_memory_bytes(block_elements, whole)
    budget = budget_of(plan.read_once_bytes, plan.jobs, inputs, block_elements)
    several, held = held_jobs(plan.jobs, inputs, block_elements, budget)
    report.working_memory_bytes += held_peak_bytes(held, inputs)
    if several:
        report.read_once = {"budget_bytes": budget, "tensors": len(held), "of": len(several)}
    report.available_memory_bytes = available_memory(device)
    to_write = plan.output_bytes
    if out is not None and options.resume:
        to_write -= resumable_bytes(out, recipe, plan, inputs)
    report.disk = disk_needs(out or Path.cwd(), to_write, report.download_bytes)
    report.problems = device_problems + fit_problems(report)
    return report, plan


def device_report(plan: Plan, figures: list[dict], block_elements: int) -> list[dict]:
    """Per device of a merge on CUDA or on several devices: the tensors it merges and their
    bytes, and on CUDA the memory its blocks need and the memory it has free."""
    if len(plan.devices) == 1 and not figures:
        return []
    needs = {figure["device"]: figure for figure in figures}
    entries = device_loads(plan)
    for entry in entries:
        entry["block_elements"] = block_elements
        entry.update(needs.get(entry["device"], {}))
    return entries


def resumable_bytes(out: Path, recipe, plan: Plan, inputs) -> int:
    """The bytes of the shards a resumed merge will keep: those its journal records for this
    very merge that are on disk at their planned size (verified again, by digest, before they
    are kept). Only della's own partial folder counts; whatever the answer, nothing is written."""
    from della_cli.io.journal import Journal
    from della_cli.io.output import partial_folder
    from della_cli.io.writer import SHARD_METADATA, encode_header, shard_file_names

    staging = partial_folder(out)
    journal = Journal.load(staging) if staging else None
    if journal is None or journal.fingerprint != merge_fingerprint_of(recipe, plan, inputs):
        return 0
    credit = 0
    for name, shard in zip(shard_file_names(len(plan.shards)), plan.shards, strict=True):
        size = len(encode_header(shard, SHARD_METADATA)) + sum(t.nbytes for t in shard)
        path = staging / name
        if name not in journal.shards or not path.is_file() or path.lstat().st_size != size:
            break
        credit += size - len(encode_header(shard, SHARD_METADATA))
    return credit


def architecture_warnings(inputs) -> list[str]:
    """Models whose config names another model type or architecture than the reference's:
    their tensors may still line up (the plan decides), but the user should know."""
    reference = inputs.base or inputs.experts[0]

    def kind(reader) -> tuple[str | None, str]:
        config = reader.config or {}
        return config.get("model_type"), ", ".join(config.get("architectures") or ["?"])

    warnings = []
    for reader in inputs.experts:
        own, theirs = kind(reader), kind(reference)
        if reader is reference or own == theirs or None in (own[0], theirs[0]):
            continue
        warnings.append(
            f"'{reader.label}' is a {own[0]} model ({own[1]}) but '{reference.label}' is a "
            f"{theirs[0]} model ({theirs[1]}); check that they share an architecture"
        )
    return warnings


def _read_notes(plan: Plan, inputs, block_elements: int) -> Callable[[TensorJob], str]:
    """Each job's reads where its method makes several passes (``engine.held``): once, or
    once a pass. (A CUDA plan's block size may shrink later; its jobs are torch's, which read
    a tensor of several blocks once a pass either way.)"""
    from della_cli.engine.held import block_count, budget_of, read_note

    budget = budget_of(plan.read_once_bytes, plan.jobs, inputs, block_elements)
    return lambda job: read_note(job, inputs, block_count(job, block_elements), budget)


def _describe_plan(
    report: PlanReport,
    plan: Plan,
    refs: list[str],
    reads: Callable[[TensorJob], str] = lambda job: "",
) -> None:
    report.warnings += list(plan.warnings)
    report.tensors = len(plan.jobs)
    report.merged = sum(job.action == "merge" for job in plan.jobs)
    report.copied = report.tensors - report.merged
    report.shards = len(plan.shards)
    report.output_bytes = plan.output_bytes
    counts: Counter[tuple[str, str, str]] = Counter()
    for job in plan.jobs:
        pattern = _LAYER_INDEX.sub(".*.", job.name)
        action = "merged" if job.action == "merge" else "copied from base"
        kernel = job.kernel.label + reads(job) if job.kernel else ""
        if any(source.on_device for source in (job.reference, *job.experts)):
            kernel += f", dequantized on {report.device}"  # quantized rows sent as stored
        counts[(pattern, action, kernel)] += 1
        for source in job.experts:
            if source.rows is not None:
                how = "cropped" if source.rows > job.shape[0] else "padded"
                detail = f"{how}: '{refs[source.model]}' {source.rows} rows to {job.shape[0]}"
                counts[(job.name, detail, "")] += 1
    report.groups = [
        {"tensors": pattern, "action": action, "count": count, "kernel": kernel}
        for (pattern, action, kernel), count in counts.items()
    ]


def _describe_parameters(report: PlanReport, plan: Plan, recipe) -> None:
    """Each merged group's parameters where gradients or filters vary them."""
    names: dict[str, list[str]] = {}
    for job in plan.jobs:
        if job.action == "merge":
            names.setdefault(_LAYER_INDEX.sub(".*.", job.name), []).append(job.name)
    for group in report.groups:
        if group["action"] == "merged" and group["tensors"] in names:
            parameters = group_parameters(recipe, names[group["tensors"]])
            if parameters:
                group["parameters"] = parameters


def available_memory(device: str) -> int | None:
    """Free memory on ``device`` now: the CUDA device's, or the host's available memory."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _existing(path: Path) -> Path:
    path = path.expanduser().resolve()
    while not path.exists():
        path = path.parent
    return path


def disk_needs(out: Path, output_bytes: int, download_bytes: int) -> list[dict]:
    """Free and needed bytes on the file systems of the output and (when something is to be
    downloaded) of the Hub cache; one entry when they share a file system."""
    places = [("output", _existing(out), output_bytes)]
    if download_bytes:
        places.append(("Hub cache", _existing(cache_dir()), download_bytes))
    by_device: dict[int, dict] = {}
    for role, path, needed in places:
        entry = by_device.setdefault(
            path.stat().st_dev,
            {"holds": [], "path": str(path), "free_bytes": free_bytes(path)},
        )
        entry["holds"].append(role)
        entry["needed_bytes"] = entry.get("needed_bytes", 0) + needed
    return list(by_device.values())


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def fit_problems(report: PlanReport) -> list[str]:
    problems = []
    for entry in report.disk:
        holds = " and ".join(entry["holds"])
        if shutil.disk_usage(entry["path"]).total == 0:  # /proc, /sys: no room for files
            problems.append(
                f"{entry['path']} is not on a file system that can hold files (the {holds} "
                "would go there); choose another output folder"
            )
        elif entry["needed_bytes"] > entry["free_bytes"]:
            needed, free = human_size(entry["needed_bytes"]), human_size(entry["free_bytes"])
            verb = "needs" if len(entry["holds"]) == 1 else "need"
            problems.append(
                f"the {holds} {verb} {needed} on {entry['path']} but {free} is free; free "
                "some space or choose another output (or HF_HOME for the cache)"
            )
    available = report.available_memory_bytes
    if available is not None and report.working_memory_bytes > available:
        problems.append(
            f"the merge needs about {human_size(report.working_memory_bytes)} of memory on "
            f"{report.memory_place} but {human_size(available)} is available; use another "
            "device or free memory"
        )
    return problems
