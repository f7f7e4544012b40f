"""What a merged folder holds besides its weights, written into the staging folder once the
weights are: config.json (with the layer count of slices, the FP8 quantization_config), the
generation config, the tokenizer (copied, or the union the merge built, with the recipe's chat
template), the model card and the recipe; then the output's own check before it is published.
A merge (``api``), a part assembly (``assemble``) and a sweep's batch all finish this way."""

from __future__ import annotations

from pathlib import Path

from della_cli.card import license_conflict, model_license, public_recipe, render_card
from della_cli.engine import MergeInputs, WarningCallback
from della_cli.errors import MergeFailure, ModelError
from della_cli.io.metadata import (
    GENERATION_PATTERNS,
    TOKENIZER_PATTERNS,
    copy_metadata,
    metadata_files,
    write_config,
)
from della_cli.io.reader import ModelReader
from della_cli.layer_map import output_config
from della_cli.model_ref import split_model_ref
from della_cli.plan import Plan
from della_cli.quant.requantize import with_quantization
from della_cli.recipe import Recipe
from della_cli.session import MergeOptions, tokenizer_reader
from della_cli.tokenizer_union import write_tokenizer
from della_cli.verify import verify_model

RECIPE_FILE = "della_recipe.yaml"


def write_model_files(
    recipe: Recipe, plan: Plan, inputs: MergeInputs, staging: Path, title: str, warn
) -> None:
    """Everything of the output but its weights: config, generation config, tokenizer (with
    the recipe's chat template), card and recipe."""
    reference = inputs.base or inputs.experts[0]
    write_config(
        with_quantization(output_config(reference.config, plan.layer_map), plan.quantization),
        staging,
        plan.config_dtype if plan.quantization is None else None,
        plan.tie_word_embeddings,
        plan.vocab_size,
    )
    copy_metadata(reference.folder, staging, reference.root, GENERATION_PATTERNS)
    tokenizer = tokenizer_reader(recipe, inputs)
    copy_metadata(tokenizer.folder, staging, tokenizer.root, TOKENIZER_PATTERNS)
    if plan.vocabulary is not None:  # a tokenizer the merge builds (union, tokens:)
        write_tokenizer(staging, plan.vocabulary.tokenizer)
    if recipe.schema.chat_template:
        _set_chat_template(recipe, inputs, staging, warn)
    _write_card_and_recipe(recipe, inputs, staging, title, warn)


def check_output(staging: Path, warn, read_values: bool, options: MergeOptions) -> None:
    """The output's own check before it is published; with ``read_values`` (an input held
    NaN or Inf, or shards come from an earlier run) its values are read for NaN and Inf too,
    unless ``--allow-nonfinite``."""
    _check_own_output(staging, warn)
    if read_values and not options.allow_nonfinite:
        _check_finite_output(staging)


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
    parts = [part for ref in readers for part in split_model_ref(ref).parts]
    local = [part for part in parts if part not in inputs.pins]
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


def _check_finite_output(staging: Path) -> None:
    """Refuse to publish an output holding NaN or Inf: a model that generates garbage must not
    reach a user's folder or the Hub unnoticed (``--allow-nonfinite`` keeps it). Only read
    when an input held NaN or Inf (every kernel propagates them, so a merge of finite inputs
    is finite) or when shards come from an earlier run."""
    from della_cli.verify import non_finite_tensors

    reader = ModelReader(staging, "the merged output")
    try:
        found = non_finite_tensors(reader)
    finally:
        reader.close()
    if found:
        raise ModelError(
            f"the merged output holds {found[0]}; nothing was published: fix or leave out the "
            "inputs warned about, or pass --allow-nonfinite to keep it"
        )
