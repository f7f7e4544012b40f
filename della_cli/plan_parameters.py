"""The parameters each model gets per tensor group, where gradients and filters vary them.

``della plan`` groups tensors by name with the layer index left out; a recipe with gradients or
filters gives a group's tensors different values, or values other than the model's plain one
(its value outside the layers, where no filter matches). Those are stated per group: a value
the group shares, ``a → b over layers`` for a steady change, else the list per layer.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from della_cli.methods import Rescale
from della_cli.recipe_slices import reads

_INDEX = re.compile(r"\.(\d+)\.")
SHARED = "merge-wide"
_RESCALE_NAMES = {Rescale.KEEP_PROB: "true", Rescale.NONE: "false", Rescale.L1: "l1"}


def _layer_key(name: str) -> tuple[int, ...]:
    return tuple(int(index) for index in _INDEX.findall(name))


def group_parameters(recipe, names: list[str]) -> dict[str, dict[str, Any]]:
    """For the tensors ``names`` of one group: per model label (and ``SHARED`` for the
    merge-wide ones), the parameters that vary over the group or differ from the plain value;
    a value the whole group shares, else the list in layer order. Under slices, a model's
    values cover the tensors whose slice reads it."""
    names = sorted(names, key=_layer_key)
    spec = recipe.method
    found: dict[str, dict[str, Any]] = {}
    for index, ref in enumerate(recipe.model_refs):
        own = [name for name in names if reads(recipe.schema.slices, ref, name)]
        for field in spec.expert_parameters if own else ():
            values = [getattr(recipe.expert_params(index, name), field) for name in own]
            plain = getattr(recipe.expert_params(index, ""), field)
            _keep(found.setdefault(ref, {}), field, values, plain)
    for field in spec.global_parameters:
        value_of = _shared_value(recipe, field)
        values = [value_of(name) for name in names]
        _keep(found.setdefault(SHARED, {}), field, values, value_of(""))
    return {label: params for label, params in found.items() if params}


def _shared_value(recipe, field: str):
    """How a merge-wide parameter's value for a tensor is found: the method's own parameters
    for mergekit's other methods (slerp's t), else the pipeline's (lambda, normalize, ...)."""
    if recipe.method.catalog is not None:
        return lambda name: recipe.method_values(name).get(field)
    attribute = "lambda_" if field == "lambda" else field
    return lambda name: _shown(getattr(recipe.global_params(name), attribute))


def _shown(value: Any) -> Any:
    return _RESCALE_NAMES[value] if isinstance(value, Rescale) else value


def _keep(into: dict[str, Any], field: str, values: list[Any], plain: Any) -> None:
    if len(set(values)) > 1:
        into[field] = values
    elif values and values[0] != plain:
        into[field] = values[0]


def describe_values(value: Any) -> str:
    """A group's value: one value, ``a → b over layers`` when it changes steadily, else the
    list per layer."""
    if not isinstance(value, list):
        return _plain(value)
    steps = [b - a for a, b in itertools.pairwise(value)] if _numeric(value) else []
    if steps and (all(s >= 0 for s in steps) or all(s <= 0 for s in steps)):
        return f"{_plain(value[0])} → {_plain(value[-1])} over layers"
    return "[" + ", ".join(_plain(v) for v in value) + "] per layer"


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def parameter_lines(parameters: dict[str, dict[str, Any]], indent: str) -> list[str]:
    """The human lines of a group's ``parameters``: one per model."""
    return [
        f"{indent}{label}: "
        + ", ".join(f"{field} {describe_values(value)}" for field, value in params.items())
        for label, params in parameters.items()
    ]
