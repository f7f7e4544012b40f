"""The methods mergekit 0.1.5 has beyond the task-arithmetic family, declared as data.

For each: its parameters (scope, default, range), its input contract, its reference, the
statistics it needs over the whole tensor and the passes a streaming engine makes over row
blocks (ALGORITHMS.md, sections S1-S11). The torch reference of each lives in
``spherical_pairs``, ``spherical_means``, ``entrywise``, ``stock`` and ``selection``, and
``streamed`` runs them in passes. The methods the engine runs join ``registry.METHODS`` from
here (``registry.RUNNING``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Scope(str, Enum):
    SHARED = "shared"  # one value per tensor (top level, slice, or filter)
    PER_INPUT = "per_input"  # one value per input, the base included
    PER_NON_BASE = "per_non_base"  # one value per input other than the base


class BasePolicy(str, Enum):
    REQUIRED = "required"
    OPTIONAL = "optional"  # with a base, the method works on task vectors
    IGNORED = "ignored"  # a base is an ordinary input


REQUIRED = None  # the default of a parameter a recipe must set


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: type  # float, int or bool
    scope: Scope
    default: float | int | bool | None  # REQUIRED (None) for a required parameter
    minimum: float | None = None  # inclusive, None when unbounded
    maximum: float | None = None
    optional: bool = False  # None is a valid value (passthrough's scale)
    meaning: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED and not self.optional


@dataclass(frozen=True)
class Contract:
    base: BasePolicy
    min_models: int  # inputs besides the base (every input where the base is IGNORED)
    max_models: int | None


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    reference: str
    summary: str
    parameters: tuple[Parameter, ...]
    contract: Contract
    statistics: str  # what the first pass accumulates; "" when the method is entry- or row-local
    passes: tuple[str, ...]  # the passes over the row blocks, in order


_T = Parameter("t", float, Scope.SHARED, REQUIRED, meaning="interpolation factor: 0 = base")
_WEIGHT = Parameter("weight", float, Scope.PER_NON_BASE, REQUIRED, meaning="relative weight")
_EPSILON_RAM = Parameter(
    "epsilon", float, Scope.SHARED, 1e-5, 0.0, meaning="|δ| above which a model contributes"
)
_MERGE = "merge"

CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            "slerp",
            "Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH)",
            "spherical interpolation between the base and one model",
            (_T,),
            Contract(BasePolicy.REQUIRED, 1, 1),
            "Σθ₀², Σθ₁², Σθ₀θ₁ (3 scalars)",
            ("statistics", _MERGE),
        ),
        CatalogEntry(
            "nuslerp",
            "mergekit nuslerp (Goddard 2024)",
            "slerp of two models, or of their task vectors around a base",
            (
                _WEIGHT,
                Parameter("nuslerp_flatten", bool, Scope.SHARED, True),
                Parameter("nuslerp_row_wise", bool, Scope.SHARED, False),
            ),
            Contract(BasePolicy.OPTIONAL, 2, 2),
            "Σv₀², Σv₁², Σv₀v₁ per tensor (flatten) or per column (row_wise); none per row",
            ("statistics", _MERGE),
        ),
        CatalogEntry(
            "multislerp",
            "Goddard 2024, goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            "barycentric interpolation of n directions, scaled by the weighted mean norm",
            (
                _WEIGHT,
                Parameter("normalize_weights", bool, Scope.SHARED, True),
                Parameter("eps", float, Scope.SHARED, 1e-8, 0.0),
            ),
            Contract(BasePolicy.OPTIONAL, 1, None),
            "Gram matrix of the n (task) vectors: n(n+1)/2 sums",
            ("statistics", _MERGE),
        ),
        CatalogEntry(
            "karcher",
            "Karcher 1977, Riemannian center of mass and mollifier smoothing (CPAM)",
            "Riemannian mean of the inputs' directions, scaled by their mean norm",
            (
                Parameter("max_iter", int, Scope.SHARED, 10, 0),
                Parameter("tol", float, Scope.SHARED, 1e-5, 0.0),
            ),
            Contract(BasePolicy.IGNORED, 1, None),
            "Gram matrix of the n inputs: n(n+1)/2 sums; the iteration runs on it",
            ("statistics", _MERGE),
        ),
        CatalogEntry(
            "nearswap",
            "alchemonaut, huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
            "entries within t of the other model take it; the rest move t toward it",
            (_T,),
            Contract(BasePolicy.REQUIRED, 1, 1),
            "",
            (_MERGE,),
        ),
        CatalogEntry(
            "model_stock",
            "Jang et al. 2024, Model Stock, arXiv:2403.19522",
            "move from the base toward the models' mean by their mean pairwise cosine",
            (Parameter("filter_wise", bool, Scope.SHARED, False),),
            Contract(BasePolicy.REQUIRED, 2, None),
            "Gram matrix of the task vectors (per tensor); none when filter_wise",
            ("statistics", _MERGE),
        ),
        CatalogEntry(
            "sce",
            "Wan et al. 2024, FuseChat (SCE), arXiv:2408.07990",
            "select by variance, elect signs, fuse with mean-square weights",
            (
                Parameter("select_topk", float, Scope.SHARED, 1.0, 0.0, 1.0),
                Parameter("int8_mask", bool, Scope.SHARED, False, meaning="no effect on values"),
            ),
            Contract(BasePolicy.REQUIRED, 1, None),
            "count of nonzero variances; exact top-k of the variance by radix selection "
            "(the count in its first pass); Σ(masked δᵢ)² per model",
            ("count and select", "select", "statistics", _MERGE),
        ),
        CatalogEntry(
            "ram",
            "Reinforced Agent Merging, arXiv:2601.13572",
            "unique changes kept, overlapping changes averaged",
            (_EPSILON_RAM,),
            Contract(BasePolicy.REQUIRED, 1, None),
            "",
            (_MERGE,),
        ),
        CatalogEntry(
            "ramplus_tl",
            "Reinforced Agent Merging (RAM+, tensor-local), arXiv:2601.13572",
            "RAM with each model's unique changes scaled up by its overlap ratio",
            (
                Parameter("r", float, Scope.SHARED, 0.1, meaning="boost per unit of overlap"),
                Parameter("alpha", float, Scope.SHARED, 0.2, 0.0, meaning="cap on the ratio"),
                _EPSILON_RAM,
            ),
            Contract(BasePolicy.REQUIRED, 1, None),
            "per model: contributing entries that are shared, and that are unique (counts)",
            ("statistics", _MERGE),
        ),
        CatalogEntry(
            "arcee_fusion",
            "Arcee AI, Arcee Fusion (mergekit 0.1.5, merge_methods/arcee_fusion.py)",
            "keep the changes whose importance |Δ|·KL(row) is an upper outlier",
            (),
            Contract(BasePolicy.REQUIRED, 1, 1),
            "exact quartiles of the importance by radix selection (3 order statistics "
            "sharing their passes)",
            ("select", "select", _MERGE),
        ),
        CatalogEntry(
            "passthrough",
            "mergekit passthrough",
            "copy the one input, optionally scaled",
            (Parameter("scale", float, Scope.PER_INPUT, None, optional=True),),
            Contract(BasePolicy.IGNORED, 1, 1),
            "",
            (_MERGE,),
        ),
    )
}

__all__ = ["CATALOG", "REQUIRED", "BasePolicy", "CatalogEntry", "Contract", "Parameter", "Scope"]
