"""``slices:`` and ``modules:`` read from a recipe's YAML, each key and value checked with the
field path in its message (the format is described in ``recipe_slices``). The parameter
blocks are checked by the caller's checks, passed in, which keeps this module free of the
schema's types."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from della_cli.errors import RecipeError, shown
from della_cli.recipe_slices import MODULE_NAME, OutputSlice, SliceSource

Check = Callable[[Any, str], Any]
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("models", "slices", "parameters")


def unwrap_modules(data: dict, check_parameters: Check) -> tuple[dict, Any, Any]:
    """``data`` with ``modules: {default: {...}}`` unwrapped into top-level ``models`` or
    ``slices``, the module's checked parameters and the mapping they were read from (None
    and None without modules)."""
    if "modules" not in data:
        return data, None, None
    modules = data["modules"]
    for key in ("models", "slices"):
        if key in data:
            raise RecipeError(f"modules: give one of models, slices or modules, not {key} too")
    if not isinstance(modules, dict) or not modules:
        raise RecipeError(f"modules: must be a mapping of module names, got {shown(modules)}")
    for name in modules:
        if name != MODULE_NAME:
            raise RecipeError(
                f"modules.{name}: unknown module; the causal LMs della merges have one module, "
                f"'{MODULE_NAME}'"
            )
    module = modules[MODULE_NAME]
    path = f"modules.{MODULE_NAME}"
    _known_keys(module, path, MODULE_KEYS)
    given = [key for key in ("models", "slices") if module.get(key)]
    if len(given) != 1:
        raise RecipeError(f"{path}: give exactly one of models or slices")
    data = {k: v for k, v in data.items() if k != "modules"}
    data[given[0]] = module[given[0]]
    parameters = module.get("parameters")
    checked = None if parameters is None else check_parameters(parameters, f"{path}.parameters")
    return data, checked, parameters


def read_slices(value: Any, path: str, source_parameters: Check, slice_parameters: Check):
    """The output slices of ``value`` (a recipe's ``slices:`` list), each checked."""
    if not isinstance(value, list) or not value:
        raise RecipeError(f"{path}: must list at least one slice, got {shown(value)}")
    return tuple(
        _read_slice(entry, f"{path}[{index}]", source_parameters, slice_parameters)
        for index, entry in enumerate(value)
    )


def _read_slice(value: Any, path: str, source_parameters: Check, slice_parameters: Check):
    _known_keys(value, path, SLICE_KEYS)
    sources = value.get("sources")
    if not isinstance(sources, list) or not sources:
        raise RecipeError(f"{path}.sources: must list at least one source, got {shown(sources)}")
    read = tuple(
        _read_source(entry, f"{path}.sources[{index}]", source_parameters)
        for index, entry in enumerate(sources)
    )
    first = read[0]
    for index, source in enumerate(read):
        if source.length != first.length:
            raise RecipeError(
                f"{path}.sources[{index}].layer_range: covers {source.length} layers but "
                f"{path}.sources[0] covers {first.length}; every source of a slice covers "
                "as many layers"
            )
        earlier = [i for i, other in enumerate(read[:index]) if other.model == source.model]
        if earlier:
            raise RecipeError(
                f"{path}.sources[{index}].model: '{source.model}' is listed twice in this "
                f"slice (also sources[{earlier[0]}])"
            )
    base = value.get("base_model")
    if base is not None and (not isinstance(base, str) or not base):
        raise RecipeError(f"{path}.base_model: must be a model's name, got {shown(base)}")
    weight = value.get("residual_weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
        raise RecipeError(f"{path}.residual_weight: must be a number, got {shown(weight)}")
    parameters = value.get("parameters")
    if parameters is not None:
        parameters = slice_parameters(parameters, f"{path}.parameters")
    return OutputSlice(read, path, base, parameters, weight)


def _read_source(value: Any, path: str, source_parameters: Check) -> SliceSource:
    _known_keys(value, path, SOURCE_KEYS)
    model = value.get("model")
    if not isinstance(model, str) or not model:
        raise RecipeError(f"{path}.model: must be a model's name, got {shown(model)}")
    if "layer_range" not in value:
        raise RecipeError(f"{path}.layer_range: is required ([start, end) of the model's layers)")
    layers = value["layer_range"]
    integers = (
        isinstance(layers, list)
        and len(layers) == 2
        and all(type(bound) is int for bound in layers)
    )
    if not integers or not 0 <= layers[0] < layers[1]:
        raise RecipeError(
            f"{path}.layer_range: must be [start, end), two integers with 0 ≤ start < end, "
            f"got {shown(layers)}"
        )
    parameters = value.get("parameters")
    checked = source_parameters({} if parameters is None else parameters, f"{path}.parameters")
    return SliceSource(model, layers[0], layers[1], checked)


def _known_keys(value: Any, path: str, keys: tuple[str, ...]) -> None:
    if not isinstance(value, dict):
        raise RecipeError(f"{path}: must be a mapping, got {shown(value)}")
    for key in value:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(keys)}"
            raise RecipeError(f"{path}.{key}: unknown key; {hint}")
