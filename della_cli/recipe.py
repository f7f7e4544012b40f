"""The YAML recipe: schema, every rule checked on read, and per-tensor parameter lookup.

The format is mergekit's for whole-model merges, so published recipes run unchanged; where our
semantics differ, ALGORITHMS.md says so. Every problem is reported as a ``RecipeError`` whose
message starts with the field path (``models.1.parameters.density: must be in (0, 1], got
1.3``) before any model is opened.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml

from della_cli.chat_template import check_chat_template
from della_cli.errors import RecipeError, shown
from della_cli.methods import METHODS, ExpertParams, GlobalParams, MethodSpec, Rescale
from della_cli.methods.catalog import BasePolicy, Parameter, Scope
from della_cli.model_ref import split_model_ref
from della_cli.recipe_compat import (
    MERGEKIT_DEFAULTS,
    adapt_recipe,
    check_method,
    duplicate_key_notes,
)
from della_cli.recipe_scopes import (
    Member,
    ParameterGroup,
    own_block,
    parameter_blocks,
    parameter_groups,
    shared_blocks,
)
from della_cli.recipe_settings import (
    breakpoints,
    check_setting,
    layer_position,
    leaves,
    resolve,
    sample_names,
    varies,
)
from della_cli.recipe_slices import (
    OutputSlice,
    check_slice_bases,
    place_of,
    read_slices,
    slice_models,
    slice_notes,
    unwrap_modules,
)
from della_cli.recipe_tokenizer import (
    TokenizerSettings,
    check_token_models,
    check_tokenizer_block,
)
from della_cli.recipe_yaml import MAX_RECIPE_BYTES, RecipeLoader, load_yaml, seed_edit

DTYPE_CHOICES = ("float32", "float16", "bfloat16", "float64")
DEFAULT_GAMMA = 0.01  # mergekit's breadcrumbs default
# Spellings of a boolean accepted besides YAML's own (mergekit's parser takes them too).
BOOLEAN_WORDS = {
    **dict.fromkeys(("true", "t", "yes", "y", "on", "1"), True),
    **dict.fromkeys(("false", "f", "no", "n", "off", "0"), False),
}


# A parameter's setting: a plain value, or one that varies by tensor (recipe_settings: a
# Gradient over the layers, or a Filtered list on tensor names).
Setting = Any


@dataclass(frozen=True)
class ModelParameters:
    """Parameters one expert may set; unset ones (None) fall back to the top-level defaults.
    Each is a plain value or a setting that varies by tensor (``recipe_settings``)."""

    weight: float | Setting | None = None
    density: float | Setting | None = None
    epsilon: float | Setting | None = None
    gamma: float | Setting | None = None
    # Global parameters are accepted here only to give a precise error.
    lambda_: float | Setting | None = None
    normalize: bool | Setting | None = None
    rescale: bool | Literal["l1"] | Setting | None = None
    # The parameters of mergekit's other methods (``methods.catalog``), checked per method.
    t: float | Setting | None = None
    scale: float | Setting | None = None
    filter_wise: bool | Setting | None = None
    nuslerp_flatten: bool | Setting | None = None
    nuslerp_row_wise: bool | Setting | None = None
    normalize_weights: bool | Setting | None = None
    eps: float | Setting | None = None
    max_iter: int | Setting | None = None
    tol: float | Setting | None = None
    select_topk: float | Setting | None = None
    r: float | Setting | None = None
    alpha: float | Setting | None = None
    given: tuple[str, ...] = ()  # the keys the recipe wrote, in its order


@dataclass(frozen=True)
class GlobalParameters(ModelParameters):
    """Top-level parameters: defaults for every model plus the merge-wide ones."""

    int8_mask: bool | Setting | None = None  # mergekit memory option; accepted, no effect here


EXPERT_FIELDS = ("weight", "density", "epsilon", "gamma")
SHARED_FIELDS = ("lambda_", "normalize", "rescale")


@dataclass(frozen=True)
class ModelEntry:
    model: str
    parameters: ModelParameters = field(default_factory=ModelParameters)


@dataclass(frozen=True)
class RecipeSchema:
    """The recipe's fields, each checked for its type and range (``read_schema``)."""

    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: GlobalParameters = field(default_factory=GlobalParameters)
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int | None = None
    tokenizer_source: str | None = None  # also what a tokenizer: {source: ...} block says
    tokenizer: TokenizerSettings | None = None  # the block's tokens and pad_to_multiple_of
    chat_template: str | None = None  # auto, a named template or a Jinja template
    name: str | None = None  # mergekit's stage name; here, the title of the model card
    # ``slices:`` (recipe_slices), else None; ``models`` then lists the models they read.
    slices: tuple[OutputSlice, ...] | None = None
    # The parameters of ``modules: {default: ...}``, between the slices' and the top level's.
    module_parameters: GlobalParameters | None = None
    # What was accepted as mergekit accepts it (ignored, defaulted): one line each, for the plan.
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    """A validated recipe, with the text it was read from (for the card and the hash)."""

    schema: RecipeSchema
    text: str
    path: Path | None = None
    # The models' number of layers, which places gradients (``with_layers``); None until the
    # models are opened.
    layers: int | None = None

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
        if source in (None, "base", "union", self.schema.base_model):
            return None  # a union starts from the base's files
        return self.model_refs.index(source)

    @property
    def aligns_vocabulary(self) -> bool:
        """Whether the vocabulary rows are re-indexed token by token (``vocab_rows``): a union
        tokenizer, ``tokens:`` settings or padding; else ``tokenizer_source`` fits rows by
        position."""
        settings = self.schema.tokenizer
        return self.schema.tokenizer_source == "union" or bool(
            settings and (settings.tokens or settings.pad_to_multiple_of)
        )

    @functools.cached_property
    def varies_by_tensor(self) -> bool:
        """Whether any parameter is a gradient or a filter list (else every tensor gets the
        same values)."""
        names = [f.name for f in dataclasses.fields(ModelParameters) if f.name != "given"]
        blocks = parameter_blocks(self.schema)
        return any(varies(getattr(block, name)) for block in blocks for name in names)

    def with_layers(self, layers: int | None) -> Recipe:
        """The recipe with the models' number of layers, which places its gradients."""
        return self if layers == self.layers else dataclasses.replace(self, layers=layers)

    def _position(self, tensor_name: str) -> float:
        """The tensor's layer position t, where some parameter needs it (else 0); under
        slices, its position in its slice."""
        if self.schema.slices is not None:
            return place_of(self.schema.slices, tensor_name).t
        return layer_position(tensor_name, self.layers) if self.varies_by_tensor else 0.0

    def expert_params(self, model_index: int, tensor_name: str) -> ExpertParams:
        """Parameters of model ``model_index`` for ``tensor_name``, its gradients placed at the
        tensor's layer and its filters matched against the name (under slices, the name of
        the model's own input tensor, and the model's parameters in that tensor's slice)."""
        if self.schema.slices is None:
            if not self.varies_by_tensor:  # the same for every tensor: settled once per model
                return self._uniform_expert_params[model_index]
            return self.expert_params_at(model_index, tensor_name, self._position(tensor_name))
        own, own_name, t = own_block(self.schema, self.model_refs[model_index], tensor_name)
        blocks = ((own,) if own is not None else ()) + shared_blocks(self.schema, tensor_name)
        return self.expert_params_from(blocks, own_name, t)

    @functools.cached_property
    def _uniform_expert_params(self) -> tuple[ExpertParams, ...]:
        """Each model's parameters where no parameter varies by tensor: settling them for each
        of a mixture-of-experts model's 30,000 tensors took most of its plan's time."""
        return tuple(self.expert_params_at(i, "", 0.0) for i in range(len(self.schema.models)))

    def expert_params_at(self, model_index: int, tensor_name: str, t: float) -> ExpertParams:
        """``expert_params`` at layer position ``t``; the own scope first, then the module's,
        the top level, then the default (a filter list matching nothing falls through)."""
        own = self.schema.models[model_index].parameters
        blocks = (own, *shared_blocks(self.schema, tensor_name))
        return self.expert_params_from(blocks, tensor_name, t)

    def expert_params_from(
        self, blocks: tuple[ModelParameters, ...], tensor_name: str, t: float
    ) -> ExpertParams:
        """A model's parameters from the parameter ``blocks``, highest precedence first."""

        def settle(name: str, fallback: Any) -> Any:
            scopes = tuple(getattr(block, name) for block in blocks)
            return _settle(scopes, tensor_name, t, fallback)

        takes = self.method.expert_parameters
        gamma = settle("gamma", DEFAULT_GAMMA) if "gamma" in takes else None
        density = MERGEKIT_DEFAULTS["density"] if "density" in takes else None
        epsilon = MERGEKIT_DEFAULTS["epsilon"] if "epsilon" in takes else None
        scale = settle("scale", None) if "scale" in takes else None
        return ExpertParams(
            weight=settle("weight", 1.0),
            density=settle("density", density),
            epsilon=settle("epsilon", epsilon),
            gamma=gamma,
            scale=scale,
        )

    def method_values(self, tensor_name: str) -> dict[str, Any]:
        """A catalog method's shared parameters (slerp's t, ...) for ``tensor_name``: the
        recipe's top-level value (a gradient or filters placed for that tensor), else the
        catalog's default. Empty for the pipeline's methods."""
        entry = self.method.catalog
        if entry is None:
            return {}
        blocks, t = shared_blocks(self.schema, tensor_name), self._position(tensor_name)
        return {
            p.name: _settle(
                tuple(getattr(b, parameter_attribute(p.name)) for b in blocks),
                tensor_name,
                t,
                p.default,
            )
            for p in entry.parameters
            if p.scope is Scope.SHARED
        }

    def global_params(self, tensor_name: str = "") -> GlobalParams:
        """The merge-wide parameters for ``tensor_name`` (the output's name); without one,
        those of a tensor outside the layers that no filter names."""
        if tensor_name and self.schema.slices is None and not self.varies_by_tensor:
            return self._uniform_global_params
        return self._global_params(tensor_name)

    @functools.cached_property
    def _uniform_global_params(self) -> GlobalParams:
        return self._global_params("")

    def _global_params(self, tensor_name: str) -> GlobalParams:
        spec, blocks = self.method, shared_blocks(self.schema, tensor_name)
        t = self._position(tensor_name)

        def scopes(name: str) -> tuple[Any, ...]:
            return tuple(getattr(block, name) for block in blocks)

        rescale = _settle(scopes("rescale"), tensor_name, t, True)
        return GlobalParams(
            lambda_=_settle(scopes("lambda_"), tensor_name, t, 1.0),
            normalize=_settle(scopes("normalize"), tensor_name, t, spec.normalize_default),
            rescale={True: Rescale.KEEP_PROB, False: Rescale.NONE, "l1": Rescale.L1}[rescale],
        )

    @property
    def seed(self) -> int:
        """The recipe's seed; 0 when it sets none, so that every merge is reproducible."""
        return self.schema.seed if self.schema.seed is not None else 0

    def with_seed(self, seed: int) -> Recipe:
        """The recipe with its seed replaced, in the schema and in the text (so that the text
        written next to the merged model reproduces it).

        The text is edited where YAML's parser places the seed's value (or the top-level
        mapping's start), so comments and layout stay in any syntax: block, flow or JSON. An
        edit that does not read back as this recipe with the new seed gives way to the recipe
        written anew from its values: comments may be lost, never the recipe's loadability
        (`della push` would otherwise have to upload text it cannot parse)."""
        if not 0 <= seed < 2**63:
            raise RecipeError(f"--seed: must be an integer in [0, 2**63), got {seed}")
        schema = dataclasses.replace(self.schema, seed=seed)
        edited = seed_edit(self.text, seed)
        try:
            if edited is not None and parse_recipe(edited).schema == schema:
                return Recipe(schema, edited, self.path, self.layers)
        except RecipeError:
            pass
        data = load_yaml(self.text)
        text = yaml.safe_dump({**data, "seed": seed}, sort_keys=False, allow_unicode=True)
        return Recipe(schema, text, self.path, self.layers)


def _settle(scopes: tuple[Any, ...], tensor_name: str, t: float, fallback: Any) -> Any:
    """The first scope's value for ``tensor_name`` at ``t``, else ``fallback``."""
    for setting in scopes:
        value = resolve(setting, tensor_name, t)
        if value is not None:
            return value
    return fallback


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file of at most ``MAX_RECIPE_BYTES`` (a FIFO such as
    ``<(envsubst < r.yaml)`` is read too, still bounded)."""
    return parse_recipe(read_recipe_text(path), path)


def read_recipe_text(path: Path) -> str:
    """The text of a recipe file, bounded by ``MAX_RECIPE_BYTES``."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)
        if len(data) > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"{path}: larger than the {MAX_RECIPE_BYTES >> 20} MiB limit for a recipe; "
                "a recipe is a few hundred bytes of YAML"
            )
        text = data.decode()
    except FileNotFoundError as error:
        raise RecipeError(f"{path}: no such recipe file") from error
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error})") from error
    return text


def parse_recipe(text: str, path: Path | None = None) -> Recipe:
    """Parse recipe text; raise RecipeError naming the field path of the first problem."""
    where = str(path) if path else "recipe"
    loader = None
    try:
        loader = RecipeLoader(text)  # a SafeLoader: no object tags
        data = loader.get_single_data()
    except yaml.composer.ComposerError as error:
        if "another document" not in str(error.problem):
            raise yaml_error(where, error) from error
        raise RecipeError(
            f"{where}: holds several YAML documents, a multi-stage file, which only "
            "della merge and della plan run"
        ) from error
    except (yaml.YAMLError, RecursionError, ValueError) as error:
        raise yaml_error(where, error) from error
    finally:
        if loader is not None:
            loader.dispose()
    return recipe_of(data, text, path, loader.key_given_twice)


def yaml_error(where: str, error: Exception) -> RecipeError:
    """One line for a YAML problem, with its line and column where the parser gives them."""
    if isinstance(error, RecursionError):  # the composer recurses once per level of nesting
        return RecipeError(f"{where}: invalid YAML (nested too deeply)")
    if isinstance(error, ValueError):  # e.g. an integer of more digits than Python converts
        return RecipeError(f"{where}: invalid YAML ({str(error)[:80]})")
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark
        position = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return RecipeError(f"{where}:{position}: invalid YAML ({error.problem})")
    # e.g. a control character, with a multi-line message
    return RecipeError(f"{where}: invalid YAML ({' '.join(str(error).split())})")


def recipe_of(data: Any, text: str, path: Path | None, key_given_twice: bool = False) -> Recipe:
    """The recipe of one YAML document's ``data`` (read from ``text``), checked."""
    where = str(path) if path else "recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a YAML mapping with merge_method and models")
    try:
        data, module, raw = unwrap_modules(
            data, _parameters(GLOBAL_PARAMETER_KEYS, GlobalParameters)
        )
        data, notes = adapt_recipe(data, raw)
        schema = dataclasses.replace(read_schema(data), module_parameters=module)
        notes += slice_notes(schema.slices)
    except RecipeError as error:  # a key or value quoted in the message stays on one line
        raise RecipeError(str(error).replace("\r", "\\r").replace("\n", "\\n")) from None
    if key_given_twice:
        notes = duplicate_key_notes(text) + notes
    recipe = Recipe(dataclasses.replace(schema, notes=tuple(notes)), text, path)
    check_rules(recipe)
    return recipe


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
    """``dtype``'s choices, or ``fp8``: the base's own FP8 format (``della_cli.quant``)."""
    if value == "fp8":
        return value
    if value is not None and value not in DTYPE_CHOICES:
        choices = ", ".join(f"'{name}'" for name in DTYPE_CHOICES)
        _fail(path, f"must be one of {choices} or 'fp8', got {shown(value)}")
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


def _parameters(keys: dict[str, tuple[str, Check]], kind: type[ModelParameters]) -> Check:
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
    "parameters": ("parameters", _parameters(PARAMETER_KEYS, ModelParameters)),
}
SLICES_KEY = (
    "slices",
    lambda value, path: read_slices(
        value,
        path,
        _parameters(PARAMETER_KEYS, ModelParameters),
        _parameters(GLOBAL_PARAMETER_KEYS, GlobalParameters),
    ),
)
RECIPE_KEYS: dict[str, tuple[str, Check]] = {
    "merge_method": ("merge_method", _required_string),
    "base_model": ("base_model", _optional_model_name),
    "models": ("models", _model_entries),
    "parameters": ("parameters", _parameters(GLOBAL_PARAMETER_KEYS, GlobalParameters)),
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


def check_rules(recipe: Recipe) -> None:
    """Rules that span fields: method, base, duplicates, which parameters apply, bounds."""
    schema = recipe.schema
    check_method(schema.merge_method)
    spec = recipe.method
    if not schema.models:
        raise RecipeError("models: must list at least one model")
    if schema.slices is not None:
        check_slice_bases(schema.slices, schema.base_model, spec)
    elif spec.needs_base and not schema.base_model:
        what = "merges task vectors" if spec.catalog is None else "merges into a base"
        raise RecipeError(f"base_model: {spec.name} {what} and needs a base_model")
    seen: dict[str, int] = {}
    for index, ref in enumerate(recipe.model_refs):
        if ref in seen:
            raise RecipeError(
                f"models.{index}.model: '{ref}' is listed twice (also models.{seen[ref]})"
            )
        seen[ref] = index
    source = schema.tokenizer_source
    if source not in (None, "base", "union", schema.base_model, *recipe.model_refs):
        names = ", ".join(f"'{ref}'" for ref in recipe.model_refs)
        raise RecipeError(
            f"tokenizer_source: '{source}' is neither base nor one of the models ({names}), "
            "nor union"
        )
    check_token_models(schema.tokenizer, schema.base_model, recipe.model_refs)
    _check_parameter_names(recipe)
    for group in parameter_groups(schema):
        if spec.catalog is not None:
            _check_catalog_method(recipe, group)
            continue
        for member in _merged_members(recipe, group):
            _check_expert_values(recipe, member, group)


def _merged_members(recipe: Recipe, group: ParameterGroup) -> list[Member]:
    """The inputs of ``group`` whose own parameters a merge reads: all but a listed base
    where the method merges into the base (``models:`` drops that entry when it is read)."""
    on_deltas = recipe.method.on_deltas
    return [m for m in group.members if not (on_deltas and m.model == group.base)]


def _check_catalog_method(recipe: Recipe, group: ParameterGroup) -> None:
    """A catalog method's input contract, required parameters and ranges (``catalog``), for
    the models or one slice's sources."""
    entry = recipe.method.catalog
    contract = entry.contract
    members = _merged_members(recipe, group)
    inputs = len(members)
    besides = " besides the base"
    if contract.base is BasePolicy.IGNORED:
        besides = " (the base_model counts as one)" if group.adds_base else ""
        listed = group.base in [m.model for m in members]
        inputs += bool(group.base) and not listed and group.adds_base
    elif contract.base is BasePolicy.OPTIONAL and not group.base:
        besides = ""
    least, most = contract.min_models, contract.max_models
    if inputs < least or (most is not None and inputs > most):
        if least == most:
            wanted = f"exactly {least}"
        else:
            wanted = f"at least {least}" if most is None else f"{least} to {most}"
        noun = "input" if contract.base is BasePolicy.IGNORED else "model"
        plural = "" if (most or least) == 1 else "s"
        raise RecipeError(
            f"{group.path}: {entry.name} takes {wanted} {noun}{plural}{besides}, got {inputs}"
        )
    for parameter in entry.parameters:
        attribute = parameter_attribute(parameter.name)
        if parameter.scope is Scope.SHARED:
            for path, block in group.upper:
                if getattr(block, attribute) is not None:
                    _check_catalog_value(entry.name, parameter, getattr(block, attribute), path)
            if all(getattr(block, attribute) is None for _, block in group.upper):
                _check_catalog_value(entry.name, parameter, None, group.upper[-1][0])
            continue
        for member in members:
            blocks = ((member.path, member.parameters), *group.upper)
            where, value = next(
                (
                    (path, getattr(b, attribute))
                    for path, b in blocks
                    if getattr(b, attribute) is not None
                ),
                (group.upper[-1][0], None),
            )
            if value is None and parameter.required:
                where = member.path
            _check_catalog_value(entry.name, parameter, value, where)
    uppers = [block for _, block in group.upper]
    normalize = _first_set(*(b.normalize_weights for b in uppers), True)
    if entry.name == "multislerp" and normalize and len(members) > 1:
        weights = [
            _first_set(m.parameters.weight, *(b.weight for b in uppers), 1.0) for m in members
        ]
        if not any(map(varies, weights)) and sum(weights) == 0:
            raise RecipeError(
                f"{group.path}: the multislerp weights sum to 0, so normalize_weights cannot "
                "divide by their sum; change a weight or set normalize_weights: false"
            )


def _first_set(*values: Any) -> Any:
    """The first value that is set (not None); the last is the default."""
    return next((value for value in values[:-1] if value is not None), values[-1])


def _check_catalog_value(method: str, parameter: Parameter, setting: Any, where: str) -> None:
    """A catalog parameter's value, or each value of its gradient or filters, in range."""
    path = f"{where}.{parameter.name}"
    if setting is None:
        if parameter.required:
            meaning = f" ({parameter.meaning})" if parameter.meaning else ""
            raise RecipeError(f"{path}: {method} needs {parameter.name}{meaning}; add it")
        return
    for value in leaves(setting):
        _check_in_range(parameter, value, path)


def _check_in_range(parameter: Parameter, value: Any, path: str) -> None:
    low, high = parameter.minimum, parameter.maximum
    if value is None or isinstance(value, bool):
        return
    if (low is not None and value < low) or (high is not None and value > high):
        interval = (
            f"[{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}]"
        )
        raise RecipeError(f"{path}: must be in {interval}, got {value}")


def _check_parameter_names(recipe: Recipe) -> None:
    """What mergekit knows but a method ignores was dropped with a note (recipe_compat); what
    is left that the method does not take is a ``rescale: true`` that mergekit would apply."""
    spec = recipe.method
    allowed = {*spec.expert_parameters, *spec.global_parameters, "int8_mask"}
    for key in recipe.schema.parameters.given:
        if key not in allowed:
            takes = ", ".join(spec.expert_parameters + spec.global_parameters)
            why = (
                "; mergekit would scale its kept deltas by their L1 norm, which della does only "
                "for the random methods"
                if key == "rescale"
                else ""
            )
            raise RecipeError(
                f"parameters.{key}: {spec.name} does not use {key} (it takes {takes}){why}"
            )


def _check_expert_values(recipe: Recipe, member: Member, group: ParameterGroup) -> None:
    """The bounds that join density with epsilon or gamma, for every tensor: where values vary,
    at every name the filters tell apart and every gradient's breakpoint (between two, each
    bound is linear in t, so holding at both ends it holds between)."""
    blocks = ((member.path, member.parameters), *group.upper)
    settings = [getattr(block, name) for _, block in blocks for name in EXPERT_FIELDS]
    if not any(varies(setting) for setting in settings):
        _check_expert_window(recipe, blocks, "", 0.0, "")
        return
    for name in sample_names(settings):
        for t in breakpoints(settings):
            parts = "' and '".join(name.split("\0"))
            place = f" at layer position t = {t:g}" + (
                f" for tensors containing '{parts}'" if name else ""
            )
            _check_expert_window(recipe, blocks, name, t, place)


def _check_expert_window(
    recipe: Recipe, blocks: tuple[tuple[str, Any], ...], tensor: str, t: float, where: str
) -> None:
    """``blocks``: (path, parameter block), the model's own first, the top level's last."""

    def path(name: str) -> str:
        found = (p for p, block in blocks if getattr(block, name) is not None)
        return f"{next(found, blocks[-1][0])}.{name}"

    params = recipe.expert_params_from(tuple(block for _, block in blocks), tensor, t)
    density = params.density
    in_window = (
        params.epsilon is None
        or density is None
        or density >= 1
        or (density - params.epsilon > 0 and density + params.epsilon <= 1)
    )
    if not in_window:
        defaulted = all(block.epsilon is None for _, block in blocks)
        whose, fix = (" (mergekit's default)", "set") if defaulted else ("", "lower")
        raise RecipeError(
            f"{path('epsilon')}: keep probabilities d ± ε must lie in (0, 1], but density "
            f"{density} and epsilon {params.epsilon}{whose} give [{density - params.epsilon:g}, "
            f"{density + params.epsilon:g}]{where}; {fix} epsilon"
        )
    if params.gamma is not None and density is not None and 1 > density > 1 - params.gamma:
        raise RecipeError(
            f"{path('gamma')}: density {density:g} plus gamma {params.gamma:g} exceeds 1{where}; "
            "lower one of them"
        )
