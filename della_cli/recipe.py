"""The YAML recipe: reading it, and each model's parameters for each tensor.

The format is mergekit's for whole-model merges, so published recipes run unchanged; where our
semantics differ, ALGORITHMS.md says so. Every problem is reported as a ``RecipeError`` whose
message starts with the field path (``models.1.parameters.density: must be in (0, 1], got
1.3``) before any model is opened. The schema is in ``recipe_schema``, each field's checks
in ``recipe_fields``, the rules that span fields in ``recipe_rules``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from della_cli.errors import RecipeError
from della_cli.methods import METHODS, ExpertParams, GlobalParams, MethodSpec, Rescale
from della_cli.methods.catalog import Scope
from della_cli.recipe_compat import MERGEKIT_DEFAULTS, adapt_recipe, duplicate_key_notes
from della_cli.recipe_fields import (
    GLOBAL_PARAMETER_KEYS,
    parameter_attribute,
    parameters_check,
    read_schema,
)
from della_cli.recipe_rules import check_rules
from della_cli.recipe_schema import (
    DEFAULT_GAMMA,
    GlobalParameters,
    ModelEntry,
    ModelParameters,
    RecipeSchema,
)
from della_cli.recipe_scopes import own_block, parameter_blocks, shared_blocks
from della_cli.recipe_settings import layer_position, resolve, varies
from della_cli.recipe_slices import place_of, slice_notes
from della_cli.recipe_slices_read import unwrap_modules
from della_cli.recipe_yaml import MAX_RECIPE_BYTES, RecipeLoader, load_yaml, seed_edit

# Re-exported: other modules and the tests import these from here.
__all__ = [
    "DEFAULT_GAMMA",
    "ModelEntry",
    "Recipe",
    "RecipeSchema",
    "load_recipe",
    "load_yaml",
    "parameter_attribute",
    "parse_recipe",
    "read_recipe_text",
    "recipe_of",
    "yaml_error",
]


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
            data, parameters_check(GLOBAL_PARAMETER_KEYS, GlobalParameters)
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
