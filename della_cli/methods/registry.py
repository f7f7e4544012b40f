"""The merge methods, declared as data (ALGORITHMS.md, "Methods").

Each method is a point in one generalized pipeline: a sparsifier applied to each task vector, an
optional sign consensus, a fuse that may normalize by the weights, and a final scale. Adding a
method is adding a row here, not writing a new merge loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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

    @property
    def expert_parameters(self) -> tuple[str, ...]:
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
        names = ("normalize",) if not self.on_deltas else ("lambda", "normalize")
        if self.sparsifier in (Sparsifier.RANDOM, Sparsifier.MAGPRUNE):
            names = (*names, "rescale")
        return names

    @property
    def required_parameters(self) -> tuple[str, ...]:
        """Parameters with no default: none, as density and epsilon take mergekit's defaults
        (1.0 and 0.15; the plan says so when a recipe leaves them out)."""
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
