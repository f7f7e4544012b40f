"""The recipe's schema: the dataclasses a checked recipe is made of (``recipe_fields`` fills
them from YAML, field by field), and the constants their checks share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from della_cli.recipe_slices import OutputSlice
from della_cli.recipe_tokenizer import TokenizerSettings

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
