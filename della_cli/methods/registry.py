"""The merge methods, declared as data (ALGORITHMS.md, "Methods").

The task-arithmetic family is a point each in one generalized pipeline: a sparsifier applied to
each task vector, an optional sign consensus, a fuse that may normalize by the weights, and a
final scale. Adding such a method is adding a row here, not writing a new merge loop. mergekit's
other methods (slerp, passthrough, ...) are declared in ``catalog`` (parameters, contract,
passes) and join this table as rows carrying their catalog entry, once the engine runs them
(``RUNNING``); the others stay refused by name (``recipe_compat``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from della_cli.methods.catalog import CATALOG, BasePolicy, CatalogEntry, Scope


class Sparsifier(str, Enum):
    NONE = "none"
    MAGNITUDE = "magnitude"
    RANDOM = "random"
    MAGPRUNE = "magprune"
    MAGNITUDE_OUTLIERS = "magnitude_outliers"


# Parameters that every expert may set (and the recipe may default at the top level).
EXPERT_PARAMETERS = ("weight", "density", "epsilon", "gamma")
# Parameters that apply to the merge as a whole.
GLOBAL_PARAMETERS = ("lambda", "normalize", "rescale")


@dataclass(frozen=True)
class MethodSpec:
    """What a method does, which parameters it takes, and where it comes from."""

    name: str
    sparsifier: Sparsifier
    sign_consensus: bool
    normalize_default: bool
    needs_base: bool
    paper: str
    summary: str
    on_deltas: bool = True  # linear averages the models themselves, not their deltas
    catalog: CatalogEntry | None = None  # a method beyond the pipeline (``catalog``)

    @property
    def expert_parameters(self) -> tuple[str, ...]:
        if self.catalog is not None:
            shared = Scope.SHARED
            return tuple(p.name for p in self.catalog.parameters if p.scope is not shared)
        extra = {
            Sparsifier.NONE: (),
            Sparsifier.MAGNITUDE: ("density",),
            Sparsifier.RANDOM: ("density",),
            Sparsifier.MAGPRUNE: ("density", "epsilon"),
            Sparsifier.MAGNITUDE_OUTLIERS: ("density", "gamma"),
        }[self.sparsifier]
        return ("weight", *extra)

    @property
    def global_parameters(self) -> tuple[str, ...]:
        if self.catalog is not None:
            shared = Scope.SHARED
            return tuple(p.name for p in self.catalog.parameters if p.scope is shared)
        names = ("normalize",) if not self.on_deltas else ("lambda", "normalize")
        if self.sparsifier in (Sparsifier.RANDOM, Sparsifier.MAGPRUNE):
            names = (*names, "rescale")
        return names

    @property
    def required_parameters(self) -> tuple[str, ...]:
        """Parameters with no default: none, as density and epsilon take mergekit's defaults
        (1.0 and 0.15; the plan says so when a recipe leaves them out). A catalog method's
        required parameters (slerp's t, nuslerp's weight) have none."""
        if self.catalog is not None:
            return tuple(p.name for p in self.catalog.parameters if p.required)
        return ()

    @property
    def is_random(self) -> bool:
        return self.sparsifier in (Sparsifier.RANDOM, Sparsifier.MAGPRUNE)


_DELLA = "DELLA-Merging, Deep et al. 2024, arXiv:2406.11617"
_TIES = "TIES-Merging, Yadav et al. 2023, arXiv:2306.01708"
_DARE = "DARE, Yu et al. 2023, arXiv:2311.03099"
_TASK_ARITHMETIC = "Task Arithmetic, Ilharco et al. 2022, arXiv:2212.04089"
_BREADCRUMBS = "Model Breadcrumbs, Davari & Belilovsky 2023, arXiv:2312.06795"
_SOUPS = "Model Soups, Wortsman et al. 2022, arXiv:2203.05482"

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "linear",
            Sparsifier.NONE,
            False,
            True,
            False,
            _SOUPS,
            "weighted average of the models themselves",
            on_deltas=False,
        ),
        MethodSpec(
            "task_arithmetic",
            Sparsifier.NONE,
            False,
            False,
            True,
            _TASK_ARITHMETIC,
            "sum of weighted task vectors",
        ),
        MethodSpec(
            "ties",
            Sparsifier.MAGNITUDE,
            True,
            True,
            True,
            _TIES,
            "trim to the largest magnitudes, elect signs, disjoint mean",
        ),
        MethodSpec(
            "dare_linear",
            Sparsifier.RANDOM,
            False,
            False,
            True,
            _DARE,
            "random drop with rescale, then weighted sum",
        ),
        MethodSpec(
            "dare_ties",
            Sparsifier.RANDOM,
            True,
            False,
            True,
            _DARE,
            "random drop with rescale, elect signs, weighted sum of agreeing deltas",
        ),
        MethodSpec(
            "breadcrumbs",
            Sparsifier.MAGNITUDE_OUTLIERS,
            False,
            False,
            True,
            _BREADCRUMBS,
            "drop outliers and small magnitudes, then weighted sum",
        ),
        MethodSpec(
            "breadcrumbs_ties",
            Sparsifier.MAGNITUDE_OUTLIERS,
            True,
            False,
            True,
            _BREADCRUMBS,
            "breadcrumbs pruning with sign election",
        ),
        MethodSpec(
            "della",
            Sparsifier.MAGPRUNE,
            True,
            True,
            True,
            _DELLA,
            "MAGPRUNE rank-based drop with rescale, elect signs, disjoint mean, lambda",
        ),
        MethodSpec(
            "della_linear",
            Sparsifier.MAGPRUNE,
            False,
            False,
            True,
            _DELLA,
            "MAGPRUNE rank-based drop with rescale, then weighted sum, lambda",
        ),
    )
}


# The catalog's methods the engine runs, in the order of their use on the Hub.
RUNNING = (
    "slerp",
    "passthrough",
    "nuslerp",
    "model_stock",
    "sce",
    "multislerp",
    "karcher",
    "nearswap",
    "arcee_fusion",
    "ram",
    "ramplus_tl",
)


def _from_catalog(entry: CatalogEntry) -> MethodSpec:
    """A catalog method as a row of ``METHODS``: no sparsifier, election or normalize of the
    pipeline; a base listed under ``models`` is the base (dropped from the inputs, as mergekit
    does) unless the method takes the base as an ordinary input (karcher, passthrough)."""
    return MethodSpec(
        entry.name,
        Sparsifier.NONE,
        False,
        False,
        entry.contract.base is BasePolicy.REQUIRED,
        entry.reference,
        entry.summary,
        on_deltas=entry.contract.base is not BasePolicy.IGNORED,
        catalog=entry,
    )


METHODS.update({name: _from_catalog(CATALOG[name]) for name in RUNNING})
