"""The merge session: a recipe read once, its models opened once, the device chosen once and
the plan built once, shared by ``della plan``, ``merge``, ``push`` and ``inspect``.

Hub models are opened from their configs and safetensors headers alone (read remotely), so the
whole plan is made before anything is downloaded; a merge then downloads their weights at the
commits the plan pinned and keeps the plan (``MergeSession.download_weights``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from della_cli.devices import merge_devices, select_device
from della_cli.engine import MergeInputs
from della_cli.errors import DellaError, HubError, ModelError
from della_cli.hub import HubRef, remote_headers, resolve_model
from della_cli.io.journal import merge_fingerprint
from della_cli.io.lora import input_folders
from della_cli.io.metadata import GENERATION_PATTERNS, TOKENIZER_PATTERNS, metadata_files
from della_cli.io.reader import ModelReader
from della_cli.locate import close_folder, locate_model, missing_folder_message
from della_cli.lora_inputs import open_adapter, with_adapter
from della_cli.model_ref import split_model_ref
from della_cli.plan import Plan, build_plan
from della_cli.quant import dequantizing
from della_cli.recipe import Recipe, load_recipe
from della_cli.recipe_slices import model_field
from della_cli.session_downloads import downloaded_model

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
    threads: int | None = None  # compute threads (None: every core this process may use)
    allow_nonfinite: bool = False  # publish an output that holds NaN or Inf


@dataclass
class MergeSession:
    """What ``della plan`` and ``della merge`` share: the recipe, its opened models (Hub ones
    from their headers until ``download_weights``), the device and, once made, the plan."""

    recipe: Recipe
    inputs: MergeInputs
    device: str
    options: MergeOptions
    plan: Plan | None = None
    downloaded: bool = field(default=False, repr=False)
    borrowed: bool = field(default=False, repr=False)  # its models belong to another session

    @classmethod
    def open(cls, recipe_path: Path | Recipe, options: MergeOptions) -> MergeSession:
        """Read the recipe (a file, or a stage of a multi-stage file already read) and open
        every model from headers: nothing is downloaded."""
        recipe = read_recipe(recipe_path, options)
        device = select_device(options.device)
        inputs = open_inputs(
            recipe, options.progress, weights=False, allow_pickle=options.allow_pickle
        )
        return cls(placed(recipe, inputs), inputs, device, options)

    def build_plan(self) -> Plan:
        """The plan (raises PlanError listing every problem); made once, then kept."""
        if self.plan is None:
            self.plan = build_plan(
                self.recipe,
                self.inputs.base,
                self.inputs.experts,
                self.options.out_shard_bytes,
                strict=self.options.strict,
                device=",".join(merge_devices(self.device)),
            )
        return self.plan

    def download_weights(self, only: Mapping[int, Collection[str]] | None = None) -> None:
        """Download the Hub models' weights at the commits the plan pinned, and read them as
        local folders, checked as every local model is (files confined to the cache, headers
        valid). Their tensors must be the ones the plan was made from: the same commit cannot
        give others, so a difference is refused rather than merged. ``only``: the weight files
        to download, by model (-1 the base, else the expert's index), for a part of a merge
        (``della_cli.parts``); the other files' tensors stay known from their headers."""
        if self.downloaded or not self.inputs.pins:
            self.downloaded = True
            return
        readers = [self.inputs.base, *self.inputs.experts]
        refs = [self.recipe.schema.base_model, *self.recipe.model_refs]
        for position, (ref, reader) in enumerate(zip(refs, readers, strict=True)):
            if reader is None or not set(split_model_ref(ref).parts) & set(self.inputs.pins):
                continue
            files = None if only is None else sorted(only.get(position - 1, ()))
            local = downloaded_model(
                self.recipe, self.inputs.pins, ref, reader, files, self.options.progress
            )
            reader.close()
            if position == 0:
                self.inputs.base = local
            else:
                self.inputs.experts[position - 1] = local
        self.downloaded = True

    def with_recipe(self, recipe: Recipe, options: MergeOptions) -> MergeSession:
        """A session of another recipe over this session's opened models (``della sweep``'s
        candidates: the models opened and their headers read once, each candidate planned
        from them). Closing it leaves the models open for the next; download first."""
        return MergeSession(
            placed(recipe, self.inputs),
            self.inputs,
            self.device,
            options,
            downloaded=self.downloaded,
            borrowed=True,
        )

    def close(self) -> None:
        if self.borrowed:
            return
        for reader in [self.inputs.base, *self.inputs.experts]:
            if reader is not None:
                reader.close()


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
        """The model ``ref`` names, with its adapter merged in where it has one."""
        nonlocal download_bytes
        parts = split_model_ref(ref)
        model = dequantizing(open_folder(field, parts.model))
        if parts.adapter is None:
            return model
        try:
            commit = (pins or {}).get(parts.adapter)
            opened = open_adapter(field, parts.adapter, recipe_dir, weights, progress, commit)
        except BaseException:
            model.close()
            raise
        if opened.commit is not None:
            resolved_pins[parts.adapter] = opened.commit
        download_bytes += opened.download_bytes
        return with_adapter(model, opened.adapter, ref)

    def open_folder(field: str, ref: str) -> ModelReader:
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
    fields = [model_field(recipe.schema, i) for i in range(len(recipe.model_refs))]
    experts = [attempt(field, ref) for field, ref in zip(fields, recipe.model_refs, strict=True)]
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


def tokenizer_reader(recipe: Recipe, inputs: MergeInputs) -> ModelReader:
    """The model whose tokenizer files the output gets: ``tokenizer_source``, by default the
    base (or, without one, the first model)."""
    index = recipe.tokenizer_model
    if index is not None:
        return inputs.experts[index]
    return inputs.base or inputs.experts[0]


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
        recipe,
        inputs.base,
        inputs.experts,
        options.out_shard_bytes,
        strict=options.strict,
        device=",".join(merge_devices(select_device(options.device))),
    )
    return recipe, inputs, plan


def check_metadata_files(recipe: Recipe, inputs: MergeInputs) -> None:
    """Refuse generation-config and tokenizer files that escape their folders, before
    anything is merged."""
    reference = inputs.base or inputs.experts[0]
    tokenizer = tokenizer_reader(recipe, inputs)
    metadata_files(reference.folder, reference.root, GENERATION_PATTERNS)
    metadata_files(tokenizer.folder, tokenizer.root, TOKENIZER_PATTERNS)


def merge_fingerprint_of(recipe: Recipe, plan: Plan, inputs: MergeInputs) -> str:
    """The resume fingerprint of this merge (see ``io.journal.merge_fingerprint``)."""
    layout = [[(t.name, t.dtype, list(t.shape)) for t in shard] for shard in plan.shards]
    readers = [reader for reader in [inputs.base, *inputs.experts] if reader]
    folders = [folder for reader in readers for folder in input_folders(reader)]
    return merge_fingerprint(recipe.text, recipe.seed, layout, folders)
