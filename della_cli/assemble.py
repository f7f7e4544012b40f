"""The last step of a merge made in parts (``della merge RECIPE OUT --assemble``).

The assembly plans the merge from headers as the parts did, then trusts a shard of the parts
folder only when a manifest of this very merge (same fingerprint) records it and its bytes
still have the recorded digest. A missing or altered shard is refused, named with the part that
makes it, and nothing is written; with ``--resume`` the assembly computes such shards itself
instead (downloading only the Hub files they read). It then links the shards into the output's
temporary folder, writes what a merge on one machine writes besides its weights (index,
config, tokenizer, card, recipe), checks the output as ``della merge`` does and publishes it
atomically (``io.output``); the parts folder is removed only after that.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from della_cli.api import MergeReport
from della_cli.engine import ProgressCallback, WarningCallback, WarningLog
from della_cli.errors import MergeFailure, PlanError, UsageError
from della_cli.io.journal import file_digest
from della_cli.io.output import staged_folder
from della_cli.io.parts_folder import (
    Manifest,
    link_or_copy,
    lock_part,
    manifests,
    open_parts_folder,
    remove_parts_folder,
)
from della_cli.io.writer import ShardWriter, shard_file_names
from della_cli.output_files import check_output, write_model_files
from della_cli.part_merge import compute_shards, parts_fingerprint, plan_parts
from della_cli.parts import files_read, model_readers, shard_job_starts
from della_cli.plan import Plan
from della_cli.session import MergeOptions, MergeSession, check_metadata_files

ASSEMBLY_MANIFEST = "assembly.json"


def assemble(
    recipe_path,
    out: Path,
    options: MergeOptions,
    on_progress: ProgressCallback | None = None,
    on_warning: WarningCallback | None = None,
    on_notice: WarningCallback | None = None,
) -> MergeReport:
    """Check every shard the parts wrote, then publish ``out`` as a merge on one machine
    would (see the module docstring)."""
    from della_cli.preflight import assess

    started = time.perf_counter()
    warn = WarningLog(on_warning)

    session = MergeSession.open(recipe_path, options)
    try:
        report, plan = assess(session, out)
        if plan is None:
            raise PlanError(report.problems)
        for message in plan.warnings:
            warn(message)
        check_metadata_files(session.recipe, session.inputs)
        folder = open_parts_folder(out, create=False)
        if folder is None:
            raise UsageError(
                f"no parts of {out} were found (.{out.name}.della-parts beside it); compute "
                f"them first with `della merge RECIPE {out} --part I/N` for I = 1 to N"
            )
        fingerprint = parts_fingerprint(session, plan)
        found = {n: m for n, m in manifests(folder).items() if m.fingerprint == fingerprint}
        problems = shard_problems(folder, plan, found)
        if problems and options.resume:
            _compute_here(
                session, plan, folder, fingerprint, problems, on_progress, warn, on_notice
            )
            found = {n: m for n, m in manifests(folder).items() if m.fingerprint == fingerprint}
            problems = shard_problems(folder, plan, found)
        if problems:
            raise UsageError(_refusal(session, plan, found, problems))
        reread = any(m.nonfinite or m.resumed for m in found.values())
        _publish(session, plan, folder, out, options, warn, reread)
    except OSError as error:
        raise MergeFailure(
            f"assembling {out} failed: {error.strerror or error}; the parts are intact"
        ) from error
    finally:
        session.close()
    remove_parts_folder(folder)
    return MergeReport.of(session, plan, out, started, warn.messages)


def shard_problems(folder: Path, plan: Plan, found: dict[str, Manifest]) -> dict[int, str]:
    """The plan's shards that cannot be assembled, by index: 'missing' (no manifest of this
    merge records it, or its file is gone) or 'corrupt' (its bytes lost their digest)."""
    recorded = {}
    for manifest in found.values():
        recorded.update(manifest.shards)
    problems = {}
    for index, name in enumerate(shard_file_names(len(plan.shards))):
        path = folder / name
        if name not in recorded or not path.is_file():
            problems[index] = "missing"
        elif file_digest(path) != recorded[name]:
            problems[index] = "corrupt"
    return problems


def _refusal(session, plan: Plan, found: dict[str, Manifest], problems: dict[int, str]) -> str:
    """One line: which shards, why, and which parts to run again."""
    names = shard_file_names(len(plan.shards))
    listed = [f"{names[k]} ({why})" for k, why in sorted(problems.items())]
    shown = ", ".join(listed[:5]) + (f" and {len(listed) - 5} more" if len(listed) > 5 else "")
    counts = {int(m.part.split("/")[1]) for m in found.values() if "/" in m.part}
    hint = "run the parts that make them again"
    if len(counts) == 1:
        parts = plan_parts(session, plan, counts.pop())
        labels = sorted({p.label for p in parts for k in problems if k in p.shards})
        hint = "run again " + ", ".join(f"--part {label}" for label in labels)
    return (
        f"{len(problems)} of {len(names)} shards cannot be assembled: {shown}; {hint}, or "
        "assemble with --resume to compute them here; nothing was written"
    )


def _compute_here(session, plan, folder, fingerprint, problems, on_progress, warn, on_notice):
    """``--assemble --resume``: the missing or altered shards, computed on this machine, with
    only the Hub weight files they read downloaded."""
    shards = sorted(problems)
    starts = shard_job_starts(plan)
    jobs = [job for k in shards for job in plan.jobs[starts[k] : starts[k + 1]]]
    session.download_weights(
        only=files_read(jobs, model_readers(session.inputs.base, session.inputs.experts))
    )
    lock = lock_part(folder, ASSEMBLY_MANIFEST, "assembly")
    try:
        manifest = Manifest.load(folder / ASSEMBLY_MANIFEST)
        if manifest is None or manifest.fingerprint != fingerprint:
            manifest = Manifest(fingerprint, "assembly")
        compute_shards(
            session, plan, folder, ASSEMBLY_MANIFEST, manifest, shards, on_progress, warn, on_notice
        )
    finally:
        os.close(lock)


def _publish(session, plan, folder, out, options, warn, reread: bool) -> None:
    """Link the shards into the output's temporary folder, write the rest, check, publish."""
    recipe, inputs = session.recipe, session.inputs
    with staged_folder(out, False, options.overwrite, warn) as staging:
        for name in shard_file_names(len(plan.shards)):
            link_or_copy(folder / name, staging / name)
        ShardWriter(staging, plan.shards, first_shard=len(plan.shards)).close()  # the index
        write_model_files(recipe, plan, inputs, staging, recipe.schema.name or out.name, warn)
        check_output(staging, warn, reread, options)
