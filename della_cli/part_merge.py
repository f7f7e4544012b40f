"""One part of a merge (``della merge RECIPE OUT --part i/N``): its shards, into the parts folder.

The part plans the whole merge from headers, as every part and the assembly do, so all of them
agree on the shards and on the split (``della_cli.parts``); it then downloads only the Hub
weight files its shards read, computes its shards with the engine (the plan's jobs from the
part's first shard to its last, nothing else) and renames each finished shard into the parts
folder, recording its digest in the part's manifest (``io.parts_folder``). A part that fails
leaves its finished shards recorded: run again with ``--resume``, it keeps those whose bytes
still match and computes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from della_cli.engine import (
    WHOLE_TENSOR_SPARSIFIERS,
    MergeEngine,
    ProgressCallback,
    WarningCallback,
    WarningLog,
    block_elements_for,
)
from della_cli.errors import MergeFailure, PlanError
from della_cli.io.journal import file_digest, file_identity
from della_cli.io.parts_folder import (
    Manifest,
    fresh_work_folder,
    lock_part,
    manifest_name,
    open_parts_folder,
)
from della_cli.io.writer import SHARD_METADATA, ShardWriter, encode_header, shard_file_names
from della_cli.parts import Part, model_readers, shard_job_starts, split_parts
from della_cli.plan import Plan
from della_cli.quant.requantize import requantizing
from della_cli.session import MergeOptions, MergeSession, check_metadata_files


@dataclass
class PartReport:
    """The machine-readable summary of a finished part (``--json``)."""

    output: str
    part: str
    shards: list[str]  # the shard files this part holds, computed now or kept
    computed_shards: int
    kept_shards: int
    bytes: int
    download_bytes: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def plan_parts(session: MergeSession, plan: Plan, count: int) -> list[Part]:
    """The split every part and the assembly make of this merge."""
    inputs = session.inputs
    readers = model_readers(inputs.base, inputs.experts)
    refs = dict(
        zip(
            range(-1, len(inputs.experts)),
            [session.recipe.schema.base_model, *session.recipe.model_refs],
            strict=True,
        )
    )
    hub = {model for model in readers if refs[model] in inputs.pins}
    whole = session.recipe.method.sparsifier in WHOLE_TENSOR_SPARSIFIERS
    return split_parts(plan, readers, count, hub, block_elements_for(session.device), whole)


def plan_parts_report(recipe_path, out: Path | None, options: MergeOptions, count: int):
    """``della plan --parts N``: the plan report of the whole merge, and its parts (none when
    the merge cannot be planned)."""
    from della_cli.preflight import assess

    session = MergeSession.open(recipe_path, options)
    try:
        report, plan = assess(session, out)
        parts = plan_parts(session, plan, count) if plan is not None else []
    finally:
        session.close()
    return report, parts


def parts_fingerprint(session: MergeSession, plan: Plan) -> str:
    """What determines the output bytes, the same on every machine: the recipe and seed, the
    shard layout, and each model by its pinned commit (Hub) or each of its weight files by size
    and a digest of its header and sampled blocks (``io.journal.file_identity`` without the
    inode and times, which differ from machine to machine)."""
    recipe, inputs = session.recipe, session.inputs
    layout = [[(t.name, t.dtype, list(t.shape)) for t in shard] for shard in plan.shards]
    models = []
    for ref, reader in zip(
        [recipe.schema.base_model, *recipe.model_refs], [inputs.base, *inputs.experts], strict=True
    ):
        if reader is None:
            continue
        if ref in inputs.pins:
            models.append([ref, inputs.pins[ref]])
            continue
        paths = sorted({info.path for info in reader.tensors.values()})
        models.append([ref, [[p.name, *file_identity(p)[::5]] for p in paths]])
    material = json.dumps([recipe.text, recipe.seed, layout, models], default=str)
    return hashlib.sha256(material.encode()).hexdigest()


def run_part(
    recipe_path,
    out: Path,
    options: MergeOptions,
    number: int,
    count: int,
    on_progress: ProgressCallback | None = None,
    on_warning: WarningCallback | None = None,
    on_notice: WarningCallback | None = None,
) -> PartReport:
    """Compute part ``number`` of ``count`` of the merge into the parts folder of ``out``."""
    started = time.perf_counter()
    warn = WarningLog(on_warning)

    session = MergeSession.open(recipe_path, options)
    try:
        plan, part = _planned_part(session, out, number, count)
        for message in plan.warnings:
            warn(message)
        session.download_weights(only=part.files)
        check_metadata_files(session.recipe, session.inputs)
        folder = open_parts_folder(out, create=True)
        name = manifest_name(number, count)
        lock = lock_part(folder, name, part.label)
        try:
            manifest = Manifest(parts_fingerprint(session, plan), part.label)
            kept = _kept_shards(folder, name, manifest, plan, part) if options.resume else []
            names = shard_file_names(len(plan.shards))
            todo = [k for k in part.shards if names[k] not in kept]
            manifest.save(folder, name)
            compute_shards(
                session, plan, folder, name, manifest, todo, on_progress, warn, on_notice
            )
        finally:
            os.close(lock)
    except OSError as error:
        raise MergeFailure(
            f"writing part {number}/{count} of {out} failed: {error.strerror or error}"
        ) from error
    finally:
        session.close()
    return PartReport(
        output=str(out),
        part=part.label,
        shards=[names[k] for k in part.shards],
        computed_shards=len(todo),
        kept_shards=len(kept),
        bytes=part.output_bytes,
        download_bytes=part.download_bytes,
        seconds=round(time.perf_counter() - started, 3),
        warnings=warn.messages,
    )


def _planned_part(session: MergeSession, out: Path, number: int, count: int) -> tuple[Plan, Part]:
    """The plan of the whole merge and this part of it, refused (PlanError) when the recipe
    cannot be merged or when the part does not fit this machine (the whole merge need not)."""
    from della_cli.preflight import assess, disk_needs, fit_problems

    report, plan = assess(session, out)
    if plan is None:
        raise PlanError(report.problems)
    part = plan_parts(session, plan, count)[number - 1]
    report.working_memory_bytes = part.working_memory_bytes
    report.disk = disk_needs(out, part.output_bytes, part.download_bytes)
    problems = fit_problems(report)
    if problems:
        raise PlanError(problems)
    return plan, part


def _kept_shards(folder: Path, name: str, manifest: Manifest, plan: Plan, part: Part) -> list:
    """The part's shards an earlier run of this very merge finished and whose bytes still
    have the digest it recorded; their records go into ``manifest``."""
    previous = Manifest.load(folder / name)
    if previous is None or previous.fingerprint != manifest.fingerprint:
        return []
    manifest.nonfinite = previous.nonfinite
    names = shard_file_names(len(plan.shards))
    kept = []
    for k in part.shards:
        recorded = previous.shards.get(names[k])
        path = folder / names[k]
        if recorded is not None and path.is_file() and file_digest(path) == recorded:
            manifest.shards[names[k]] = recorded
            kept.append(names[k])
    manifest.resumed = bool(kept)
    return kept


def compute_shards(
    session: MergeSession,
    plan: Plan,
    folder: Path,
    name: str,
    manifest: Manifest,
    shards: list[int],
    on_progress: ProgressCallback | None,
    warn: WarningCallback,
    on_notice: WarningCallback | None = None,
) -> None:
    """Compute ``shards`` (plan indexes) into ``folder``, each run of consecutive ones by one
    pass of the engine over exactly their jobs, and record each in the manifest ``name``."""
    names = shard_file_names(len(plan.shards))
    starts = shard_job_starts(plan)
    work = fresh_work_folder(folder, name)

    def record(file_name: str, digest: str) -> None:
        os.replace(work / file_name, folder / file_name)  # whole, in one step
        manifest.shards[file_name] = digest
        manifest.save(folder, name)

    for first, stop in _runs(shards):
        for k in range(first, stop):
            if not plan.shards[k]:  # a shard of no tensors is still a valid file
                _write_empty_shard(work / names[k])
                record(names[k], file_digest(work / names[k]))
        if starts[first] == starts[stop]:
            continue
        writer = ShardWriter(work, plan.shards, first_shard=first, on_shard_finished=record)
        writer = requantizing(writer, plan.jobs)  # FP8 output: quantized as written
        options = session.options
        engine = MergeEngine(
            session.recipe,
            replace(plan, jobs=plan.jobs[: starts[stop]]),  # the engine stops at the run's end
            session.inputs,
            session.device,
            on_progress,
            warn,
            strict=options.strict,
            threads=options.threads,
            on_notice=on_notice,
        )
        try:
            engine.run(writer, start=starts[first])
        finally:
            writer.abort()
        if engine.report.saw_nonfinite and not manifest.nonfinite:
            manifest.nonfinite = True
            manifest.save(folder, name)
    shutil.rmtree(work, ignore_errors=True)


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Sorted indexes as runs of consecutive ones, (first, stop) each."""
    runs: list[tuple[int, int]] = []
    for index in sorted(indexes):
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def _write_empty_shard(path: Path) -> None:
    path.write_bytes(encode_header([], SHARD_METADATA))
