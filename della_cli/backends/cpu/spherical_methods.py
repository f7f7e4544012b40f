"""slerp, nuslerp, multislerp, karcher and model_stock on the CPU backend: what the plan's
``cpu/<method>`` kernels run (``methods.streamed`` is the torch backend's counterpart).

For a method and its settled parameters: which vectors it combines (the inputs, or their
task vectors around the base), the whole tensor's statistics from a pass over its row blocks
(``prepare``: per-row Gram matrices from ``spherical.gram_rows``, folded in row order), and
one output block (``apply``: the coefficients from ``coefficients``, then
``spherical.combine_rows``). Blocks are (rows, L) arrays as stored: the job's reference
(the base, or a model where the merge has none) and the experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from della_cli.backends.cpu import coefficients, spherical

# The methods this module runs are ``kernels.CPU_SPHERICAL_METHODS`` (planned without numba).
# Rows whose Gram matrices are computed at a time: at most 64K × n² float64 (8 MiB for n = 4).
GRAM_ROWS = 1 << 16
Blocks = Callable[[], Iterable[tuple[np.ndarray, list[np.ndarray]]]]


@dataclass(frozen=True)
class Vectors:
    """What a method combines in a block: ``inputs`` (minus the reference where
    ``subtract``), written by ``mode``, plus the reference where ``add_reference``."""

    inputs: list[np.ndarray]
    subtract: bool
    mode: int = spherical.SUM
    add_reference: bool = False


def vectors(
    method: str,
    values: Mapping[str, Any],
    reference: np.ndarray,
    experts: list[np.ndarray],
    has_base: bool,
) -> Vectors:
    """The vectors of ``method`` in a block (as ``methods.streamed`` hands them to the
    reference: a base only where the job has one)."""
    if method == "slerp":
        return Vectors([reference, experts[0]], False)
    if method == "nuslerp":
        return Vectors(experts[:2], has_base, spherical.SUM, has_base)
    if method == "multislerp":
        return Vectors(list(experts), has_base, spherical.SUM_FROM_ZERO, has_base)
    if method == "karcher":
        with_base = bool(values.get("base_input")) and has_base
        inputs = [*experts, reference] if with_base else list(experts)
        return Vectors(inputs, False, spherical.SUM_FROM_ZERO)
    if method == "model_stock":
        return Vectors(list(experts), True, spherical.STOCK)
    raise ValueError(f"the CPU backend does not run {method}")


def prepare(
    method: str,
    values: Mapping[str, Any],
    weights: Sequence[float],
    blocks: Blocks,
    has_base: bool,
) -> np.ndarray | None:
    """The coefficients (float64) of the whole tensor, from one pass over its blocks; None
    where a method has none to compute (one input: itself)."""
    total = None
    for reference, experts in blocks():
        chosen = vectors(method, values, reference, experts, has_base)
        for start, stop in _row_chunks(reference.shape[0]):
            rows = [x[start:stop] for x in chosen.inputs]
            gram = spherical.gram_rows(reference[start:stop], rows, chosen.subtract)
            total = spherical.fold_rows(total, gram)
    if total is None:
        raise ValueError("a tensor of no blocks")
    return _coefficients(method, values, weights, total)


def _coefficients(method, values, weights, gram: np.ndarray) -> np.ndarray | None:
    # NaN and Inf inputs give NaN coefficients quietly, as in torch (the engine warns once)
    with np.errstate(all="ignore"):
        return _coefficients_of(method, values, weights, gram)


def _coefficients_of(method, values, weights, gram: np.ndarray) -> np.ndarray | None:
    if method in ("slerp", "nuslerp"):
        stats = np.array([gram[..., 0, 0], gram[..., 1, 1], gram[..., 0, 1]])
        stats = np.moveaxis(stats, 0, -1)
        if method == "slerp":
            return np.stack(coefficients.slerp(stats, values["t"]), axis=-1)
        return np.stack(coefficients.nuslerp(stats, nuslerp_t(weights)), axis=-1)
    if gram.shape[-1] == 1 and method in ("multislerp", "karcher"):
        return None
    if method == "multislerp":
        eps = values["eps"]
        return coefficients.multislerp(gram, weights, values["normalize_weights"], eps)
    if method == "karcher":
        return coefficients.karcher(gram, values["max_iter"], values["tol"])
    t = coefficients.model_stock_t(gram).astype(np.float32)
    return np.stack([t, np.float32(1) - t], axis=-1)


def _row_chunks(rows: int) -> list[tuple[int, int]]:
    """Row ranges of at most ``GRAM_ROWS`` rows (one range for a block of none): the Gram
    matrices of a block of short rows (a (4M, 1) tensor's block has 4M rows) stay small."""
    return [(a, min(a + GRAM_ROWS, rows)) for a in range(0, max(rows, 1), GRAM_ROWS)]


def nuslerp_t(weights: Sequence[float]) -> float:
    """As ``spherical_pairs.nuslerp_t``."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def per_row(method: str, values: Mapping[str, Any]) -> bool:
    """Whether the coefficients are each row's own, from the block itself (no first pass)."""
    if method == "nuslerp":
        return not values["nuslerp_flatten"] and not values["nuslerp_row_wise"]
    return method == "model_stock" and bool(values["filter_wise"])


def apply(
    method: str,
    values: Mapping[str, Any],
    weights: Sequence[float],
    state: np.ndarray | None,
    reference: np.ndarray,
    experts: list[np.ndarray],
    has_base: bool,
    out_dtype: np.dtype,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One output block in ``out_dtype`` and, for the reference then each expert, whether it
    held a NaN or an Inf (where the merge has no base, the first expert's flag stands for the
    reference, as the torch backend reports)."""
    chosen = vectors(method, values, reference, experts, has_base)
    if per_row(method, values):
        state = np.concatenate(
            [
                np.asarray(_coefficients(method, values, weights, gram), dtype=np.float32)
                for gram in (
                    spherical.gram_rows(
                        reference[a:b], [x[a:b] for x in chosen.inputs], chosen.subtract
                    )
                    for a, b in _row_chunks(reference.shape[0])
                )
            ]
        )
    if state is None:  # one input: itself
        chosen = Vectors(chosen.inputs[:1], False)
        state = np.ones(1)
    width = 2 if chosen.mode == spherical.STOCK else len(chosen.inputs)  # (t, 1 − t)
    merged, flags = spherical.combine_rows(
        reference,
        chosen.inputs,
        np.asarray(state, dtype=np.float32).reshape(-1, width),
        mode=chosen.mode,
        subtract=chosen.subtract,
        add_reference=chosen.add_reference,
        out_dtype=out_dtype,
        out=out,
        check_reference=has_base and method != "slerp",
    )
    return merged, _input_flags(method, chosen, flags, len(experts), has_base)


def _input_flags(method, chosen: Vectors, flags: np.ndarray, experts: int, has_base: bool):
    """Flags in the engine's order (reference, then experts) from the kernel's (each input
    it combined, then the reference where it read it)."""
    result = np.zeros(experts + 1, dtype=np.bool_)
    if method == "slerp":
        result[0], result[1] = flags[0], flags[1]
        return result
    count = min(experts, len(chosen.inputs))
    result[1 : 1 + count] = flags[:count]
    if method == "karcher" and len(chosen.inputs) > experts:
        result[0] = flags[experts]  # the base as karcher's last input
    elif has_base:
        result[0] = flags[-1]
    else:
        result[0] = result[1]
    return result
