"""What a sweep varies: ``--grid`` lists and ``--random`` ranges, parsed and checked against the
recipe's method before anything is read or written.

A setting is addressed as
- ``density``: the top-level ``parameters`` block (a default for every model, or a merge-wide
  parameter such as ``lambda``);
- ``models[1].weight``: the second entry of ``models`` (counted from 0, as the recipe lists
  them);
- ``weight@math``: the entry whose ``model`` is ``math`` or a path whose last part is ``math``.

Values are read as YAML scalars (``0.5``, ``true``), so they mean what they would in the recipe.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import yaml

from della_cli.errors import UsageError

_INDEXED = re.compile(r"^models\[(\d+)\]\.(\w+)$")
_NAMED = re.compile(r"^(\w+)@(.+)$")
_PLAIN = re.compile(r"^\w+$")


@dataclass(frozen=True)
class Target:
    """Where a swept value goes: a parameter, of the top level (``model`` None) or of one
    entry of ``models`` (its index)."""

    name: str  # as the user wrote it, for the table and messages
    parameter: str
    model: int | None = None


@dataclass(frozen=True)
class Axis:
    """One swept parameter: a list of values (``--grid``) or a range (``--random``)."""

    target: Target
    values: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None

    @property
    def is_range(self) -> bool:
        return self.low is not None


def parse_target(name: str, model_refs: list[str], option: str = "--grid") -> Target:
    """The place ``name`` addresses (see the module docstring), or UsageError."""
    indexed, named = _INDEXED.match(name), _NAMED.match(name)
    if indexed:
        index = int(indexed.group(1))
        if index >= len(model_refs):
            raise UsageError(
                f"{option} {name}: the recipe lists {len(model_refs)} models (models[0] to "
                f"models[{len(model_refs) - 1}])"
            )
        return Target(name, indexed.group(2), index)
    if named:
        wanted = named.group(2)
        found = [i for i, ref in enumerate(model_refs) if wanted in (ref, PurePath(ref).name)]
        if len(found) != 1:
            how = "no model" if not found else "several models"
            raise UsageError(
                f"{option} {name}: {how} of the recipe named '{wanted}' (it lists "
                f"{', '.join(model_refs)}); or address it as models[N].{named.group(1)}"
            )
        return Target(name, named.group(1), found[0])
    if _PLAIN.match(name):
        return Target(name, name)
    raise UsageError(
        f"{option} {name}: not a parameter address; write density, models[1].weight or weight@NAME"
    )


def parse_axis(option: str, text: str, model_refs: list[str]) -> Axis:
    """``NAME=v1,v2`` (``--grid``) or ``NAME=low:high`` (``--random``)."""
    name, equals, values = text.partition("=")
    if not equals or not name.strip() or not values.strip():
        raise UsageError(f"{option} {text}: write NAME=VALUES, e.g. density=0.3,0.5")
    target = parse_target(name.strip(), model_refs, option)
    if option == "--random":
        low, colon, high = values.partition(":")
        bounds = [_scalar(option, target, low), _scalar(option, target, high)]
        if not colon or not all(_is_number(b) for b in bounds) or bounds[0] >= bounds[1]:
            raise UsageError(f"--random {text}: write {target.name}=LOW:HIGH with LOW < HIGH")
        return Axis(target, low=float(bounds[0]), high=float(bounds[1]))
    parsed = tuple(_scalar(option, target, value) for value in values.split(","))
    if len(set(map(repr, parsed))) != len(parsed):
        raise UsageError(f"--grid {text}: a value is listed twice")
    return Axis(target, values=parsed)


def _scalar(option: str, target: Target, text: str) -> Any:
    try:
        value = yaml.safe_load(text.strip())
    except yaml.YAMLError:
        value = None
    if value is None or isinstance(value, list | dict):
        raise UsageError(f"{option} {target.name}: '{text.strip()}' is not a number or a boolean")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_axes(axes: list[Axis], method: str, top: tuple[str, ...], own: tuple[str, ...]) -> None:
    """Refuse a parameter the method does not take where it is put (``top``: the names the
    top-level block takes; ``own``: those a model's entry takes) and a parameter swept twice."""
    seen: set[Target] = set()
    for axis in axes:
        target, option = axis.target, "--random" if axis.is_range else "--grid"
        takes = own if target.model is not None else top
        if target.parameter not in takes:
            where = "per model" if target.model is not None else "in parameters"
            raise UsageError(
                f"{option} {target.name}: {method} does not take {target.parameter} {where} "
                f"(it takes {', '.join(takes) or 'none'})"
            )
        key = Target("", target.parameter, target.model)
        if key in seen:
            raise UsageError(f"{option} {target.name}: this parameter is swept twice")
        seen.add(key)


Settings = dict[str, Any]  # target name -> value, in the order the axes were given


def grid_settings(axes: list[Axis]) -> list[Settings]:
    """Every combination of the axes' values, the last axis varying fastest."""
    names = [axis.target.name for axis in axes]
    return [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(axis.values for axis in axes))
    ]


def random_settings(axes: list[Axis], trials: int, seed: int) -> list[Settings]:
    """``trials`` settings drawn from ``random.Random(seed)``: a range uniformly (rounded to 4
    significant digits, so tables stay readable and a rerun draws the same), a list by choice.
    The same seed gives the same trials, which is what lets a sweep resume."""
    draw = random.Random(seed)
    settings = []
    for _ in range(trials):
        one = {}
        for axis in axes:
            if axis.is_range:
                one[axis.target.name] = float(f"{draw.uniform(axis.low, axis.high):.4g}")
            else:
                one[axis.target.name] = draw.choice(axis.values)
        settings.append(one)
    return settings
