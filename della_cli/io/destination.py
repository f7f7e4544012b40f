"""Which folder a merge may write, and which one ``--overwrite`` may replace.

``--overwrite`` replaces a folder only if it holds nothing but a model's files (weights, index,
config, generation config, tokenizer files, card, della's recipe and journal): anything else
(notes, a recipe, a subfolder, an input model) is refused, naming what is there, before any
work starts. Some places are never an output whatever they hold: an empty or ``.`` path (a
script's unset ``$OUT``), ``/``, the home folder, the working directory, a folder holding the
recipe or an input, or an ancestor of one of them, and a mount point (a rename cannot replace
one). The checks run in the plan and again, under the lock, just before the output is
replaced.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from pathlib import Path

from della_cli.errors import OutputError
from della_cli.io.journal import JOURNAL_NAME
from della_cli.io.metadata import GENERATION_PATTERNS, TOKENIZER_PATTERNS

TEMP_MARKER = ".della-tmp-"
MARKER_NAME = ".della-partial"  # inside a temporary folder della made (see ``output``)
CHAT_TEMPLATES = "additional_chat_templates"
# A model's own files: weights and index, config, generation config, every tokenizer or
# processor file (``metadata``; the additional_chat_templates folder is checked apart), the
# card, della's recipe, journal and temporary-folder marker.
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    *GENERATION_PATTERNS,
    *(pattern for pattern in TOKENIZER_PATTERNS if not pattern.startswith(CHAT_TEMPLATES)),
    "README.md",
    "della_recipe.yaml",
    JOURNAL_NAME,
    MARKER_NAME,
)
_SHOWN = 3  # offending entries named in a refusal


def output_path(out: Path) -> Path:
    """``out`` made absolute with its folder resolved but not its own name (a symlink at
    ``out`` is looked at, never followed); refuses paths that name no new folder."""
    if out.name in ("", ".", ".."):
        raise OutputError(
            f"output '{out}' names no folder of its own (empty, '.', '..' or '/'); give the "
            "path of the folder to write, e.g. merged/"
        )
    return Path(os.path.abspath(out)).parent.resolve() / out.name


def staging_path(out: Path) -> Path:
    """The temporary sibling a merge into ``out`` is written to (a fixed name, so that a merge
    killed outright can be resumed from it)."""
    out = output_path(out)
    return out.parent / f".{out.name}{TEMP_MARKER}partial"


def is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILE_PATTERNS)


def foreign_entries(folder: Path) -> list[str]:
    """What in ``folder`` is not a model's file (a subfolder shows as ``name/``)."""
    foreign = []
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                if entry.name != CHAT_TEMPLATES or _has_folders(Path(entry.path)):
                    foreign.append(entry.name + "/")
            elif not is_model_file(entry.name):
                foreign.append(entry.name)
    return foreign


def _has_folders(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_dir(follow_symlinks=False) for entry in entries)


def check_overlaps(out: Path, path: Path, inputs: list[Path], recipe: Path | None) -> None:
    """Refuse an output that is, holds or lies in an input, holds the recipe, or whose
    temporary path is an input."""
    staging = staging_path(path)
    for folder in inputs:
        folder = folder.resolve()
        if path == folder or path.is_relative_to(folder) or folder.is_relative_to(path):
            raise OutputError(
                f"output {out} overlaps input model folder {folder}; "
                "choose a path outside the inputs"
            )
        if folder == staging or folder.is_relative_to(staging):
            raise OutputError(
                f"input model folder {folder} sits at della's temporary path for {out}; "
                "move or rename it, or choose another output"
            )
    places = [Path(os.path.abspath(recipe)).parent.resolve(), recipe.resolve()] if recipe else []
    if any(place.is_relative_to(path) for place in places):
        raise OutputError(
            f"output {out} holds the recipe {recipe}; choose another output or move the recipe"
        )


def check_replaceable(path: Path) -> None:
    """Refuse to replace ``path`` unless it is a plain folder of model files in a place that
    is never an output (see the module docstring)."""
    for place, role in ((Path.home(), "the home folder"), (Path.cwd(), "the working directory")):
        with contextlib.suppress(OSError):
            if place.resolve().is_relative_to(path):
                raise OutputError(
                    f"output {path} is or holds {role}; --overwrite never replaces it: "
                    "choose a folder of its own for the merged model"
                )
    if path.parent == path or os.path.ismount(path):
        raise OutputError(
            f"output {path} is a mount point, which a rename cannot replace; write into a "
            "new folder inside it, or remove its contents first"
        )
    foreign = foreign_entries(path)
    if foreign:
        more = len(foreign) - _SHOWN
        shown = ", ".join(foreign[:_SHOWN]) + (f" and {more} more" if more > 0 else "")
        raise OutputError(
            f"output {path} holds files that are not a model's ({shown}); --overwrite replaces "
            "only a folder of model files: move them away or choose another output"
        )
