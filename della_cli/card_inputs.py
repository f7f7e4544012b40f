"""How a published card names its inputs: Hub models as ``org/name``, local folders by their
own name (no path of the user's machine leaks into the card or the recipe shown in it), and
the licenses the inputs' own cards declare."""

from __future__ import annotations

from pathlib import Path

import yaml

from della_cli.errors import RecipeError
from della_cli.model_ref import has_adapter, split_model_ref
from della_cli.recipe import load_yaml


def display_name(ref: str, pins: dict[str, str] | None = None) -> str:
    """A model's name for the card: Hub inputs as ``org/name``, local folders by their own
    name only, so that the user's file system layout does not leak into a published card. A
    model with an adapter is named as the recipe names it, ``model+adapter``."""
    if has_adapter(ref):
        return "+".join(display_name(part, pins) for part in split_model_ref(ref).parts)
    if pins and ref in pins:
        return ref.split("@")[0]
    path = Path(ref).expanduser()
    if ref.startswith((".", "/", "~")) or path.exists():
        return path.resolve().name or ref
    return ref


def public_recipe(text: str, local_refs: list[str]) -> str:
    """The recipe text as the user wrote it, except that a local model given by an absolute
    (or ``~``) path is named by its folder's own name: relative paths say nothing about the
    machine and stay as typed, so the recipe still reads as written.

    The text is edited in place (comments and layout stay); if a path is still among the
    values it then parses to (spelled with escapes, say, which a text replacement misses),
    the recipe is written anew from its values with the names replaced instead."""
    parts = {part for ref in local_refs for part in split_model_ref(ref).parts}
    private = [ref for ref in parts if ref.startswith(("/", "~"))]
    names = {ref: display_name(ref) for ref in private}
    names = {ref: name for ref, name in names.items() if name != ref}
    public = text
    for ref in sorted(names, key=len, reverse=True):
        public = public.replace(ref, names[ref])
    try:
        if not _strings(load_yaml(public)) & set(names):
            return public
    except (yaml.YAMLError, RecipeError, RecursionError, ValueError):
        pass
    values = _renamed(load_yaml(text), names)
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def _strings(value: object) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*map(_strings, value), *map(_strings, value.values()))
    if isinstance(value, list):
        return set().union(*map(_strings, value))
    return set()


def _renamed(value: object, names: dict[str, str]) -> object:
    if isinstance(value, str):
        return names.get(value, value)
    if isinstance(value, dict):
        return {_renamed(k, names): _renamed(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(item, names) for item in value]
    return value


def model_license(folder: Path) -> str | None:
    """The license a model's own card declares in its front matter (``license:``), if any."""
    card = folder / "README.md"
    try:
        text = card.read_text(errors="replace")[:65536] if card.is_file() else ""
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return None
    value = front.get("license") if isinstance(front, dict) else None
    if isinstance(value, list):  # a list of licenses is allowed on the Hub
        value = ", ".join(str(item) for item in value)
    return str(value) if value else None


def license_conflict(licenses: dict[str, str | None]) -> str | None:
    """A warning when the inputs declare different licenses (the merge inherits each one's
    terms; the card carries only the base's)."""
    declared = {ref: value for ref, value in licenses.items() if value}
    if len(set(declared.values())) <= 1:
        return None
    listed = ", ".join(f"{display_name(ref)}: {value}" for ref, value in declared.items())
    return f"the inputs declare different licenses ({listed}); check that the merge may be shared"
