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

import numpy as np
import torch

from della_cli.inspection.select import RankCut, RankSelection, magnitude_keys
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
    return float(numerator) / float(denominator) if denominator > 0 else None


def _matrix(numerators: np.ndarray, denominators: np.ndarray) -> list[list[float | None]]:
    return [
        [_ratio(a, b) for a, b in zip(*row, strict=True)]
        for row in zip(numerators, denominators, strict=True)
    ]


# rows start:stop -> the reference's and each expert's, float32 (rows, n) on the device
BlockReader = Callable[[int, int], tuple[torch.Tensor, list[torch.Tensor]]]


def tensor_stats(
    read_block: BlockReader,
    blocks: list[tuple[int, int]],
    numel: int,
    params: list[Sparsity],
    device: torch.device,
) -> TensorStats:
    """The sums of one tensor of ``numel`` entries, from ``read_block(start, stop)``, which
    gives rows ``start:stop`` of the reference and of each expert as float32 (rows, n)
    tensors on ``device``. With a density below 1, two histogram passes over the blocks find
    each expert's exact top-d (and breadcrumbs) cuts first; then one pass sums."""
    experts = len(params)
    windows = [
        (
            magnitude_rank_window(numel, p.density, None)[0],
            *magnitude_rank_window(numel, p.density, p.gamma),
        )
        for p in params
    ]
    selections = [[RankSelection(numel, rank, device) for rank in w] for w in windows]
    if any(s.needs_passes for row in selections for s in row):
        for step in ("add_high", "add_low"):
            for start, stop in blocks:
                _, deltas = _deltas(read_block, start, stop)
                for delta, row in zip(deltas, selections, strict=True):
                    keys = magnitude_keys(delta).reshape(-1)
                    for selection in row:
                        if selection.needs_passes:
                            getattr(selection, step)(keys)
    cuts = [[s.cut() for s in row] for row in selections]
    stats = TensorStats.zero(experts)
    stats.tensors, stats.entries = 1, numel
    for start, stop in blocks:
        reference, deltas = _deltas(read_block, start, stop)
        _add_block(stats, reference, deltas, cuts, params)
    stats.kept["dare"] = np.array([p.density for p in params]) * stats.l1
    large = np.diag(stats.dot) >= FOREIGN_NORM**2 * stats.base_sq
    stats.foreign = np.where(large & (np.diag(stats.dot) > 0), float(numel), 0.0)
    return stats


def _deltas(
    read_block: BlockReader, start: int, stop: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    reference, models = read_block(start, stop)
    return reference, [model - reference for model in models]


def _add_block(
    stats: TensorStats,
    reference: torch.Tensor,
    deltas: list[torch.Tensor],
    cuts: list[list[RankCut]],
    params: list[Sparsity],
) -> None:
    flat = torch.stack([delta.reshape(-1) for delta in deltas]).double()  # (T, m)
    stats.base_sq += float(reference.double().square().sum())
    stats.dot += (flat @ flat.T).cpu().numpy()
    magnitude = flat.abs()
    stats.l1 += magnitude.sum(dim=1).cpu().numpy()
    signs = torch.sign(flat)
    stats.conflict += int(((signs > 0).any(0) & (signs < 0).any(0)).sum())
    masks, windows = [], []
    for delta, (topd, low, high) in zip(deltas, cuts, strict=True):
        keys = magnitude_keys(delta).reshape(-1)
        masks.append(topd.mask(keys))
        windows.append(low.mask(keys) & ~high.mask(keys))
    kept = torch.stack(masks)
    stats.topd += (kept.double() @ kept.double().T).cpu().numpy()
    for t in range(len(deltas)):
        others = torch.cat([signs[:t], signs[t + 1 :]])
        opposed = (others == -signs[t]).any(0) & (signs[t] != 0)
        stats.topd_conflict[t] += int((opposed & kept[t]).sum())
        stats.kept["ties"][t] += float(magnitude[t][kept[t]].sum())
        stats.kept["breadcrumbs"][t] += float(magnitude[t][windows[t]].sum())
        stats.kept["magprune"][t] += _magprune_mass(deltas[t], params[t])


def _magprune_mass(delta: torch.Tensor, params: Sparsity) -> float:
    """Σ k_i·|δ_i| over rows of ``delta`` (rows, n): the expected L1 mass MAGPRUNE keeps."""
    n = delta.shape[-1]
    if n == 0:
        return 0.0
    ascending = torch.sort(delta.abs(), dim=-1).values.double()
    if n == 1:
        keep_prob = torch.full((1,), params.density, dtype=torch.float64, device=delta.device)
    else:
        rank = torch.arange(n, dtype=torch.float64, device=delta.device) / (n - 1)
        keep_prob = params.density - params.epsilon + 2 * params.epsilon * rank
    return float((ascending * keep_prob).sum())
