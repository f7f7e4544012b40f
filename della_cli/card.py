"""The model card (README.md) of a merged model: front matter for the Hub, then what went in.

A card someone would publish as it is: a title, a paragraph saying what was merged and how,
the license carried over from the base, each model with its role, parameters and link, only
the parameters the method uses, the recipe as the user wrote it (with no absolute path of the
user's machine), and what reproduces the merge (tool version, seed, pinned commits).
"""

from __future__ import annotations

import yaml

from della_cli import __version__
from della_cli.card_inputs import display_name, license_conflict, model_license, public_recipe
from della_cli.methods import Rescale
from della_cli.model_ref import has_adapter, split_model_ref
from della_cli.recipe import Recipe, parameter_attribute

# Re-exported: the API imports what a card names of its inputs from here.
__all__ = ["display_name", "license_conflict", "model_license", "public_recipe", "render_card"]

HUB_URL = "https://huggingface.co"
_RESCALE_NAMES = {
    Rescale.KEEP_PROB: "true (each survivor divided by its keep probability, as in the papers)",
    Rescale.L1: "l1 (the task vector's L1 norm restored, as mergekit >= 0.1.0 does)",
    Rescale.NONE: "false (survivors kept as they are)",
}


def front_matter(recipe: Recipe, pins: dict[str, str], license: str | None = None) -> dict:
    """Hub metadata: the Hub inputs as ``base_model`` (relation ``merge``), the license,
    tags, and every input with the commit it was pinned to (local ones by folder name)."""
    schema = recipe.schema
    refs = _input_refs(recipe)
    front: dict = {}
    if license:
        front["license"] = license
    hub_ids = [p.split("@")[0] for ref in refs for p in split_model_ref(ref).parts if p in pins]
    if hub_ids:
        front["base_model"] = list(dict.fromkeys(hub_ids))
        front["base_model_relation"] = "merge"
    front["tags"] = list(dict.fromkeys(["merge", "della", recipe.method.name]))
    front["library_name"] = "transformers"
    front["merge_inputs"] = [_input_entry(ref, ref == schema.base_model, pins) for ref in refs]
    return front


def _input_entry(ref: str, is_base: bool, pins: dict[str, str]) -> dict:
    """One input of the front matter: its name, role, and commit (or 'local folder'); a
    model with an adapter, the adapter's too."""
    parts = split_model_ref(ref)
    entry = {"model": display_name(parts.model, pins), "role": "base" if is_base else "model"}
    entry.update(_pinned(parts.model, pins))
    if parts.adapter is not None:
        entry["adapter"] = {
            "model": display_name(parts.adapter, pins),
            **_pinned(parts.adapter, pins),
        }
    return entry


def _pinned(ref: str, pins: dict[str, str]) -> dict:
    return {
        **({"revision": ref.split("@")[1]} if ref in pins and "@" in ref else {}),
        **({"commit": pins[ref]} if ref in pins else {"source": "local folder"}),
    }


def _input_refs(recipe: Recipe) -> list[str]:
    base = recipe.schema.base_model
    return ([base] if base else []) + [ref for ref in recipe.model_refs if ref != base]


def render_card(
    recipe: Recipe,
    title: str,
    pins: dict[str, str] | None = None,
    licenses: dict[str, str | None] | None = None,
) -> str:
    """The card. ``pins`` maps each Hub input's reference to the commit it resolved to;
    ``licenses`` each input's declared license (the base's is the output's)."""
    pins, licenses = pins or {}, licenses or {}
    base = recipe.schema.base_model
    license = licenses.get(base) if base else None
    local_refs = [ref for ref in _input_refs(recipe) if ref not in pins]
    lines = [
        "---",
        yaml.safe_dump(front_matter(recipe, pins, license), sort_keys=False).rstrip(),
        "---",
        f"# {title}",
        "",
        describe(recipe, pins),
        "",
        "## Models",
        "",
        *_model_table(recipe, pins),
        "",
        *_layer_lines(recipe, pins),
        *_parameter_lines(recipe),
        "## Recipe",
        "",
        "```yaml",
        public_recipe(recipe.text, local_refs).rstrip(),
        "```",
        "",
        "## Reproducing it",
        "",
        *_reproduce_lines(recipe, pins),
        "",
    ]
    if license:
        lines += ["## License", "", f"{license}, the license of the base model.", ""]
    return "\n".join(lines)


def describe(recipe: Recipe, pins: dict[str, str]) -> str:
    """One paragraph on what was merged and how."""
    spec = recipe.method
    base = recipe.schema.base_model
    experts = [ref for ref in recipe.model_refs if ref != base]
    names = _join([f"`{display_name(ref, pins)}`" for ref in experts])
    if spec.catalog is not None:
        around = f" with the base `{display_name(base, pins)}`" if base else ""
        what = (
            f"This model merges {_count(experts, 'model')}, {names}{around}, by "
            f"{spec.name}: {spec.summary}."
        )
    elif spec.on_deltas:
        what = (
            f"This model merges {_count(experts, 'fine-tuned model')}, {names}, into their "
            f"common base `{display_name(base, pins)}`: each one's task vector (its difference "
            f"from the base) goes through {spec.name} ({spec.summary}) and the result is "
            "added to the base."
        )
    else:
        what = f"This model is a weighted average of {_count(experts, 'model')}, {names}."
    return (
        f"{what} Method: {spec.paper}. It was made without training by della {__version__}, "
        "which streams every tensor of the inputs through the merge; the recipe below "
        "reproduces it."
    )


def _count(items: list[str], noun: str) -> str:
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _model_table(recipe: Recipe, pins: dict[str, str]) -> list[str]:
    spec, base = recipe.method, recipe.schema.base_model
    columns = list(spec.expert_parameters)
    if not columns:
        return _model_list(recipe, pins)
    rows = [
        "| model | role | " + " | ".join(columns) + " | source |",
        "|---" * (len(columns) + 3) + "|",
    ]
    if base:
        rows.append(
            f"| {_linked(base, pins)} | base | "
            + "– | " * len(columns)
            + _source(base, pins)
            + " |"
        )
    for index, ref in enumerate(recipe.model_refs):
        if ref == base:
            continue
        params = recipe.expert_params(index, "")
        values = " | ".join(
            "per slice"
            if recipe.schema.slices is not None
            else _varying(recipe, index, name) or _value(getattr(params, name))
            for name in columns
        )
        rows.append(f"| {_linked(ref, pins)} | model | {values} | {_source(ref, pins)} |")
    return rows


def _layer_lines(recipe: Recipe, pins: dict[str, str]) -> list[str]:
    """Under ``slices:``, where each output layer comes from (the parameters of each slice
    are in the recipe below)."""
    from della_cli.recipe_slices import describe_layer_map, output_layers

    slices = recipe.schema.slices
    if slices is None:
        return []
    layer_map = describe_layer_map(slices, lambda ref: display_name(ref, pins))
    count = output_layers(slices)
    return [
        "## Layers",
        "",
        f"{count} layers, from slices of the models ({layer_map}); each slice's parameters "
        "are in the recipe below.",
        "",
    ]


def _varying(recipe: Recipe, index: int | None, name: str) -> str | None:
    """A parameter that varies by tensor (gradient, filters) as the recipe writes it, with
    the scope it falls back to; None when its value is one for every tensor."""
    from della_cli.recipe_settings import describe, varies

    top = getattr(recipe.schema.parameters, name)
    own = None if index is None else getattr(recipe.schema.models[index].parameters, name)
    if not varies(own) and not (own is None and varies(top)):
        return None
    first, rest = (own, top) if own is not None else (top, None)
    return describe(first) + (f" else {describe(rest)}" if rest is not None else "")


def _model_list(recipe: Recipe, pins: dict[str, str]) -> list[str]:
    """The models of a method with no per-model parameter (slerp)."""
    base = recipe.schema.base_model
    rows = ["| model | role | source |", "|---|---|---|"]
    if base:
        rows.append(f"| {_linked(base, pins)} | base | {_source(base, pins)} |")
    rows += [
        f"| {_linked(ref, pins)} | model | {_source(ref, pins)} |"
        for ref in recipe.model_refs
        if ref != base
    ]
    return rows


def _value(value: object) -> str:
    """A parameter's value as the card shows it (``–`` where none is set)."""
    if value is None:
        return "–"
    return str(value).lower() if isinstance(value, bool) else f"{value:g}"


def _linked(ref: str, pins: dict[str, str]) -> str:
    if has_adapter(ref):
        return "+".join(_linked(part, pins) for part in split_model_ref(ref).parts)
    name = display_name(ref, pins)
    return f"[{name}]({HUB_URL}/{name})" if ref in pins else name


def _source(ref: str, pins: dict[str, str]) -> str:
    if has_adapter(ref):
        model, adapter = split_model_ref(ref).parts
        return f"{_source(model, pins)} + adapter {_source(adapter, pins)}"
    return f"commit `{pins[ref][:12]}`" if ref in pins else "local folder"


def _parameter_lines(recipe: Recipe) -> list[str]:
    """The merge-wide parameters the method uses, and nothing it ignores."""
    spec, merge_wide = recipe.method, recipe.global_params()
    lines = ["## Parameters", ""]
    if spec.catalog is not None:
        values = recipe.method_values("")
        lines += [
            f"- {name}: {_varying(recipe, None, parameter_attribute(name)) or _value(value)}"
            for name, value in values.items()
        ]
    elif spec.on_deltas:
        lambda_ = _varying(recipe, None, "lambda_") or f"{merge_wide.lambda_:g}"
        lines.append(f"- lambda: {lambda_} (the merged task vector's scale)")
    if spec.catalog is None:
        normalize = _varying(recipe, None, "normalize") or str(merge_wide.normalize).lower()
        lines.append(f"- normalize: {normalize}")
    if spec.is_random:
        lines.append(f"- rescale: {_RESCALE_NAMES[merge_wide.rescale]}")
        lines.append(f"- seed: {recipe.seed} (every random draw follows from it)")
    if recipe.schema.dtype:
        lines.append(f"- computed in {recipe.schema.dtype}")
    if recipe.schema.out_dtype:
        lines.append(f"- written as {recipe.schema.out_dtype}")
    return [*lines, ""]


def _reproduce_lines(recipe: Recipe, pins: dict[str, str]) -> list[str]:
    lines = [
        f"With della {__version__} (`pip install della-cli`), from this folder's "
        "`della_recipe.yaml`:",
        "",
        "```",
        "della merge della_recipe.yaml ./merged",
        "```",
        "",
    ]
    if pins:
        lines.append("The Hub inputs were read at these commits:")
        lines.append("")
        lines += [f"- {display_name(ref, pins)}: `{commit}`" for ref, commit in pins.items()]
        lines.append("")
    parts = [part for ref in _input_refs(recipe) for part in split_model_ref(ref).parts]
    local = [part for part in dict.fromkeys(parts) if part not in pins]
    if local:
        names = ", ".join(f"`{display_name(ref)}`" for ref in local)
        lines.append(f"Local inputs ({names}) must be put where the recipe names them.")
    return lines
