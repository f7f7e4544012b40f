"""Parameter values that vary by tensor: gradients over the layers and filters on tensor names.

As mergekit 0.1.5 reads them (``config.py:evaluate_setting``, MERGEKIT-SEMANTICS.md):

- a **gradient** is a list of values sampled at the tensor's layer position t in [0, 1]:
  x = t·(n−1), i = ⌊x⌋, value = (1−(x−i))·v[i] + (x−i)·v[min(i+1, n−1)]. Lists of booleans or
  strings step instead: v[⌊t·(n−1)⌋].
- a **filter** list holds ``{filter, value}`` entries (or one mapping); the first entry whose
  filter is absent, ``"*"`` or a substring of the tensor name gives the value, which may be a
  gradient. When no entry matches, the setting gives nothing and the lookup falls through to
  the next scope (the model's own, then the top level, then the method's default).
- **t** is idx/(n−1) for layer idx of a model of n layers (1 for a one-layer model); tensors
  outside the layer stack (embeddings, final norm, lm_head) take t = 0.

Each value of a gradient is checked as a plain value would be, with its position in the path
(``models.1.parameters.density[2]``): a gradient whose values are all in range interpolates in
range, as an interval is convex.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from della_cli.errors import RecipeError, shown

# A numbered layer of a stack: ``model.layers.3.``, GPT-2's ``transformer.h.3.``.
_LAYER = re.compile(r"^(?P<stack>.*?\.(?:layers|h|blocks|layer))\.(?P<index>\d+)\.")
FILTER_KEYS = ("filter", "value")


@dataclass(frozen=True)
class Gradient:
    """Values interpolated (numbers) or stepped (booleans, strings) over the layer position."""

    values: tuple[Any, ...]

    def at(self, t: float) -> Any:
        values = self.values
        x = t * (len(values) - 1)
        low = int(x)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[low]
        high = min(len(values) - 1, low + 1)
        frac = x - low
        return (1 - frac) * values[low] + frac * values[high]

    def describe(self) -> str:
        return "[" + ", ".join(_plain(v) for v in self.values) + "]"


@dataclass(frozen=True)
class Filtered:
    """``(filter, value)`` entries; the first whose filter matches the tensor name wins."""

    entries: tuple[tuple[str | None, Any], ...]

    def match(self, tensor_name: str) -> tuple[bool, Any]:
        for pattern, value in self.entries:
            if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
                return True, value
        return False, None

    def describe(self) -> str:
        parts = [
            f"{'*' if pattern in (None, '*') else repr(pattern)}: {describe(value)}"
            for pattern, value in self.entries
        ]
        return "{" + ", ".join(parts) + "}"


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe(setting: Any) -> str:
    """A setting as a recipe would write it, compactly (for the plan and the card)."""
    if isinstance(setting, (Gradient, Filtered)):
        return setting.describe()
    return _plain(setting)


def varies(setting: Any) -> bool:
    return isinstance(setting, (Gradient, Filtered))


def leaves(setting: Any) -> Iterator[Any]:
    """Every plain value a setting holds (a gradient's points, each filter's value): a range
    that holds for them holds for whatever is interpolated between them."""
    if isinstance(setting, Filtered):
        for _, value in setting.entries:
            yield from leaves(value)
    elif isinstance(setting, Gradient):
        yield from setting.values
    else:
        yield setting


def resolve(setting: Any, tensor_name: str, t: float) -> Any:
    """The setting's value for ``tensor_name`` at layer position ``t``; None when it is unset
    or its filters match nothing (the next scope then decides)."""
    if isinstance(setting, Filtered):
        found, setting = setting.match(tensor_name)
        if not found:
            return None
    if isinstance(setting, Gradient):
        return setting.at(t)
    return setting


def check_setting(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """``check`` (of one plain value) extended to gradients and filter lists, every value
    checked with its place in the path."""

    def checked(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return Filtered((_filter_entry(value, path, check),))
        if isinstance(value, list):
            if not value:
                raise RecipeError(f"{path}: must not be an empty list; give a value")
            if all(isinstance(entry, dict) for entry in value):
                entries = (_filter_entry(e, f"{path}[{i}]", check) for i, e in enumerate(value))
                return Filtered(tuple(entries))
            return _gradient(value, path, check)
        return check(value, path)

    return checked


def _gradient(value: list, path: str, check: Callable[[Any, str], Any]) -> Any:
    for index, entry in enumerate(value):
        if entry is None:
            raise RecipeError(f"{path}[{index}]: must be a value, got null")
        if isinstance(entry, (list, dict)):
            raise RecipeError(
                f"{path}[{index}]: a gradient is a list of plain values, got {shown(entry)}; "
                "a filter list is a list of {filter, value} mappings"
            )
    return Gradient(tuple(check(entry, f"{path}[{index}]") for index, entry in enumerate(value)))


def _filter_entry(entry: dict, path: str, check: Callable[[Any, str], Any]) -> tuple:
    for key in entry:
        if key not in FILTER_KEYS:
            raise RecipeError(f"{path}.{key}: unknown key; a filter entry has filter and value")
    if entry.get("value") is None:
        raise RecipeError(f"{path}.value: is required (a filter entry has filter and value)")
    pattern = entry.get("filter")
    if pattern is not None and not isinstance(pattern, str):
        raise RecipeError(f"{path}.filter: must be a string, got {shown(pattern)}")
    value = entry["value"]
    if isinstance(value, dict) or (
        isinstance(value, list) and any(isinstance(v, dict) for v in value)
    ):
        raise RecipeError(f"{path}.value: must be a value or a gradient, not another filter")
    if isinstance(value, list):
        if not value:
            raise RecipeError(f"{path}.value: must not be an empty list; give a value")
        return pattern, _gradient(value, f"{path}.value", check)
    return pattern, check(value, f"{path}.value")


def breakpoints(settings: Iterable[Any]) -> list[float]:
    """The positions t where any of the gradients among ``settings`` has a value of its own:
    between two of them every gradient is linear, so a bound checked there holds everywhere."""
    points = {0.0, 1.0}
    for setting in settings:
        for gradient in _gradients(setting):
            last = len(gradient.values) - 1
            points.update(i / last for i in range(1, last) if last > 1)
    return sorted(points)


def _gradients(setting: Any) -> Iterator[Gradient]:
    if isinstance(setting, Gradient):
        yield setting
    elif isinstance(setting, Filtered):
        for _, value in setting.entries:
            yield from _gradients(value)


def sample_names(settings: Iterable[Any]) -> list[str]:
    """Tensor names standing for every way the filters among ``settings`` can match: none,
    each filter alone, and each pair (a name may contain two)."""
    patterns = sorted(
        {
            pattern
            for setting in settings
            if isinstance(setting, Filtered)
            for pattern, _ in setting.entries
            if pattern not in (None, "*")
        }
    )
    names = ["", *patterns]
    names += [f"{a}\0{b}" for a in patterns for b in patterns if a < b]
    return names


def layer_position(tensor_name: str, layers: int | None) -> float:
    """The tensor's t: idx/(n−1) inside the layer stack, 1 for a one-layer model, 0 outside."""
    match = _LAYER.match(tensor_name)
    if match is None:
        return 0.0
    if layers is None:
        raise ValueError(
            f"the layer count is not known, so no gradient can be placed on '{tensor_name}'"
        )
    index = int(match.group("index"))
    return 1.0 if layers <= 1 else min(1.0, index / (layers - 1))


def layer_count(config: dict | None, names: Iterable[str]) -> int | None:
    """A model's number of layers: config.json's (a nested text_config's for a composite
    model), else the deepest stack of numbered tensor names."""
    for source in (config or {}, (config or {}).get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = source.get(key) if isinstance(source, dict) else None
            if type(value) is int and value > 0:
                return value
    depth = 0
    for name in names:
        match = _LAYER.match(name)
        if match:
            depth = max(depth, int(match.group("index")) + 1)
    return depth or None
