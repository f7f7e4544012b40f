"""Resolved, validated parameters handed to the tensor functions (plain data, no parsing)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Rescale(str, Enum):
    """How survivors of a random drop are rescaled (ALGORITHMS.md, "Rescale")."""

    KEEP_PROB = "keep_prob"  # the papers' rule: divide each survivor by its keep probability
    L1 = "l1"  # mergekit since 2025: restore the tensor's L1 norm
    NONE = "none"  # keep survivors as they are


@dataclass(frozen=True)
class ExpertParams:
    """One expert's parameters for one tensor."""

    weight: float = 1.0
    density: float | None = None
    epsilon: float | None = None
    gamma: float | None = None
    scale: float | None = None  # passthrough: the factor of its one input (None: as stored)


@dataclass(frozen=True)
class GlobalParams:
    """Parameters shared by all experts of a merge."""

    lambda_: float = 1.0
    normalize: bool = True
    rescale: Rescale = Rescale.KEEP_PROB
