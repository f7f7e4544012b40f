"""The candidates of a sweep: each setting of the swept parameters, merged once per seed, as a
recipe of its own, every one read and checked by the recipe's rules before anything runs.

A candidate's recipe is the user's recipe with the swept values written in (the top-level
``parameters`` block, or a model's own) and, for the random methods, its seed. It is checked as
any recipe is, so a value out of range is refused with the recipe's own message, prefixed by the
setting that made it.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import yaml

from della_cli.errors import RecipeError, UsageError
from della_cli.recipe import Recipe, parse_recipe
from della_cli.recipe_yaml import load_yaml
from della_cli.sweep.grid import Axis, Settings, Target


@dataclass(frozen=True)
class Candidate:
    """One merge of the sweep: a setting (its index among the settings) and a seed."""

    setting: int
    values: Settings
    seed: int
    recipe: Recipe

    @property
    def name(self) -> str:
        """The folder name of its merge: ``c003-s0`` is the fourth setting with seed 0."""
        return f"c{self.setting:03d}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "setting": self.setting,
            "values": self.values,
            "seed": self.seed,
        }


def parameter_names(recipe: Recipe) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The parameters the recipe's method takes in the top-level block, and per model."""
    spec = recipe.method
    return (*spec.expert_parameters, *spec.global_parameters), spec.expert_parameters


def build_candidates(
    recipe: Recipe, axes: list[Axis], settings: list[Settings], seeds: int
) -> list[Candidate]:
    """Every candidate: each setting once per seed (the recipe's seed, then the next ones;
    methods that draw nothing get one seed whatever is asked). Raises UsageError naming the
    setting whose recipe breaks a rule."""
    data = load_yaml(recipe.text)
    targets = {axis.target.name: axis.target for axis in axes}
    used = seeds if recipe.method.is_random else 1
    candidates = []
    for index, values in enumerate(settings):
        written = _with_values(data, targets, values)
        for offset in range(used):
            seed = recipe.seed + offset
            candidates.append(
                Candidate(index, values, seed, _recipe(recipe, written, seed, values))
            )
    return candidates


def _with_values(data: dict, targets: dict[str, Target], values: Settings) -> dict:
    """The recipe's data with ``values`` written where their targets say."""
    written = copy.deepcopy(data)
    for name, value in values.items():
        target = targets[name]
        if target.model is None:
            block = written.get("parameters")
            written["parameters"] = block = block if isinstance(block, dict) else {}
        else:
            entry = written["models"][target.model]
            block = entry.get("parameters")
            entry["parameters"] = block = block if isinstance(block, dict) else {}
        block[target.parameter] = value
    return written


def _recipe(recipe: Recipe, data: dict, seed: int, values: Settings) -> Recipe:
    text = yaml.safe_dump({**data, "seed": seed}, sort_keys=False, allow_unicode=True)
    try:
        return parse_recipe(text, recipe.path)
    except RecipeError as error:
        shown = ", ".join(f"{name}={value}" for name, value in values.items())
        raise UsageError(f"--grid {shown}: {error}") from None


def sweep_fingerprint(
    recipe: Recipe, candidates: list[Candidate], command: str, score_field: str | None
) -> str:
    """What makes two runs the same sweep: the recipe, the candidates and how they are scored.
    A resumed sweep must match it, or its recorded scores would belong to another sweep."""
    described = {
        "recipe": recipe.text,
        "candidates": [candidate.to_dict() for candidate in candidates],
        "eval": command,
        "score_field": score_field,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
