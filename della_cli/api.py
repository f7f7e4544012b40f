"""The library entry points behind the CLI: plan a merge, run it, report what happened."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from della_cli.card import license_conflict, model_license, public_recipe, render_card
from della_cli.engine import MergeEngine, MergeInputs, ProgressCallback, WarningCallback
from della_cli.errors import (
    DellaError,
    HubError,
    MergeFailure,
    ModelError,
    PlanError,
    UsageError,
    shown,
)
from della_cli.hub import HubRef, parse_hub_ref, push_files, remote_headers, resolve_model
from della_cli.io.journal import JOURNAL_NAME, Journal, merge_fingerprint, verified_shard_count
from della_cli.io.metadata import (
    GENERATION_PATTERNS,
    TOKENIZER_PATTERNS,
    copy_metadata,
    metadata_files,
    write_config,
)
from della_cli.io.output import check_destination, clear_partial, staged_folder
from della_cli.io.reader import ModelReader
from della_cli.io.writer import ShardWriter, shard_file_names
from della_cli.plan import Plan, build_plan
from della_cli.recipe import Recipe, load_recipe
from della_cli.verify import verify_model

RECIPE_FILE = "della_recipe.yaml"
DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass
class MergeOptions:
    device: str = "auto"
    seed: int | None = None
    out_shard_bytes: int = DEFAULT_SHARD_BYTES
    overwrite: bool = False
    resume: bool = False
    strict: bool = False  # missing tensors and NaN/Inf inputs are errors, not warnings
    allow_pickle: bool = False  # load pytorch_model*.bin folders (weights-only unpickler)
    progress: bool = True  # download progress bars for Hub models (on stderr)


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


def locate_model(ref: str, recipe_dir: Path | None) -> Path | HubRef:
    """A model reference as a local folder (relative to the working directory as mergekit
    does, else to the recipe's folder) or, when it is no existing folder and reads
    ``org/name[@revision]``, a Hub model. Strings starting with ``.``, ``/`` or ``~`` are
    always local. A name no file system takes (a part over 255 bytes) is refused here:
    asking the system about it fails with an OSError rather than answering no."""
    if any(len(os.fsencode(part)) > 255 for part in Path(ref).parts):
        raise ModelError(f"model {shown(ref)}: not a folder or Hub name (a part is too long)")
    path = Path(ref).expanduser()
    if path.is_dir() or path.is_absolute():
        return path
    if recipe_dir is not None and (recipe_dir / path).is_dir():
        return recipe_dir / path
    return parse_hub_ref(ref) or path


def open_inputs(
    recipe: Recipe,
    progress: bool = True,
    weights: bool = True,
    pins: dict[str, str] | None = None,
    allow_pickle: bool = False,
) -> MergeInputs:
    """Open every model of the recipe. Hub models are downloaded into the Hub cache first
    (at the commits in ``pins`` when given); without ``weights`` only their configs, indexes
    and tokenizers are, and their readers hold headers read remotely (plan only). Local
    pickle-only folders open only with ``allow_pickle``."""
    recipe_dir = recipe.path.parent if recipe.path else None
    resolved_pins: dict[str, str] = {}
    download_bytes = 0

    def open_model(field: str, ref: str) -> ModelReader:
        nonlocal download_bytes
        where = locate_model(ref, recipe_dir)
        if not isinstance(where, HubRef):
            if not where.exists():
                raise ModelError(missing_folder_message(field, ref, recipe_dir))
            if allow_pickle and where.is_dir():
                from della_cli.io import pickle_reader  # imports torch, whose loader it uses

                if pickle_reader.has_only_pickle_weights(where):
                    return pickle_reader.PickleModelReader(where, ref)
            return ModelReader(where, ref)
        commit = (pins or {}).get(ref)
        resolved = resolve_model(where, weights=weights, progress=progress, commit=commit)
        resolved_pins[ref] = resolved.commit
        if weights:
            return ModelReader(resolved.folder, ref, resolved.root)
        headers, missing = remote_headers(resolved)
        download_bytes += missing
        return ModelReader(resolved.folder, ref, resolved.root, headers=headers)

    failures: list[DellaError] = []

    def attempt(field: str, ref: str) -> ModelReader | None:
        """Open one model, noting a failure so that every missing model is named at once."""
        try:
            return open_model(field, ref)
        except ModelError as error:
            failures.append(error)
        except HubError as error:  # also the local folder a typo made look like org/name
            suggestion = close_folder(ref, recipe_dir)
            if suggestion is None:
                failures.append(error)
            else:
                failures.append(
                    ModelError(
                        f"{field}: '{ref}' is no folder here and not a model the Hub gave "
                        f"({error}); did you mean the folder '{suggestion}'?"
                    )
                )
        return None

    base = attempt("base_model", recipe.schema.base_model) if recipe.schema.base_model else None
    experts = [attempt(f"models.{i}.model", ref) for i, ref in enumerate(recipe.model_refs)]
    if failures:
        for reader in [base, *experts]:
            if reader is not None:
                reader.close()
        if len(failures) == 1:
            raise failures[0]
        # Exit 2 when any is the user's to fix (a path), else 1 (the Hub, the network).
        worst = max(failures, key=lambda error: error.exit_code)
        raise type(worst)(
            f"{len(failures)} models cannot be opened: " + "; ".join(map(str, failures))
        )
    return MergeInputs(base, experts, resolved_pins, download_bytes)


def missing_folder_message(field: str, ref: str, recipe_dir: Path | None) -> str:
    """A local model that is not there: the field, where it was looked for, and the folder
    with the closest name, which is most often what was meant."""
    looked = _places(ref, recipe_dir)
    message = f"{field}: model folder '{ref}' does not exist (looked for "
    message += ", ".join(map(str, looked)) + ")"
    suggestion = close_folder(ref, recipe_dir)
    return f"{message}; did you mean '{suggestion}'?" if suggestion else message


def _places(ref: str, recipe_dir: Path | None) -> list[Path]:
    path = Path(ref).expanduser()
    places = [Path.cwd()] if path.is_absolute() else [Path.cwd(), recipe_dir]
    return [place / path for place in dict.fromkeys(p for p in places if p is not None)]


def close_folder(ref: str, recipe_dir: Path | None) -> str | None:
    """An existing folder whose name is close to ``ref``'s last part, written as ``ref`` is."""
    import difflib

    for candidate in _places(ref, recipe_dir):
        parent = candidate.parent
        if not parent.is_dir():
            continue
        names = [entry.name for entry in parent.iterdir() if entry.is_dir()]
        close = difflib.get_close_matches(candidate.name, names, n=1, cutoff=0.6)
        if close:
            prefix = ref[: len(ref) - len(Path(ref).name)]  # "./", "models/", "" as typed
            return prefix + close[0]
    return None


def tokenizer_reader(recipe: Recipe, inputs: MergeInputs) -> ModelReader:
    """The model whose tokenizer files the output gets: ``tokenizer_source``, by default the
    base (or, without one, the first model)."""
    index = recipe.tokenizer_model
    if index is not None:
        return inputs.experts[index]
    return inputs.base or inputs.experts[0]


_DEVICE_NAME = re.compile(r"(cpu|cuda)(:\d+)?")


def select_device(name: str) -> str:
    """The device to merge on, as torch names it: ``auto`` is CUDA when available; an explicit
    CUDA device must exist. A CPU merge never imports torch (see ``io.dtypes``): ``auto`` looks
    for NVIDIA device files before asking torch."""
    if name == "auto":
        return "cuda" if _nvidia_device_files() and _cuda_device_count() else "cpu"
    match = _DEVICE_NAME.fullmatch(name)
    if match is None:
        raise UsageError(f"--device: '{name}' is not a device; use auto, cpu, cuda or cuda:N")
    if match.group(1) == "cpu":
        if match.group(2):
            raise UsageError(f"--device: '{name}' is not supported; use auto, cpu, cuda or cuda:N")
        return name
    count = _cuda_device_count()
    if count == 0:
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if match.group(2) and int(match.group(2)[1:]) >= count:
        raise UsageError(f"--device {name}: only {count} CUDA device(s)")
    return name


def _nvidia_device_files() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/proc/driver/nvidia").exists()


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def placed(recipe: Recipe, inputs: MergeInputs) -> Recipe:
    """The recipe with the models' number of layers, where a gradient needs it: the base's
    (else the first model's) config.json, else its stack of numbered tensor names."""
    if not recipe.varies_by_tensor:
        return recipe
    from della_cli.recipe_settings import layer_count

    reference = inputs.base or inputs.experts[0]
    return recipe.with_layers(layer_count(reference.config, reference.tensors))


def read_recipe(recipe_path: Path | Recipe, options: MergeOptions) -> Recipe:
    """The recipe of a file, or one already read (a stage of a multi-stage file), with the
    seed of ``options`` when it sets one."""
    recipe = recipe_path if isinstance(recipe_path, Recipe) else load_recipe(recipe_path)
    return recipe.with_seed(options.seed) if options.seed is not None else recipe


def prepare(
    recipe_path: Path | Recipe, options: MergeOptions, pins: dict[str, str] | None = None
) -> tuple[Recipe, MergeInputs, Plan]:
    """Read the recipe, open the models (downloading Hub models, at the commits in ``pins``
    when given) and plan: everything short of reading tensor data."""
    recipe = read_recipe(recipe_path, options)
    inputs = open_inputs(recipe, options.progress, pins=pins, allow_pickle=options.allow_pickle)
    recipe = placed(recipe, inputs)
    check_metadata_files(recipe, inputs)
    plan = build_plan(
        recipe, inputs.base, inputs.experts, options.out_shard_bytes, strict=options.strict
    )
    return recipe, inputs, plan


def check_metadata_files(recipe: Recipe, inputs: MergeInputs) -> None:
    """Refuse generation-config and tokenizer files that escape their folders, before
    anything is merged."""
    reference = inputs.base or inputs.experts[0]
    tokenizer = tokenizer_reader(recipe, inputs)
    metadata_files(reference.folder, reference.root, GENERATION_PATTERNS)
    metadata_files(tokenizer.folder, tokenizer.root, TOKENIZER_PATTERNS)


def run_merge(
    recipe_path: Path | Recipe,
    out: Path,
    options: MergeOptions,
    on_start: Callable[[Plan], None] | None = None,
    on_progress: ProgressCallback | None = None,
    on_warning: WarningCallback | None = None,
    on_planned: Callable[[Plan], None] | None = None,
) -> MergeReport:
    """Merge as the recipe says into ``out``, which appears only once complete.
    ``on_planned`` runs once the recipe and the models' headers have passed the plan, before
    any download or write (the CLI checks push credentials there, after the user's files)."""
    from della_cli.preflight import assess

    started = time.perf_counter()
    # Everything is checked from headers (Hub models' read remotely) before any download.
    recipe = read_recipe(recipe_path, options)
    headers = open_inputs(
        recipe, options.progress, weights=False, allow_pickle=options.allow_pickle
    )
    recipe = placed(recipe, headers)
    preflight, plan = assess(recipe, headers, out, options)
    if not preflight.can_run:
        raise PlanError(preflight.problems)
    if on_planned:
        on_planned(plan)
    if preflight.inputs:  # Hub models: download their weights at the commits planned
        recipe, inputs, plan = prepare(recipe_path, options, preflight.inputs)
    else:  # local models only: their readers already hold everything the merge reads
        inputs = headers
        check_metadata_files(recipe, inputs)
    device = select_device(options.device)
    reference = inputs.base or inputs.experts[0]
    input_folders = [reader.folder for reader in [inputs.base, *inputs.experts] if reader]
    check_destination(out, options.overwrite, input_folders, recipe.path)
    warnings = list(plan.warnings)
    for message in warnings:
        (on_warning or (lambda m: None))(message)

    def warn(message: str) -> None:
        warnings.append(message)
        if on_warning:
            on_warning(message)

    if on_start:
        on_start(plan)
    resumed_shards = 0
    try:
        with staged_folder(out, options.resume, options.overwrite, warn) as staging:
            resumed_shards = _write_weights(
                recipe, plan, inputs, device, staging, options, on_progress, warn
            )
            write_config(
                reference.config,
                staging,
                plan.config_dtype,
                plan.tie_word_embeddings,
                plan.vocab_size,
            )
            copy_metadata(reference.folder, staging, reference.root, GENERATION_PATTERNS)
            tokenizer = tokenizer_reader(recipe, inputs)
            copy_metadata(tokenizer.folder, staging, tokenizer.root, TOKENIZER_PATTERNS)
            if recipe.schema.chat_template:
                _set_chat_template(recipe, inputs, staging, warn)
            _write_card_and_recipe(recipe, inputs, staging, recipe.schema.name or out.name, warn)
            (staging / JOURNAL_NAME).unlink(missing_ok=True)
            _check_own_output(staging, warn)
    except OSError as error:
        raise MergeFailure(
            f"writing {out} failed: {error.strerror or error}; nothing was left behind"
        ) from error
    finally:
        for reader in [inputs.base, *inputs.experts]:
            if reader is not None:
                reader.close()
    return MergeReport(
        output=str(out),
        method=recipe.method.name,
        device=str(device),
        seed=recipe.seed,
        recipe_sha256=recipe.sha256,
        tensors=len(plan.jobs),
        shards=len(plan.shards),
        bytes=plan.output_bytes,
        seconds=round(time.perf_counter() - started, 3),
        resumed_shards=resumed_shards,
        inputs=dict(inputs.pins),
        warnings=warnings,
    )


def _set_chat_template(recipe: Recipe, inputs: MergeInputs, staging: Path, warn) -> None:
    """The recipe's ``chat_template`` on the output's tokenizer (``della_cli.chat_template``);
    ``auto`` reads every model's template, each a file confined to its model's folder."""
    from della_cli.chat_template import (
        TEMPLATE_FILE,
        choose_auto,
        template_text,
        write_chat_template,
    )

    value = recipe.schema.chat_template
    if value == "auto":
        readers = {r.folder: r for r in [inputs.base, *inputs.experts] if r is not None}
        for reader in readers.values():
            metadata_files(reader.folder, reader.root, (TEMPLATE_FILE, "tokenizer_config.json"))
        template, note = choose_auto([(r.label, r.folder) for r in readers.values()])
        warn(note)
    else:
        template = template_text(value)
    if template is not None and not write_chat_template(staging, template):
        warn("chat_template: the output has no tokenizer_config.json to set it on; not written")


def _write_card_and_recipe(
    recipe: Recipe, inputs: MergeInputs, staging: Path, title: str, warn: WarningCallback
) -> None:
    """The card and the recipe, both as they will be published: the recipe as written, with
    local models given by absolute paths named by their folders (``card.public_recipe``)."""
    readers = {recipe.schema.base_model: inputs.base} if inputs.base else {}
    readers.update(zip(recipe.model_refs, inputs.experts, strict=True))
    licenses = {ref: model_license(reader.folder) for ref, reader in readers.items() if reader}
    conflict = license_conflict(licenses)
    if conflict:
        warn(conflict)
    local = [ref for ref in readers if ref not in inputs.pins]
    (staging / RECIPE_FILE).write_text(public_recipe(recipe.text, local))
    card = render_card(recipe, title, inputs.pins, licenses)
    (staging / "README.md").write_text(card)


def _check_own_output(staging: Path, warn: WarningCallback) -> None:
    """The cheap part of ``della verify`` on what was just written, before it is published:
    unreadable files are a failure (nothing is left behind); shapes that disagree with the
    config, which comes from the base, are reported as a warning."""
    report = verify_model(staging, read_tensors=False, tokenizer=False)
    for check in report.checks:
        if check.ok:
            continue
        if check.name == "files":
            raise MergeFailure(f"the merged output failed its own check: {check.detail}")
        warn(f"the merged output: {check.detail}")


def merge_fingerprint_of(recipe: Recipe, plan: Plan, inputs: MergeInputs) -> str:
    """The resume fingerprint of this merge (see ``io.journal.merge_fingerprint``)."""
    layout = [[(t.name, t.dtype, list(t.shape)) for t in shard] for shard in plan.shards]
    folders = [reader.folder for reader in [inputs.base, *inputs.experts] if reader]
    return merge_fingerprint(recipe.text, recipe.seed, layout, folders)


def _write_weights(recipe, plan, inputs, device, staging, options, on_progress, warn) -> int:
    """Merge every tensor into shards in ``staging``, journaling finished shards; with
    ``options.resume``, keep the verified shards a killed run left and return their count.
    Everything else in the partial folder is removed first: a merge that starts over does so
    from an empty folder, never beside the old shards, index or config."""
    journal = Journal(merge_fingerprint_of(recipe, plan, inputs))
    file_names = shard_file_names(len(plan.shards))
    done = 0
    if options.resume:
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
    try:
        engine = MergeEngine(recipe, plan, inputs, device, on_progress, warn, strict=options.strict)
        engine.run(writer, start=writer.next_index)
    finally:
        # Close a half-written shard on any failure (Ctrl-C included) before the staging
        # folder is removed; a no-op after a complete run.
        writer.abort()
    writer.close()
    return done


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
