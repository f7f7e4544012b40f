"""Each field of a recipe checked for its type and range, with the field path in every message
(``models.1.parameters.density: must be in (0, 1], got 1.3``); ``read_schema`` turns the YAML
mapping into a ``RecipeSchema``."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any, NoReturn

from della_cli.chat_template import check_chat_template
from della_cli.errors import RecipeError, shown
from della_cli.model_ref import split_model_ref
from della_cli.recipe_schema import (
    BOOLEAN_WORDS,
    DTYPE_CHOICES,
    GlobalParameters,
    ModelEntry,
    ModelParameters,
    RecipeSchema,
)
from della_cli.recipe_settings import check_setting
from della_cli.recipe_slices import slice_models
from della_cli.recipe_slices_read import read_slices
from della_cli.recipe_tokenizer import check_tokenizer_block

# --- the schema: each field's type and range ---------------------------------------------------
#
# Checked by hand rather than by a schema library: pydantic's import and model build took
# about 95 ms of every della command's start-up (medians of 9 runs on the reference machine),
# more than a small merge's whole compute. Each check takes a value and its field path and
# returns the value to keep, or raises a RecipeError that starts with the path.

Check = Callable[[Any, str], Any]


def _fail(path: str, problem: str) -> NoReturn:
    raise RecipeError(f"{path}: {problem}")


def _number(value: Any, path: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(path, f"must be a number, got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range
        _fail(path, f"must be a finite number, got an integer of {len(str(abs(value)))} digits")
    if not math.isfinite(number):
        _fail(path, f"must be a finite number, got {number}")
    return number


def _in_range(low: float, high: float, low_closed: bool, high_closed: bool) -> Check:
    """A number check that also bounds the value (the message shows the interval)."""
    interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"

    def check(value: Any, path: str) -> float | None:
        number = _number(value, path)
        if number is not None:
            above = number >= low if low_closed else number > low
            below = number <= high if high_closed else number < high
            if not (above and below):
                _fail(path, f"must be in {interval}, got {number}")
        return number

    return check


def _integer(value: Any, path: str) -> int | None:
    if value is None:
        return None
    number = _number(value, path)
    if not float(number).is_integer():
        _fail(path, f"must be an integer, got {shown(value)}")
    return int(number)


def _boolean(value: Any, path: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[value.lower()]
    _fail(path, f"must be true or false, got {shown(value)}")


def _rescale(value: Any, path: str) -> bool | str | None:
    if value is None or isinstance(value, bool) or value == "l1":
        return value
    _fail(path, f"must be true, false or l1, got {shown(value)}")


def _string(value: Any, path: str) -> str | None:
    if value is not None and not isinstance(value, str):
        _fail(path, f"must be a string, got {shown(value)}")
    return value


def _required_string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        _fail(path, f"must be a string, got {shown(value)}")
    return value


def _model_name(value: Any, path: str) -> str:
    if not _required_string(value, path):
        _fail(path, "must not be empty")
    try:
        split_model_ref(value)  # model+adapter (model_ref)
    except ValueError as error:
        _fail(path, str(error))
    return value


def _optional_model_name(value: Any, path: str) -> str | None:
    return _model_name(value, path) if _string(value, path) else value


def _dtype(value: Any, path: str) -> str | None:
    if value is not None and value not in DTYPE_CHOICES:
        choices = ", ".join(f"'{name}'" for name in DTYPE_CHOICES[:-1])
        _fail(path, f"must be one of {choices} or '{DTYPE_CHOICES[-1]}', got {shown(value)}")
    return value


def _out_dtype(value: Any, path: str) -> str | None:
    """``dtype``'s choices, or ``fp8`` / ``mxfp4``: the base's own quantized format
    (``della_cli.quant.requantize``)."""
    if value in ("fp8", "mxfp4"):
        return value
    if value is not None and value not in DTYPE_CHOICES:
        choices = ", ".join(f"'{name}'" for name in DTYPE_CHOICES)
        _fail(path, f"must be one of {choices}, 'fp8' or 'mxfp4', got {shown(value)}")
    return value


def _seed(value: Any, path: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int:  # not a bool, not a float that happens to be whole
        _fail(path, f"must be an integer, got {shown(value)}")
    if not 0 <= value < 2**63:
        _fail(path, f"must be an integer in [0, 2**63), got {value}")
    return value


def _tokenizer_source(value: Any, path: str) -> str | None:
    return _string(value, path)  # union, base or a model, checked by check_rules


# Each mapping's keys, in the order an unknown key's message lists them: the attribute each
# fills, and its check.
# Every parameter may be a gradient or a filter list (recipe_settings), each value checked.
PARAMETER_KEYS: dict[str, tuple[str, Check]] = {
    "weight": ("weight", check_setting(_number)),
    "density": ("density", check_setting(_in_range(0, 1, low_closed=False, high_closed=True))),
    "epsilon": ("epsilon", check_setting(_in_range(0, 0.5, low_closed=True, high_closed=False))),
    "gamma": ("gamma", check_setting(_in_range(0, 1, low_closed=True, high_closed=False))),
    "lambda": ("lambda_", check_setting(_number)),
    "normalize": ("normalize", check_setting(_boolean)),
    "rescale": ("rescale", check_setting(_rescale)),
    "t": ("t", check_setting(_number)),
    "scale": ("scale", check_setting(_number)),
    "filter_wise": ("filter_wise", check_setting(_boolean)),
    "nuslerp_flatten": ("nuslerp_flatten", check_setting(_boolean)),
    "nuslerp_row_wise": ("nuslerp_row_wise", check_setting(_boolean)),
    "normalize_weights": ("normalize_weights", check_setting(_boolean)),
    "eps": ("eps", check_setting(_number)),
    "max_iter": ("max_iter", check_setting(_integer)),
    "tol": ("tol", check_setting(_number)),
    "select_topk": ("select_topk", check_setting(_number)),
    "r": ("r", check_setting(_number)),
    "alpha": ("alpha", check_setting(_number)),
}
GLOBAL_PARAMETER_KEYS = {**PARAMETER_KEYS, "int8_mask": ("int8_mask", check_setting(_boolean))}


def parameters_check(keys: dict[str, tuple[str, Check]], kind: type[ModelParameters]) -> Check:
    def check(value: Any, path: str) -> ModelParameters:
        return kind(**_fields(value, path, keys), given=tuple(value))

    return check


def _model_entry(value: Any, path: str) -> ModelEntry:
    return ModelEntry(**_fields(value, path, ENTRY_KEYS, required=("model",)))


def _model_entries(value: Any, path: str) -> list[ModelEntry]:
    if not isinstance(value, list):
        _fail(path, f"must be a list of models, got {shown(value)}")
    return [_model_entry(entry, f"{path}.{index}") for index, entry in enumerate(value)]


ENTRY_KEYS: dict[str, tuple[str, Check]] = {
    "model": ("model", _model_name),
    "parameters": ("parameters", parameters_check(PARAMETER_KEYS, ModelParameters)),
}
SLICES_KEY = (
    "slices",
    lambda value, path: read_slices(
        value,
        path,
        parameters_check(PARAMETER_KEYS, ModelParameters),
        parameters_check(GLOBAL_PARAMETER_KEYS, GlobalParameters),
    ),
)
RECIPE_KEYS: dict[str, tuple[str, Check]] = {
    "merge_method": ("merge_method", _required_string),
    "base_model": ("base_model", _optional_model_name),
    "models": ("models", _model_entries),
    "parameters": ("parameters", parameters_check(GLOBAL_PARAMETER_KEYS, GlobalParameters)),
    "dtype": ("dtype", _dtype),
    "out_dtype": ("out_dtype", _out_dtype),
    "seed": ("seed", _seed),
    "tokenizer_source": ("tokenizer_source", _tokenizer_source),
    "tokenizer": ("tokenizer", check_tokenizer_block),
    "chat_template": ("chat_template", check_chat_template),
    "name": ("name", _string),
    "slices": SLICES_KEY,  # instead of models (``read_schema``)
}


def read_schema(data: dict) -> RecipeSchema:
    """The recipe mapping ``data`` (from YAML) checked field by field. Under ``slices:`` the
    schema's ``models`` are the models the slices read, each once, without parameters."""
    if "slices" not in data:
        return RecipeSchema(**_fields(data, "", RECIPE_KEYS, required=("merge_method", "models")))
    if "models" in data:
        raise RecipeError("slices: give one of models, slices or modules, not models too")
    fields = _fields(data, "", RECIPE_KEYS, required=("merge_method",))
    models = [ModelEntry(ref) for ref in slice_models(fields["slices"])]
    return RecipeSchema(**fields, models=models)


def _fields(
    value: Any, path: str, keys: dict[str, tuple[str, Check]], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The checked fields of the mapping ``value`` at ``path``, by attribute name. Unknown keys
    are reported first (with the nearest known key: a misspelt key also leaves its field
    missing), then each field in the order of ``keys``."""
    if not isinstance(value, dict):
        _fail(path, f"must be a mapping, got {shown(value)}")
    for key in value:
        if key not in keys:
            known = list(keys)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            _fail(_join(path, key), f"unknown key; {hint}")
    for key in required:
        if key not in value:
            _fail(_join(path, key), "is required")
    return {
        attribute: check(value[key], _join(path, key))
        for key, (attribute, check) in keys.items()
        if key in value
    }


def parameter_attribute(key: str) -> str:
    """The attribute of ``GlobalParameters`` that parameter ``key`` fills."""
    return GLOBAL_PARAMETER_KEYS[key][0]


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)
