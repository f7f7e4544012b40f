"""The library entry points behind the CLI: plan a merge, run it, report what happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from della_cli.card import public_recipe
from della_cli.engine import (
    MergeEngine,
    MergeInputs,
    ProgressCallback,
    WarningCallback,
    WarningLog,
)
from della_cli.errors import MergeFailure, PlanError, UsageError
from della_cli.hub import parse_hub_ref, push_files
from della_cli.io.journal import JOURNAL_NAME, Journal, verified_shard_count
from della_cli.io.lora import input_folders
from della_cli.io.output import check_destination, clear_partial, staged_folder
from della_cli.io.writer import ShardWriter, shard_file_names
from della_cli.locate import locate_model
from della_cli.output_files import RECIPE_FILE, check_output, write_model_files
from della_cli.plan import Plan
from della_cli.quant.requantize import requantizing
from della_cli.recipe import Recipe, load_recipe
from della_cli.session import (
    DEFAULT_SHARD_BYTES,
    MergeOptions,
    MergeSession,
    check_metadata_files,
    merge_fingerprint_of,
    open_inputs,
    prepare,
    read_recipe,
    select_device,
)
from della_cli.verify import verify_model

# The names callers have used from here; they live in session (and locate, devices) now.
__all__ = [
    "DEFAULT_SHARD_BYTES",
    "MergeOptions",
    "MergeReport",
    "MergeSession",
    "locate_model",
    "open_inputs",
    "prepare",
    "push_model",
    "read_recipe",
    "run_merge",
    "select_device",
]


@dataclass
class MergeReport:
    """The machine-readable summary of a finished merge (``--json``)."""

    output: str
    method: str
    device: str
    seed: int
    recipe_sha256: str
    tensors: int
    shards: int
    bytes: int
    seconds: float
    resumed_shards: int = 0
    inputs: dict[str, str] = field(default_factory=dict)  # Hub reference -> pinned commit
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(
        cls,
        session: MergeSession,
        plan: Plan,
        out: Path,
        started: float,
        warnings: list[str],
        resumed_shards: int = 0,
    ) -> MergeReport:
        """The report of a finished merge (on one machine, or assembled from parts)."""
        recipe = session.recipe
        return cls(
            output=str(out),
            method=recipe.method.name,
            device=str(session.device),
            seed=recipe.seed,
            recipe_sha256=recipe.sha256,
            tensors=len(plan.jobs),
            shards=len(plan.shards),
            bytes=plan.output_bytes,
            seconds=round(time.perf_counter() - started, 3),
            resumed_shards=resumed_shards,
            inputs=dict(session.inputs.pins),
            warnings=warnings,
        )


def run_merge(
    recipe_path: Path | Recipe | MergeSession,
    out: Path,
    options: MergeOptions,
    on_start: Callable[[Plan], None] | None = None,
    on_progress: ProgressCallback | None = None,
    on_warning: WarningCallback | None = None,
    on_planned: Callable[[Plan], None] | None = None,
    on_notice: WarningCallback | None = None,
) -> MergeReport:
    """Merge as the recipe says into ``out``, which appears only once complete.
    ``on_planned`` runs once the recipe and the models' headers have passed the plan, before
    any download or write (the CLI checks push credentials there, after the user's files).
    A session given instead of a recipe is used as it is (its options, not ``options``)."""

    started = time.perf_counter()
    # Everything is checked from headers (Hub models' read remotely) before any download;
    # the recipe is read, the models opened and the plan made once.
    if isinstance(recipe_path, MergeSession):
        session, options = recipe_path, recipe_path.options
    else:
        session = MergeSession.open(recipe_path, options)
    try:
        plan = checked_plan(session, out, on_planned)
    except BaseException:
        session.close()
        raise
    recipe, inputs, device = session.recipe, session.inputs, session.device
    warn = WarningLog(on_warning)
    for message in plan.warnings:
        warn(message)

    if on_start:
        on_start(plan)
    resumed_shards = 0
    try:
        with staged_folder(out, options.resume, options.overwrite, warn) as staging:
            resumed_shards, saw_nonfinite = _write_weights(
                recipe, plan, inputs, device, staging, options, on_progress, warn, on_notice
            )
            finish_output(session, plan, staging, out.name, warn, saw_nonfinite or resumed_shards)
    except OSError as error:
        raise MergeFailure(
            f"writing {out} failed: {error.strerror or error}; nothing was left behind"
        ) from error
    finally:
        session.close()
    return MergeReport.of(session, plan, out, started, warn.messages, resumed_shards)


def checked_plan(
    session: MergeSession, out: Path, on_planned: Callable[[Plan], None] | None = None
) -> Plan:
    """The session's plan once it has passed the preflight (PlanError, exit 2, otherwise),
    the Hub models' weights downloaded and ``out`` checked again (the caller closes the
    session on failure)."""
    from della_cli.preflight import assess

    preflight, plan = assess(session, out)
    if not preflight.can_run:
        raise PlanError(preflight.problems)
    if on_planned:
        on_planned(plan)
    session.download_weights()  # Hub models: their weights, at the commits planned
    check_metadata_files(session.recipe, session.inputs)
    readers = [session.inputs.base, *session.inputs.experts]
    folders = [folder for reader in readers if reader for folder in input_folders(reader)]
    check_destination(out, session.options.overwrite, folders, session.recipe.path)  # again
    return plan


def finish_output(
    session: MergeSession, plan: Plan, staging: Path, title: str, warn, check_finite: bool
) -> None:
    """Everything but the weights, written into ``staging`` once the weights are; then the
    staged output checked (``check_finite``: read for NaN and Inf, unless allowed)."""
    recipe = session.recipe
    write_model_files(recipe, plan, session.inputs, staging, recipe.schema.name or title, warn)
    (staging / JOURNAL_NAME).unlink(missing_ok=True)
    check_output(staging, warn, check_finite, session.options)


def _write_weights(
    recipe, plan, inputs, device, staging, options, on_progress, warn, on_notice=None
) -> tuple[int, bool]:
    """Merge every tensor into shards in ``staging``, journaling finished shards; with
    ``options.resume``, keep the verified shards a killed run left. Return their count, and
    whether any input tensor held NaN or Inf.
    Everything else in the partial folder is removed first: a merge that starts over does so
    from an empty folder, never beside the old shards, index or config."""
    writer, done = open_writer(recipe, plan, inputs, staging, options.resume, warn)
    try:
        engine = MergeEngine(
            recipe,
            plan,
            inputs,
            device,
            on_progress,
            warn,
            strict=options.strict,
            threads=options.threads,
            on_notice=on_notice,
        )
        engine.run(writer, start=writer.next_index)
    finally:
        # Close a half-written shard on any failure (Ctrl-C included) before the staging
        # folder is removed; a no-op after a complete run.
        writer.abort()
    writer.close()
    return done, engine.report.saw_nonfinite


def open_writer(
    recipe: Recipe, plan: Plan, inputs: MergeInputs, staging: Path, resume: bool, warn
) -> tuple[ShardWriter, int]:
    """The shard writer of ``staging``, journaling each finished shard, and the count of
    verified shards a killed run left there (kept with ``resume``; all else is removed)."""
    journal = Journal(merge_fingerprint_of(recipe, plan, inputs))
    file_names = shard_file_names(len(plan.shards))
    done = 0
    if resume:
        previous = Journal.load(staging)
        same = previous is not None and previous.fingerprint == journal.fingerprint
        if same:
            done = verified_shard_count(staging, previous, file_names)
            journal.shards = {name: previous.shards[name] for name in file_names[:done]}
        elif previous is not None:
            warn("the partial output was made by a different recipe, seed or inputs; starting over")
        clear_partial(staging, keep={*file_names[:done], *([JOURNAL_NAME] if same else [])})

    def record(file_name: str, digest: str) -> None:
        journal.shards[file_name] = digest
        journal.save(staging)

    writer = ShardWriter(staging, plan.shards, first_shard=done, on_shard_finished=record)
    return requantizing(writer, plan.jobs), done  # FP8 output: quantized as written


def push_model(
    folder: Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a merged model folder to the Hub in one commit; return its URL. The folder must
    pass the file checks of ``della verify``; it is only read, never changed. The copy of the
    recipe that is uploaded names local input folders by their own name only."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    report = verify_model(folder, read_tensors=False, tokenizer=False)
    broken = [c.detail for c in report.checks if c.name == "files" and not c.ok]
    if broken:
        raise UsageError(f"{folder} is not a complete model folder: {broken[0]}")
    files: dict[str, Path | bytes] = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[relative.as_posix()] = path  # dot files: della's journal, editors' files
    if RECIPE_FILE in files:
        files[RECIPE_FILE] = _public_recipe_file(folder / RECIPE_FILE)
    message = commit_message or f"Upload {folder.resolve().name}, merged with della"
    return push_files(repo_id, files, private=private, revision=revision, commit_message=message)


def _public_recipe_file(path: Path) -> bytes:
    """The recipe as uploaded, local folders named by their own name only. A recipe that
    does not load is refused, never uploaded as it is: which of its strings are local paths
    is known only from the parsed recipe."""
    try:
        recipe = load_recipe(path)
    except UsageError as error:
        raise UsageError(
            f"{path} does not load as a recipe, so the local paths it may name cannot be "
            f"removed; fix or delete it, then push again ({error})"
        ) from None
    refs = [r for r in [recipe.schema.base_model, *recipe.model_refs] if r]
    return public_recipe(recipe.text, [r for r in refs if parse_hub_ref(r) is None]).encode()
