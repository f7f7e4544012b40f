"""The YAML recipe: schema, every rule checked on read, and per-tensor parameter lookup.

The format is mergekit's for whole-model merges, so published recipes run unchanged; where our
semantics differ, ALGORITHMS.md says so. Every problem is reported as a ``RecipeError`` whose
message starts with the field path (``models.1.parameters.density: must be in (0, 1], got
1.3``) before any model is opened.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from della_cli.errors import RecipeError
from della_cli.methods import METHODS, ExpertParams, GlobalParams, MethodSpec, Rescale
from della_cli.methods.registry import GLOBAL_PARAMETERS

DTYPE_CHOICES = ("float32", "float16", "bfloat16", "float64")
DEFAULT_GAMMA = 0.01  # mergekit's breadcrumbs default
# mergekit keys we know but do not implement yet: said so instead of "unknown key".
UNSUPPORTED_KEYS = {
    "slices": "slice-wise merges (slices) are not supported yet; merge whole models",
    "modules": "per-module merges (modules) are not supported yet; merge whole models",
    "tokenizer": (
        "the tokenizer: block is not supported yet; use tokenizer_source: base or a model's name"
    ),
    "chat_template": "chat_template is not supported yet; the base's template is kept",
}


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return value


def _reject_lists(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError(f"must be a number, got {value!r}")
    if isinstance(value, (list, dict)):
        raise ValueError(
            "per-tensor filters and gradients (lists) are not supported yet; give one number"
        )
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelParameters(_Strict):
    """Parameters one expert may set; unset ones fall back to the top-level defaults."""

    weight: float | None = None
    density: float | None = None
    epsilon: float | None = None
    gamma: float | None = None
    # Global parameters are accepted here only to give a precise error.
    lambda_: float | None = Field(default=None, alias="lambda")
    normalize: bool | None = None
    rescale: bool | Literal["l1"] | None = None

    @field_validator("weight", "density", "epsilon", "gamma", "lambda_", mode="before")
    @classmethod
    def _numbers_only(cls, value: Any) -> Any:
        return _reject_lists(value)

    @field_validator("rescale", mode="before")
    @classmethod
    def _check_rescale(cls, value: Any) -> Any:
        # Checked before the union so the error names the field, not a union member.
        if value is None or isinstance(value, bool) or value == "l1":
            return value
        raise ValueError(f"must be true, false or l1, got {value!r}")

    @field_validator("weight", "density", "epsilon", "gamma", "lambda_")
    @classmethod
    def _check_finite(cls, value: float | None) -> float | None:
        return _finite(value)

    @field_validator("density")
    @classmethod
    def _check_density(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"must be in (0, 1], got {value}")
        return value

    @field_validator("epsilon")
    @classmethod
    def _check_epsilon(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value < 0.5:
            raise ValueError(f"must be in [0, 0.5), got {value}")
        return value

    @field_validator("gamma")
    @classmethod
    def _check_gamma(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value < 1:
            raise ValueError(f"must be in [0, 1), got {value}")
        return value


class GlobalParameters(ModelParameters):
    """Top-level parameters: defaults for every model plus the merge-wide ones."""

    int8_mask: bool | None = None  # mergekit memory option; accepted, no effect here


class ModelEntry(_Strict):
    model: str = Field(min_length=1)
    parameters: ModelParameters = Field(default_factory=ModelParameters)


class RecipeSchema(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: GlobalParameters = Field(default_factory=GlobalParameters)
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    seed: int | None = Field(default=None, strict=True)  # strict: `true` is not a seed
    tokenizer_source: str | None = None

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < 2**63:
            raise ValueError(f"must be an integer in [0, 2**63), got {value}")
        return value

    @field_validator("tokenizer_source")
    @classmethod
    def _check_tokenizer_source(cls, value: str | None) -> str | None:
        if value == "union":
            raise ValueError(
                "'union' (a tokenizer merged from several models) is not supported yet; "
                "use base or the name of one of the models"
            )
        return value


@dataclass(frozen=True)
class Recipe:
    """A validated recipe, with the text it was read from (for the card and the hash)."""

    schema: RecipeSchema
    text: str
    path: Path | None = None

    @property
    def method(self) -> MethodSpec:
        return METHODS[self.schema.merge_method]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def model_refs(self) -> list[str]:
        return [entry.model for entry in self.schema.models]

    @property
    def tokenizer_model(self) -> int | None:
        """The recipe index of the model named by ``tokenizer_source``, or None for the base
        (the default, and also what ``base`` and the base model's own name mean)."""
        source = self.schema.tokenizer_source
        if source in (None, "base", self.schema.base_model):
            return None
        return self.model_refs.index(source)

    def expert_params(self, model_index: int, tensor_name: str) -> ExpertParams:
        """Parameters of model ``model_index`` for ``tensor_name``.

        A function of the tensor name so that per-tensor filters and layer gradients can be
        added here without touching the engine.
        """
        del tensor_name  # one value per model today
        own = self.schema.models[model_index].parameters
        default = self.schema.parameters

        gamma = None
        if "gamma" in self.method.expert_parameters:
            gamma = _first_set(own.gamma, default.gamma, DEFAULT_GAMMA)
        return ExpertParams(
            weight=_first_set(own.weight, default.weight, 1.0),
            density=_first_set(own.density, default.density, None),
            epsilon=_first_set(own.epsilon, default.epsilon, None),
            gamma=gamma,
        )

    def global_params(self) -> GlobalParams:
        spec, top = self.method, self.schema.parameters
        rescale = {True: Rescale.KEEP_PROB, False: Rescale.NONE, "l1": Rescale.L1}[
            True if top.rescale is None else top.rescale
        ]
        return GlobalParams(
            lambda_=_first_set(top.lambda_, None, 1.0),
            normalize=_first_set(top.normalize, None, spec.normalize_default),
            rescale=rescale,
        )

    @property
    def seed(self) -> int:
        """The recipe's seed; 0 when it sets none, so that every merge is reproducible."""
        return self.schema.seed if self.schema.seed is not None else 0

    def with_seed(self, seed: int) -> Recipe:
        """The recipe with its seed replaced, in the schema and in the text (so that the text
        written next to the merged model reproduces it)."""
        if not 0 <= seed < 2**63:
            raise RecipeError(f"--seed: must be an integer in [0, 2**63), got {seed}")
        line = f"seed: {seed}  # set by della merge --seed"
        text, count = re.subn(r"(?m)^seed:.*$", line, self.text)
        if count == 0:
            text = self.text.rstrip("\n") + "\n" + line + "\n"
        return Recipe(self.schema.model_copy(update={"seed": seed}), text, self.path)


def _first_set(*values: Any) -> Any:
    for value in values[:-1]:
        if value is not None:
            return value
    return values[-1]


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file."""
    try:
        text = path.read_text()
    except FileNotFoundError as error:
        raise RecipeError(f"{path}: no such recipe file") from error
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error})") from error
    return parse_recipe(text, path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing duplicate keys (which would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_recipe(text: str, path: Path | None = None) -> Recipe:
    """Parse recipe text; raise RecipeError naming the field path of the first problem."""
    where = str(path) if path else "recipe"
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no object tags
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        position = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{where}:{position}: invalid YAML ({error.problem})") from error
    except yaml.YAMLError as error:  # e.g. a control character, with a multi-line message
        raise RecipeError(f"{where}: invalid YAML ({' '.join(str(error).split())})") from error
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping with merge_method and models")
    for key, reason in UNSUPPORTED_KEYS.items():
        if key in data:
            raise RecipeError(f"{key}: {reason}")
    try:
        schema = RecipeSchema.model_validate(data)
    except ValidationError as error:
        message = _describe(error.errors()[0], data)
        raise RecipeError(message.replace("\r", "\\r").replace("\n", "\\n")) from error
    recipe = Recipe(schema, text, path)
    check_rules(recipe)
    return recipe


def _describe(error: dict[str, Any], data: Any) -> str:
    """One line for a pydantic error: the field path, then what is wrong and what to do."""
    loc = [str(part) for part in error["loc"]]
    field = ".".join(loc) or "recipe"
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
        return f"{field}: unknown key{hint}"
    if kind == "missing":
        return f"{field}: is required"
    if kind == "value_error":
        return f"{field}: {error['msg'].removeprefix('Value error, ')}"
    if kind == "literal_error":
        return f"{field}: must be one of {error['ctx']['expected']}, got {value!r}"
    if kind in ("float_type", "float_parsing", "int_type", "int_parsing", "int_from_float"):
        what = "an integer" if kind.startswith("int") else "a number"
        return f"{field}: must be {what}, got {value!r}"
    if kind in ("bool_type", "bool_parsing"):
        return f"{field}: must be true or false, got {value!r}"
    if kind == "list_type":
        return f"{field}: must be a list of models, got {value!r}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return f"{field}: must be a mapping, got {value!r}"
    if kind == "string_too_short":
        return f"{field}: must not be empty"
    if kind == "string_type":
        return f"{field}: must be a string, got {value!r}"
    return f"{field}: {error['msg']}"


def _known_keys(parent: list[str]) -> list[str]:
    model: type[BaseModel] = RecipeSchema
    if parent[:1] == ["models"]:
        model = ModelEntry if len(parent) == 2 else ModelParameters
    elif parent == ["parameters"]:
        model = GlobalParameters
    return [info.alias or name for name, info in model.model_fields.items()]


def check_rules(recipe: Recipe) -> None:
    """Rules that span fields: method, base, duplicates, which parameters apply, bounds."""
    schema = recipe.schema
    if schema.merge_method not in METHODS:
        close = difflib.get_close_matches(schema.merge_method, list(METHODS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"one of {', '.join(METHODS)}"
        raise RecipeError(f"merge_method: unknown method '{schema.merge_method}'; {hint}")
    spec = recipe.method
    if not schema.models:
        raise RecipeError("models: must list at least one model")
    if spec.needs_base and not schema.base_model:
        raise RecipeError(f"base_model: {spec.name} merges task vectors and needs a base_model")
    seen: dict[str, int] = {}
    for index, ref in enumerate(recipe.model_refs):
        if ref in seen:
            raise RecipeError(
                f"models.{index}.model: '{ref}' is listed twice (also models.{seen[ref]})"
            )
        seen[ref] = index
        if spec.on_deltas and ref == schema.base_model:
            raise RecipeError(
                f"models.{index}.model: '{ref}' is the base model; its task vector is zero, "
                "so remove it from models"
            )
    source = schema.tokenizer_source
    if source not in (None, "base", schema.base_model, *recipe.model_refs):
        names = ", ".join(f"'{ref}'" for ref in recipe.model_refs)
        raise RecipeError(
            f"tokenizer_source: '{source}' is neither base nor one of the models ({names})"
        )
    _check_parameter_names(recipe)
    for index in range(len(schema.models)):
        _check_expert_values(recipe, index)


def _check_parameter_names(recipe: Recipe) -> None:
    spec = recipe.method
    allowed = set(spec.expert_parameters) | set(spec.global_parameters)
    blocks = [("parameters", recipe.schema.parameters)] + [
        (f"models.{i}.parameters", entry.parameters) for i, entry in enumerate(recipe.schema.models)
    ]
    for prefix, block in blocks:
        for name in block.model_fields_set:
            key = "lambda" if name == "lambda_" else name
            if key == "int8_mask":
                continue
            if key in GLOBAL_PARAMETERS and prefix != "parameters" and key in allowed:
                raise RecipeError(
                    f"{prefix}.{key}: {key} applies to the whole merge; set it under parameters"
                )
            if key not in allowed:
                takes = ", ".join(spec.expert_parameters + spec.global_parameters)
                raise RecipeError(
                    f"{prefix}.{key}: {spec.name} does not use {key} (it takes {takes})"
                )


def _check_expert_values(recipe: Recipe, index: int) -> None:
    spec = recipe.method
    own = recipe.schema.models[index].parameters

    def path(name: str) -> str:
        return (
            f"models.{index}.parameters.{name}"
            if getattr(own, name) is not None
            else (f"parameters.{name}")
        )

    params = recipe.expert_params(index, "")
    for name in spec.required_parameters:
        if getattr(params, name) is None:
            example = {"density": "density: 0.7", "epsilon": "epsilon: 0.07"}[name]
            article = "an" if name[0] in "aeiou" else "a"
            someone_sets_it = any(
                getattr(entry.parameters, name) is not None for entry in recipe.schema.models
            )
            where = f"models.{index}.parameters.{name}" if someone_sets_it else f"parameters.{name}"
            raise RecipeError(
                f"{where}: {spec.name} needs {article} {name} for every model and has no "
                f"default; add '{example}' under parameters (or per model)"
            )
    density = params.density
    in_window = (
        params.epsilon is None
        or density is None
        or density >= 1
        or (density - params.epsilon > 0 and density + params.epsilon <= 1)
    )
    if not in_window:
        raise RecipeError(
            f"{path('epsilon')}: keep probabilities d ± ε must lie in (0, 1], but density "
            f"{density} and epsilon {params.epsilon} give [{density - params.epsilon:g}, "
            f"{density + params.epsilon:g}]; lower epsilon"
        )
    if params.gamma is not None and density is not None and density + params.gamma > 1:
        raise RecipeError(
            f"{path('gamma')}: density {density} plus gamma {params.gamma} exceeds 1; "
            "lower one of them"
        )
