"""Where a model named in a recipe is: a local folder or a Hub model, and what a user most
likely meant when it is neither."""

from __future__ import annotations

import os
from pathlib import Path

from della_cli.errors import ModelError, shown
from della_cli.hub import HubRef, parse_hub_ref


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
