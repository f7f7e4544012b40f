"""The model card (README.md) of a merged model: front matter for the Hub, then what went in."""

from __future__ import annotations

from pathlib import Path

import yaml

from della_cli.errors import RecipeError
from della_cli.methods import Rescale
from della_cli.recipe import Recipe, load_yaml

_RESCALE_NAMES = {Rescale.KEEP_PROB: "true (1/p)", Rescale.L1: "l1", Rescale.NONE: "false"}


def display_name(ref: str, pins: dict[str, str] | None = None) -> str:
    """A model's name for the card: Hub inputs as ``org/name@commit`` (short), local folders
    by their own name only, so that the user's file system layout does not leak into a
    published card."""
    if pins and ref in pins:
        return f"{ref.split('@')[0]}@{pins[ref][:12]}"
    path = Path(ref).expanduser()
    if ref.startswith((".", "/", "~")) or path.exists():
        return path.resolve().name or ref
    return ref


def public_recipe(text: str, local_refs: list[str]) -> str:
    """The recipe text with each local model path replaced by the folder's own name.

    The text is edited in place (comments and layout stay); if a path is still among the
    values it then parses to (spelled with escapes, say, which a text replacement misses),
    the recipe is written anew from its values with the names replaced instead."""
    names = {ref: display_name(ref) for ref in set(local_refs)}
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


def front_matter(recipe: Recipe, pins: dict[str, str]) -> dict:
    """Hub metadata: the Hub inputs as ``base_model`` (relation ``merge``), tags, and every
    input with the commit it was pinned to (local ones by folder name only)."""
    schema = recipe.schema
    refs = ([schema.base_model] if schema.base_model else []) + [
        ref for ref in recipe.model_refs if ref != schema.base_model
    ]
    front: dict = {}
    hub_ids = [ref.split("@")[0] for ref in refs if ref in pins]
    if hub_ids:
        front["base_model"] = list(dict.fromkeys(hub_ids))
        front["base_model_relation"] = "merge"
    front["tags"] = list(dict.fromkeys(["merge", "della", recipe.method.name]))
    front["library_name"] = "transformers"
    front["merge_inputs"] = [
        {
            "model": ref.split("@")[0] if ref in pins else display_name(ref),
            "role": "base" if ref == schema.base_model else "model",
            **({"revision": ref.split("@")[1]} if ref in pins and "@" in ref else {}),
            **({"commit": pins[ref]} if ref in pins else {"source": "local folder"}),
        }
        for ref in refs
    ]
    return front


def render_card(recipe: Recipe, title: str, seed: int, pins: dict[str, str] | None = None) -> str:
    """The card; ``pins`` maps each Hub input's reference to the commit it resolved to."""
    pins = pins or {}
    schema, spec = recipe.schema, recipe.method
    front = front_matter(recipe, pins)
    local_refs = [r for r in [schema.base_model, *recipe.model_refs] if r and r not in pins]
    rows = []
    for index, ref in enumerate(recipe.model_refs):
        params = recipe.expert_params(index, "")
        values = {name: getattr(params, name) for name in spec.expert_parameters}
        rows.append(
            f"| {display_name(ref, pins)} | "
            + " | ".join(f"{values[n]:g}" for n in spec.expert_parameters)
            + " |"
        )
    header = "| model | " + " | ".join(spec.expert_parameters) + " |"
    rule = "|---" * (len(spec.expert_parameters) + 1) + "|"
    merge_wide = recipe.global_params()
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        f"# {title}",
        "",
        f"A merge of pre-trained language models made with della using **{spec.name}** "
        f"({spec.summary}; {spec.paper}).",
        "",
        "## Models",
        "",
        f"Base model: {display_name(schema.base_model, pins) if schema.base_model else 'none'}",
        "",
        header,
        rule,
        *rows,
        "",
        "## Merge-wide parameters",
        "",
        f"- lambda: {merge_wide.lambda_:g}" if spec.on_deltas else "- lambda: not used",
        f"- normalize: {str(merge_wide.normalize).lower()}",
        f"- rescale: {_RESCALE_NAMES[merge_wide.rescale]}"
        if spec.is_random
        else "- rescale: not used",
        f"- seed: {seed}",
        "",
        "## Recipe",
        "",
        "```yaml",
        public_recipe(recipe.text, local_refs).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
