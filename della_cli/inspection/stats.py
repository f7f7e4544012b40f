"""What the experts' task vectors look like, tensor by tensor, from blocks of rows.

Per tensor, sums that add up over blocks and over tensors (``TensorStats``), from which every
ratio of ``della inspect`` is derived: norms and dot products of the task vectors δ_t, sign
conflicts, each expert's top-d mask (TIES, arXiv 2306.01708) and what each sparsifier keeps of
the delta's L1 mass at the expert's density d (and ε, γ):

- TIES trim keeps the top ⌊d·N⌋ magnitudes of the tensor: their share of ‖δ‖₁.
- DARE (arXiv 2311.03099) keeps each entry with probability d: an expected share of d, by
  construction, whatever δ is (no pass needed).
- MAGPRUNE (DELLA, arXiv 2406.11617) keeps the entry of ascending rank r in a row of n with
  probability k_r = d − ε + 2ε·r/(n − 1): an expected share Σ_r k_r·|δ|₍ᵣ₎ / ‖δ‖₁, computed from
  each row sorted, with no randomness (and ≥ d, since k rises with magnitude).
- breadcrumbs (arXiv 2312.06795) keeps the ⌊d·N⌋ magnitudes below the ⌊γN⌋ largest.

Shares are of the mass before any rescale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from della_cli.inspection.arrays import NumpyArrays, TorchArrays
from della_cli.inspection.select import ExpertCuts, RankCut
from della_cli.methods.counts import magnitude_rank_window

KEPT_METHODS = ("ties", "dare", "magprune", "breadcrumbs")
# A task vector this large next to the reference tensor is no fine-tune of it: the expert has
# its own weights there (another base, another training run).
FOREIGN_NORM = 0.5


@dataclass(frozen=True)
class Sparsity:
    """One expert's density, epsilon and gamma for one tensor."""

    density: float
    epsilon: float
    gamma: float


@dataclass
class TensorStats:
    """Sums over the entries of one tensor (or of several: ``add``) for T experts."""

    tensors: int
    entries: int
    base_sq: float  # Σ θ₀² (θ₀: the base, or the models' mean)
    dot: np.ndarray  # (T, T): Σ δ_s δ_t
    l1: np.ndarray  # (T,): Σ |δ_t|
    conflict: int  # entries where some δ is > 0 and another < 0
    topd: np.ndarray  # (T, T): |M_s ∩ M_t|, M_t the top-d mask of expert t
    topd_conflict: np.ndarray  # (T,): entries of M_t where another δ has the opposite sign
    kept: dict[str, np.ndarray]  # method -> (T,) L1 mass kept (expected, for random ones)
    foreign: np.ndarray  # (T,): entries of tensors where ‖δ_t‖ ≥ FOREIGN_NORM · ‖θ₀‖

    @classmethod
    def zero(cls, experts: int) -> TensorStats:
        square, vector = np.zeros((experts, experts)), np.zeros(experts)
        kept = {name: vector.copy() for name in KEPT_METHODS}
        return cls(
            0, 0, 0.0, square, vector.copy(), 0, square.copy(), vector.copy(), kept, vector.copy()
        )

    def add(self, other: TensorStats) -> None:
        self.tensors += other.tensors
        self.entries += other.entries
        self.base_sq += other.base_sq
        self.dot += other.dot
        self.l1 += other.l1
        self.conflict += other.conflict
        self.topd += other.topd
        self.topd_conflict += other.topd_conflict
        self.foreign += other.foreign
        for name in KEPT_METHODS:
            self.kept[name] += other.kept[name]

    def metrics(self) -> dict:
        """The ratios ``della inspect`` reports (None where a norm or a count is zero)."""
        norms = np.sqrt(np.diag(self.dot))
        base_norm = math.sqrt(self.base_sq)
        counts = np.diag(self.topd)
        union = counts[:, None] + counts[None, :] - self.topd
        return {
            "tensors": self.tensors,
            "entries": self.entries,
            "relative_norm": [_ratio(n, base_norm) for n in norms],
            "foreign_share": [_ratio(f, self.entries) for f in self.foreign],
            "cosine": _matrix(self.dot, np.outer(norms, norms)),
            "sign_conflict": _ratio(self.conflict, self.entries),
            "topd_sign_conflict": [
                _ratio(c, n) for c, n in zip(self.topd_conflict, counts, strict=True)
            ],
            "topd_jaccard": _matrix(self.topd, union),
            "kept_mass": {
                name: [_ratio(k, n) for k, n in zip(mass, self.l1, strict=True)]
                for name, mass in self.kept.items()
            },
        }


def _ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator; None where undefined (a zero norm or count, NaN or Inf in an
    input), which JSON writes as null."""
    if not denominator > 0:
        return None
    value = float(numerator) / float(denominator)
    return value if math.isfinite(value) else None


def _matrix(numerators: np.ndarray, denominators: np.ndarray) -> list[list[float | None]]:
    return [
        [_ratio(a, b) for a, b in zip(*row, strict=True)]
        for row in zip(numerators, denominators, strict=True)
    ]


# rows start:stop -> the reference's and each expert's, as float32 (rows, n) arrays
BlockReader = Callable[[int, int], tuple[Any, list[Any]]]


def tensor_stats(
    read_block: BlockReader,
    blocks: list[tuple[int, int]],
    numel: int,
    params: list[Sparsity],
    arrays: NumpyArrays | TorchArrays,
) -> TensorStats:
    """The sums of one tensor of ``numel`` entries from ``read_block(start, stop)``, which
    gives rows ``start:stop`` of the reference and of each expert as float32 (rows, n) arrays
    of ``arrays``' kind. Where a density is below 1, two histogram passes over the blocks find
    each expert's exact top-d and breadcrumbs cuts first; then one pass sums."""
    selections = [ExpertCuts(numel, _cut_ranks(numel, p)) for p in params]
    if any(selection.needs_passes for selection in selections):
        for step in ("add_high", "add_low"):
            for start, stop in blocks:
                _, deltas = _deltas(read_block, start, stop)
                for delta, selection in zip(deltas, selections, strict=True):
                    if selection.needs_passes:
                        getattr(selection, step)(arrays.keys(delta), arrays)
    cuts = [selection.cuts() for selection in selections]
    stats = TensorStats.zero(len(params))
    stats.tensors, stats.entries = 1, numel
    for start, stop in blocks:
        reference, deltas = _deltas(read_block, start, stop)
        _add_block(stats, reference, deltas, cuts, params, arrays)
    stats.kept["dare"] = np.array([p.density for p in params]) * stats.l1
    squares = np.diag(stats.dot)
    large = (squares >= FOREIGN_NORM**2 * stats.base_sq) & (squares > 0)
    stats.foreign = np.where(large, float(numel), 0.0)
    return stats


def _cut_ranks(numel: int, params: Sparsity) -> list[int]:
    """The ranks where TIES's top-d and the breadcrumbs window start, and where the window
    ends; a density of 1 keeps everything, for every sparsifier (ALGORITHMS.md)."""
    if params.density >= 1:
        return [0, 0, numel]
    top_d = magnitude_rank_window(numel, params.density, None)[0]
    return [top_d, *magnitude_rank_window(numel, params.density, params.gamma)]


def _deltas(read_block: BlockReader, start: int, stop: int) -> tuple[Any, list[Any]]:
    reference, models = read_block(start, stop)
    return reference, [model - reference for model in models]


def _add_block(
    stats: TensorStats,
    reference,
    deltas: list,
    cuts: list[list[RankCut]],
    params: list[Sparsity],
    arrays: NumpyArrays | TorchArrays,
) -> None:
    flat = arrays.stack([delta.reshape(-1) for delta in deltas])  # (T, m) float32
    wide = arrays.float64(flat)
    stats.dot += arrays.host(wide @ wide.T)
    flat_reference = arrays.float64(reference.reshape(-1))
    stats.base_sq += float(flat_reference @ flat_reference)
    magnitude = abs(flat)
    stats.l1 += arrays.host(arrays.sum64(magnitude, axis=1))
    positive, negative = flat > 0, flat < 0
    any_positive, any_negative = arrays.any(positive, 0), arrays.any(negative, 0)
    stats.conflict += arrays.count(any_positive & any_negative)
    # another expert opposes δ_t where δ_t > 0 and some δ < 0, or the reverse (δ_t itself
    # has one sign, so "some" can only be another expert)
    opposed = (positive & any_negative) | (negative & any_positive)
    masks, windows = [], []
    for delta, (topd, low, high) in zip(deltas, cuts, strict=True):
        keys = arrays.keys(delta)
        masks.append(topd.mask(keys, arrays))
        windows.append(low.mask(keys, arrays) & ~high.mask(keys, arrays))
    kept = arrays.stack(masks)
    stats.topd += arrays.overlaps(kept)
    stats.topd_conflict += arrays.host(arrays.sum64(opposed & kept, axis=1))
    stats.kept["ties"] += arrays.host(arrays.sum64(magnitude * kept, axis=1))
    stats.kept["breadcrumbs"] += arrays.host(
        arrays.sum64(magnitude * arrays.stack(windows), axis=1)
    )
    for t, delta in enumerate(deltas):
        stats.kept["magprune"][t] += _magprune_mass(delta, params[t], arrays)


def _magprune_mass(delta, params: Sparsity, arrays: NumpyArrays | TorchArrays) -> float:
    """Σ k_i·|δ_i| over rows of ``delta`` (rows, n): the expected L1 mass MAGPRUNE keeps."""
    n = delta.shape[-1]
    if n == 0:
        return 0.0
    if params.density >= 1:
        return float(arrays.sum64(abs(delta)))
    ascending = arrays.sort_rows(abs(delta))
    if n == 1:
        return params.density * float(arrays.sum64(ascending))
    rank = arrays.arange64(n) / (n - 1)
    keep_prob = params.density - params.epsilon + 2 * params.epsilon * rank
    return float(arrays.sum64(arrays.float64(ascending) @ keep_prob))
