"""Multi-stage files: several recipes in one YAML file, later ones merging earlier ones' outputs.

As ``mergekit-multi`` reads them (MERGEKIT-SEMANTICS.md, "Multi-document files"): each YAML
document is a recipe with an optional top-level ``name``; a model reference (``base_model``, a
model, ``tokenizer_source``) equal to a stage's name means that stage's output. Stages run in
dependency order (document order among independent ones); every named stage is merged into a
folder of intermediates, and the stage without a name (at most one; without one, the last
stage) into OUT. Duplicate names, cycles and two unnamed stages are errors that name the stage.

The intermediates live in a temporary folder beside OUT, removed at the end whatever happens
(each stage's own output is staged and published as every merge is, ``io.output``), unless
``keep`` names a folder to keep them in. ``stage_plans`` plans every stage before the first
runs.
"""

from __future__ import annotations

import dataclasses
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from della_cli.errors import RecipeError
from della_cli.recipe import ModelEntry, Recipe, read_recipe_text, recipe_of
from della_cli.recipe_slices import rebind_slices
from della_cli.recipe_yaml import load_documents, split_documents

INTERMEDIATES_MARK = ".della-stages-"


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage file: its recipe as written, and the stages it reads."""

    number: int  # the document's position in the file, from 1
    recipe: Recipe
    depends_on: tuple[str, ...]

    @property
    def name(self) -> str | None:
        return self.recipe.schema.name

    @property
    def label(self) -> str:
        return (
            f"stage '{self.name}'" if self.name else f"the unnamed stage (document {self.number})"
        )

    def refs(self) -> list[str]:
        schema = self.recipe.schema
        found = [schema.base_model, *self.recipe.model_refs, schema.tokenizer_source]
        return [ref for ref in found if ref]


def read_stages(path: Path) -> list[Stage] | None:
    """The stages of the file ``path`` in the order they run, or None when it holds one
    document (an ordinary recipe). Every document is read under the bounds of one recipe, all
    together, and checked as a recipe; an error names the stage."""
    from della_cli.recipe import yaml_error

    text = read_recipe_text(path)
    try:
        documents = load_documents(text)
    except Exception as error:  # YAML problems, with their line in the whole file
        if isinstance(error, RecipeError):
            raise
        raise yaml_error(str(path), error) from error
    if len(documents) <= 1:
        return None
    pieces = split_documents(text)
    if len(pieces) != len(documents):
        raise RecipeError(
            f"{path}: cannot tell its {len(documents)} YAML documents apart; separate the "
            "stages with a line holding only ---"
        )
    stages = []
    for number, (data, piece) in enumerate(zip(documents, pieces, strict=True), start=1):
        name = data.get("name") if isinstance(data, dict) else None
        label = f"stage '{name}'" if isinstance(name, str) else f"stage {number}"
        try:
            recipe = recipe_of(data, piece, path)
        except RecipeError as error:
            raise RecipeError(f"{path}: {label}: {error}") from None
        notes = tuple(note for note in recipe.schema.notes if not note.startswith("name:"))
        recipe = dataclasses.replace(recipe, schema=dataclasses.replace(recipe.schema, notes=notes))
        stages.append(Stage(number, recipe, ()))
    return order(stages, path)


def order(stages: list[Stage], path: Path) -> list[Stage]:
    """The stages with their dependencies, in the order they run; duplicate names, two unnamed
    stages and cycles are errors naming the stage."""
    by_name: dict[str, Stage] = {}
    unnamed: list[Stage] = []
    for stage in stages:
        if stage.name is None:
            unnamed.append(stage)
        elif stage.name in by_name:
            first = by_name[stage.name].number
            raise RecipeError(
                f"{path}: {stage.label}: the name is given twice (documents {first} and "
                f"{stage.number}); give each stage its own name"
            )
        else:
            by_name[stage.name] = stage
    if len(unnamed) > 1:
        raise RecipeError(
            f"{path}: stages {unnamed[0].number} and {unnamed[1].number} both have no name; at "
            "most one stage may be unnamed (the one written to OUT)"
        )
    stages = [
        dataclasses.replace(s, depends_on=tuple(dict.fromkeys(r for r in s.refs() if r in by_name)))
        for s in stages
    ]
    by_name = {s.name: s for s in stages if s.name}
    ordered: list[Stage] = []
    done: set[int] = set()

    def visit(stage: Stage, trail: list[str]) -> None:
        if stage.number in done:
            return
        if stage.name in trail:
            cycle = " → ".join([*trail[trail.index(stage.name) :], stage.name])
            raise RecipeError(
                f"{path}: stage '{stage.name}': its inputs depend on its own output ({cycle})"
            )
        for name in stage.depends_on:
            visit(by_name[name], [*trail, stage.name])
        done.add(stage.number)
        ordered.append(stage)

    for stage in stages:
        visit(stage, [])
    return ordered


def final_stage(stages: list[Stage]) -> Stage:
    """The stage written to OUT: the unnamed one, else the last in the file."""
    unnamed = [stage for stage in stages if stage.name is None]
    return unnamed[0] if unnamed else max(stages, key=lambda stage: stage.number)


def bind(stage: Stage, folders: dict[str, Path]) -> Recipe:
    """The stage's recipe with each reference to an earlier stage replaced by its folder."""

    def ref(value: str | None) -> str | None:
        return str(folders[value]) if value in folders else value

    schema = stage.recipe.schema
    models = [dataclasses.replace(e, model=ref(e.model)) for e in schema.models]
    schema = dataclasses.replace(
        schema,
        base_model=ref(schema.base_model),
        models=[ModelEntry(m.model, m.parameters) for m in models],
        tokenizer_source=ref(schema.tokenizer_source),
        tokenizer=schema.tokenizer and schema.tokenizer.with_models(ref),
        slices=None if schema.slices is None else rebind_slices(schema.slices, ref),
    )
    return dataclasses.replace(stage.recipe, schema=schema)


def stage_folders(stages: list[Stage], out: Path, intermediates: Path) -> dict[str, Path]:
    """Where each named stage is written: OUT for the final stage, else ``intermediates/NAME``."""
    last = final_stage(stages)
    return {
        stage.name: (out if stage is last else intermediates / stage.name)
        for stage in stages
        if stage.name
    }


@contextmanager
def intermediates_folder(out: Path, keep: Path | None) -> Iterator[Path]:
    """The folder the intermediate stages go to: ``keep`` (made if missing, kept), else a new
    temporary folder beside OUT, removed when the run ends, however it ends."""
    from della_cli.io import interrupts

    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    parent = out.expanduser().absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    folder = parent / f".{out.name}{INTERMEDIATES_MARK}{secrets.token_hex(4)}"
    folder.mkdir()
    try:
        yield folder
    finally:
        with interrupts.deferred():
            shutil.rmtree(folder, ignore_errors=True)


def run_stages(
    stages: list[Stage],
    out: Path,
    keep: Path | None,
    merge: Callable[[Stage, Recipe, Path], object],
) -> list[tuple[Stage, Path, object]]:
    """Merge every stage in order with ``merge(stage, recipe, destination)``; returns each
    stage's destination and what ``merge`` returned."""
    done = []
    with intermediates_folder(out, keep) as folder:
        folders = stage_folders(stages, out, folder)
        last = final_stage(stages)
        for stage in stages:
            destination = out if stage is last else folders[stage.name]
            done.append((stage, destination, merge(stage, bind(stage, folders), destination)))
    return done
