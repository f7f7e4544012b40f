"""mergekit's leniency: recipes mergekit 0.1.5 runs that della's strict schema alone would refuse.

mergekit ignores what a method does not read (a parameter of another method, a merge-wide
parameter set per model, the base's own entry under ``models``, a top-level ``name``), reads a
key given twice with one value once, and has defaults for density (1.0) and epsilon (0.15)
(MERGEKIT-SEMANTICS.md). ``adapt_recipe`` rewrites such a recipe into della's schema before it
is checked and returns one note per leniency, shown in the plan as a warning: accepted, never
silently. Anything mergekit would not run the same way stays an error that names the field.
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml

from della_cli.errors import RecipeError
from della_cli.methods import METHODS, MethodSpec, Sparsifier
from della_cli.methods.catalog import CATALOG
from della_cli.methods.registry import GLOBAL_PARAMETERS

# Methods of mergekit 0.1.5 that della does not run yet.
MERGEKIT_ONLY_METHODS = tuple(name for name in CATALOG if name not in METHODS)
# Every parameter name a mergekit 0.1.5 method declares; a method ignores the others' names.
MERGEKIT_PARAMETERS = frozenset(
    {
        "alpha",
        "density",
        "eps",
        "epsilon",
        "filter_wise",
        "gamma",
        "int8_mask",
        "lambda",
        "max_iter",
        "normalize",
        "normalize_weights",
        "nuslerp_flatten",
        "nuslerp_row_wise",
        "r",
        "rescale",
        "scale",
        "select_topk",
        "t",
        "tol",
        "weight",
    }
)
# mergekit's defaults for the per-model parameters della once required.
MERGEKIT_DEFAULTS = {"density": 1.0, "epsilon": 0.15}
_DEFAULT_EFFECT = {"density": " (every delta is kept)", "epsilon": ""}
MERGE_WIDE = (*GLOBAL_PARAMETERS, "int8_mask")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")


def check_method(method: Any) -> None:
    """Say first, by name, that a recipe's method is one della lacks (before any of the
    parameters that method would take is reported as unknown)."""
    if not isinstance(method, str) or method in METHODS:
        return
    if method in MERGEKIT_ONLY_METHODS:
        raise RecipeError(
            f"merge_method: della does not implement mergekit's '{method}' method yet; "
            f"it runs {', '.join(METHODS)}"
        )
    close = difflib.get_close_matches(method, list(METHODS), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"one of {', '.join(METHODS)}"
    raise RecipeError(f"merge_method: unknown method '{method}'; {hint}")


def adapt_recipe(data: dict, module: Any = None) -> tuple[dict, list[str]]:
    """``data`` (a recipe mapping from YAML) in della's schema, and the notes saying what was
    ignored or defaulted as mergekit does. Parts of the wrong shape are left as they are, for
    the schema check to report. ``module``: the parameters of ``modules: {default: ...}``,
    which count as set for every model."""
    check_method(data.get("merge_method"))
    data = dict(data)
    notes: list[str] = []
    if "name" in data:
        notes.append(
            "name: the model card's title (it names a stage of a multi-stage file; this file "
            "is one)"
        )
    _adapt_tokenizer(data)
    _drop_empty_parameters(data)
    method = data.get("merge_method")
    spec = METHODS.get(method) if isinstance(method, str) else None
    if spec is None:
        return data, notes
    _drop_base_entry(data, spec, notes)
    _drop_unused_parameters(data, spec, notes)
    _note_defaults(data, spec, notes, module)
    return data, notes


def _adapt_tokenizer(data: dict) -> None:
    """``tokenizer: {source: ...}`` read as ``tokenizer_source`` (no source: union, as
    mergekit reads it); its other keys stay under ``tokenizer``."""
    if "tokenizer" not in data:
        return
    block = data.pop("tokenizer")
    if block is None:
        return
    if data.get("tokenizer_source") is not None:
        raise RecipeError(
            "tokenizer: give either tokenizer or tokenizer_source, not both (mergekit refuses both)"
        )
    if not isinstance(block, dict):
        raise RecipeError(f"tokenizer: must be a mapping with a source, got {block!r}")
    for key in block:
        if key not in TOKENIZER_KEYS:
            close = difflib.get_close_matches(str(key), TOKENIZER_KEYS, n=1)
            known = ", ".join(TOKENIZER_KEYS)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {known}"
            raise RecipeError(f"tokenizer.{key}: unknown key; {hint}")
    source = block.get("source", "union")  # mergekit's default source
    if not isinstance(source, str):
        raise RecipeError(
            f"tokenizer.source: must be union, base or a model's name, got {source!r}"
        )
    data["tokenizer_source"] = source
    rest = {key: value for key, value in block.items() if key != "source"}
    if rest:
        data["tokenizer"] = rest  # tokens and pad_to_multiple_of: recipe_tokenizer checks them


def _drop_empty_parameters(data: dict) -> None:
    """``parameters:`` with nothing after it (null), at the top or for a model, is no
    parameters, as mergekit reads it."""
    if "parameters" in data and data["parameters"] is None:
        del data["parameters"]
    models = data.get("models")
    if isinstance(models, list):
        data["models"] = [
            {k: v for k, v in entry.items() if not (k == "parameters" and v is None)}
            if isinstance(entry, dict)
            else entry
            for entry in models
        ]


def _entries(data: dict) -> list[tuple[int, dict]]:
    models = data.get("models")
    if not isinstance(models, list):
        return []
    return [(i, entry) for i, entry in enumerate(models) if isinstance(entry, dict)]


def _drop_base_entry(data: dict, spec: MethodSpec, notes: list[str]) -> None:
    """The base listed under ``models``: skipped with its parameters by a method on task
    vectors (its task vector is zero); an ordinary input of linear."""
    base = data.get("base_model")
    if not isinstance(base, str):
        return
    listed = [i for i, entry in _entries(data) if entry.get("model") == base]
    if not listed:
        return
    index = listed[0]
    if spec.on_deltas:
        data["models"] = [e for i, e in enumerate(data["models"]) if i not in listed]
        what = "merges task vectors" if spec.catalog is None else "takes it as the base"
        notes.append(
            f"models.{index}: '{base}' is the base model; {spec.name} {what}, so "
            "this entry and its parameters are ignored, as mergekit ignores them"
        )
    else:
        notes.append(
            f"models.{index}: '{base}' is the base model and is listed, so {spec.name} "
            "averages it as one of the models, as mergekit does"
        )


def _drop_unused_parameters(data: dict, spec: MethodSpec, notes: list[str]) -> None:
    """Parameters mergekit knows but this method does not read, and merge-wide ones set per
    model (mergekit reads those only from the top level), are ignored with a note. A
    ``rescale: true`` on a magnitude method stays an error: mergekit would rescale there."""
    used = {*spec.expert_parameters, *spec.global_parameters}
    top = data.get("parameters")
    blocks = [("parameters", top)] + [
        (f"models.{i}.parameters", entry.get("parameters")) for i, entry in _entries(data)
    ]
    for prefix, block in blocks:
        if not isinstance(block, dict):
            continue
        per_model = prefix != "parameters"
        for key in list(block):
            if key not in MERGEKIT_PARAMETERS or (key == "int8_mask" and not per_model):
                continue  # unknown to mergekit too: the schema names the nearest known key
            rescales = key == "rescale" and block[key] not in (False, None, "false")
            magnitude = (Sparsifier.MAGNITUDE, Sparsifier.MAGNITUDE_OUTLIERS)
            if not per_model and rescales and spec.sparsifier in magnitude:
                continue  # mergekit would rescale the kept deltas: the schema refuses it
            shared = (*MERGE_WIDE, *spec.global_parameters)
            if per_model and key in shared and (key in used or key == "int8_mask"):
                value = _merge_wide_value(key, top, spec)
                notes.append(
                    f"{prefix}.{key}: ignored, as mergekit ignores it: {key} applies to the "
                    f"whole merge and is read only under parameters (the merge uses {value})"
                )
            elif key not in used:
                notes.append(
                    f"{prefix}.{key}: ignored, as mergekit ignores it: {spec.name} does not "
                    f"use {key}"
                )
            else:
                continue
            del block[key]


def _merge_wide_value(key: str, top: Any, spec: MethodSpec) -> str:
    """The value the merge uses for a merge-wide parameter, as the recipe would write it."""
    defaults = {p.name: p.default for p in spec.catalog.parameters} if spec.catalog else {}
    if isinstance(top, dict) and key in top:
        value = top[key]
    elif key in defaults:
        value = "not set" if defaults[key] is None else defaults[key]
    else:
        value = {"lambda": 1.0, "normalize": spec.normalize_default, "int8_mask": False}.get(
            key,
            spec.is_random,  # rescale: on by default where della rescales
        )
    return str(value).lower() if isinstance(value, bool) else str(value)


def _note_defaults(data: dict, spec: MethodSpec, notes: list[str], module: Any = None) -> None:
    """Say where density or epsilon takes mergekit's default (``Recipe.expert_params`` uses
    it)."""
    top = data.get("parameters")
    entries = _entries(data)
    for name, default in MERGEKIT_DEFAULTS.items():
        if name not in spec.expert_parameters:
            continue
        if any(isinstance(block, dict) and name in block for block in (top, module)):
            continue
        lacking = [
            str(entry.get("model"))
            for _, entry in entries
            if not (isinstance(entry.get("parameters"), dict) and name in entry["parameters"])
        ]
        if not lacking:
            continue
        whom = "" if len(lacking) == len(entries) else f" for {', '.join(map(repr, lacking))}"
        notes.append(
            f"parameters.{name}: not set{whom}; mergekit's default {default} is used"
            f"{_DEFAULT_EFFECT[name]}"
        )


def duplicate_key_notes(text: str) -> list[str]:
    """A note for each key given twice with the same value (the loader refuses two values):
    read once, as mergekit reads it."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    notes: list[str] = []
    visited: set[int] = set()

    def walk(node: yaml.Node, path: str) -> None:
        if id(node) in visited:  # an alias: its node was walked where it was defined
            return
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                here = f"{path}.{key}" if path else key
                if key in seen:
                    notes.append(f"{here}: given twice with the same value; read once")
                seen.add(key)
                walk(value_node, here)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, f"{path}.{index}" if path else str(index))

    if root is not None:
        walk(root, "")
    return notes
