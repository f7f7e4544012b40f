"""The catalog's methods (``catalog``) as the engine runs them: passes over row blocks.

For a method and its settled parameters: how many passes it makes over a tensor's row blocks
(``passes``); what it learns of the whole tensor before merging (``prepare``: partial sums added
over the blocks, or the radix passes of an exact order statistic, each pass reading every
block again through ``blocks()``); and one output block from that and the block's inputs
(``apply``, called on the blocks in order). The math is the reference's
(``spherical_pairs``, ``spherical_means``, ``entrywise``, ``stock``, ``selection``); here only
the dispatch. Blocks arrive as slices along dim 0 in their tensor's own shape (a 1-D tensor
whole), in the compute dtype; ``base`` is None for a merge without one. Planning reads
``passes`` without importing torch (the reference modules are imported on first use).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from della_cli.methods.parameters import ExpertParams

if TYPE_CHECKING:
    import torch

    Block = tuple[torch.Tensor | None, list[torch.Tensor]]
    Blocks = Callable[[], Iterable[Block]]

# The key of a kernel's values saying that the base_model is one of the inputs (karcher).
BASE_INPUT = "base_input"
# Entries of the row chunks a catalog method merges a CPU block in (at least one row): each
# of its float32 temporaries then stays in the core's L2 cache (256 KiB of 2 MiB here), where
# the same chain of elementwise torch ops over a whole 4M-entry block streams every
# temporary through memory and faults in its fresh pages. Statistics (summed per row, then
# over rows in float64) and order statistics do not depend on how the rows are split. On
# CUDA a block goes whole: small kernels would only add launches.
# The CPU backend's kernels (``backends.cpu.catalog``) merge in the same chunks, so that sums
# made per chunk are the same there.
CPU_CHUNK_ELEMENTS = 1 << 16
# Tensors of fewer entries (a CPU block) have the keys of their order statistics kept by the
# CPU kernels after their first pass (``backends.cpu.catalog_select``; 16 MiB at most): the
# later digits read no block and make no score again.
KEYS_KEPT_BELOW = 1 << 22
# arcee_fusion's CPU kernels keep the keys of a larger tensor too where they fit in this budget
# (issue 17): its importance is torch's softmax, several times the cost of reading the block,
# so made once, not again for the second radix digit and the merge pass. At ~1.1B every
# tensor is kept, the embeddings and lm_head too (250 MiB of keys each: made afresh in each
# pass under a 64 MiB budget, they took a quarter of the merge's time); at ~7B all but the
# embeddings of a large vocabulary (Llama 3's, 2 GiB of keys), which are made afresh in each
# pass, so memory stays bounded by the budget.
ARCEE_KEYS_KEPT_BYTES = 512 << 20
# Radix digits of an order statistic per compute dtype (16 bits a pass).
_DIGITS = {"F32": 2, "F64": 4}


def _layout(values: Mapping[str, Any]) -> str:
    from della_cli.methods.spherical_pairs import nuslerp_layout

    return nuslerp_layout(values["nuslerp_flatten"], values["nuslerp_row_wise"])


def keys_kept(method: str, numel: int) -> bool:
    """Whether the CPU kernels keep a tensor's order-statistic keys after their first pass:
    below ``KEYS_KEPT_BELOW`` entries, and arcee_fusion's within ``ARCEE_KEYS_KEPT_BYTES``."""
    if numel < KEYS_KEPT_BELOW:
        return True
    return method == "arcee_fusion" and 4 * numel <= ARCEE_KEYS_KEPT_BYTES


def passes(
    method: str,
    values: Mapping[str, Any],
    models: int,
    compute: str = "F32",
    keys_kept: bool = False,
) -> int:
    """Passes over a tensor's row blocks, the merge pass included, for ``models`` inputs
    besides the base. ``keys_kept``: the order statistic's keys are kept after its first pass
    (the CPU kernels do so where ``keys_kept``), so its later digits read no block."""
    digits = 1 if keys_kept else _DIGITS.get(compute, 2)
    if method in ("passthrough", "nearswap", "ram"):
        return 1
    if method == "nuslerp" and not values["nuslerp_flatten"] and not values["nuslerp_row_wise"]:
        return 1  # per row: a block holds whole rows
    if method == "model_stock" and values["filter_wise"]:
        return 1
    if method == "multislerp" and models == 1:
        return 1  # one model is itself
    if method == "karcher" and models + bool(values.get(BASE_INPUT)) == 1:
        return 1
    if method == "sce":  # the radix passes (the first also counts), the weights, the merge
        topk = values["select_topk"]
        return 2 + (digits if 0 < topk < 1 else 0)
    if method == "arcee_fusion":
        return digits + 1  # the radix passes the three quartiles share, then the merge
    return 2


def statistics_bytes(method: str, values: Mapping[str, Any], shape: tuple[int, ...], n: int) -> int:
    """Bytes of what ``prepare`` keeps for one tensor until its merge pass ends (float64)."""
    if method == "nuslerp" and values.get("nuslerp_row_wise") and not values["nuslerp_flatten"]:
        return 3 * 8 * math.prod(shape[1:])  # three sums per column
    if method in ("multislerp", "karcher", "model_stock"):
        return 8 * n * n
    if method in ("sce", "arcee_fusion"):
        numel = math.prod(shape)
        kept = 4 * numel if keys_kept(method, numel) else 0  # the CPU kernels' kept keys
        return 8 * (1 << 16) + kept  # a radix histogram
    return 8 * 3 * max(n, 1)


def prepare(
    method: str,
    values: Mapping[str, Any],
    params: Sequence[ExpertParams],
    blocks: Blocks,
    numel: int,
) -> Any:
    """What ``apply`` needs of the whole tensor, from passes over its blocks."""
    from della_cli.methods import selection
    from della_cli.methods import spherical_means as means
    from della_cli.methods import spherical_pairs as pairs

    weights = [p.weight for p in params]
    if method == "slerp":
        return _folded(
            blocks, lambda total, base, models: pairs.slerp_statistics(base, models[0], total)
        )
    if method == "nuslerp":
        layout = _layout(values)
        return _folded(
            blocks,
            lambda total, base, models: pairs.nuslerp_statistics(*models[:2], base, layout, total),
        )
    if method == "multislerp":
        gram = _folded(
            blocks, lambda total, base, models: means.gram_statistics(models, base, total)
        )
        return means.multislerp_coefficients(
            gram, weights, values["normalize_weights"], values["eps"]
        )
    if method == "karcher":
        gram = _folded(
            blocks,
            lambda total, base, models: means.gram_statistics(
                _karcher_inputs(values, base, models), None, total
            ),
        )
        return means.karcher_coefficients(gram, values["max_iter"], values["tol"])
    if method == "model_stock":
        from della_cli.methods.stock import model_stock_t

        gram = _folded(
            blocks, lambda total, base, models: means.gram_statistics(models, base, total)
        )
        return model_stock_t(gram)
    if method == "ramplus_tl":
        counts = _summed(
            selection.ramplus_tl_statistics(models, base, values["epsilon"])
            for base, models in blocks()
        )
        return selection.ramplus_tl_lambdas(counts, values["r"], values["alpha"], values["epsilon"])
    if method == "sce":
        return _sce_prepare(values, blocks, numel)
    if method == "arcee_fusion":
        return _arcee_fusion_threshold(blocks, numel)
    raise ValueError(f"{method} makes no pass before its merge")


def apply(
    method: str,
    values: Mapping[str, Any],
    params: Sequence[ExpertParams],
    state: Any,
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
) -> torch.Tensor:
    """One output block, in the compute dtype: always a new tensor, never an input's memory
    (the engine recycles the input buffers before the output is written). Called on the
    blocks in order (sce counts the ties of its selection as it goes)."""
    from della_cli.methods import entrywise, selection
    from della_cli.methods import spherical_means as means
    from della_cli.methods import spherical_pairs as pairs
    from della_cli.methods.block_sums import widen

    if method == "slerp":
        return pairs.slerp_apply(state, base, models[0], values["t"])
    if method == "passthrough":
        scale = params[0].scale
        (model,) = widen([models[0]])
        return model.clone() if scale is None else model * scale
    if method == "nuslerp":
        t = pairs.nuslerp_t([p.weight for p in params])
        return pairs.nuslerp_apply(state, models[0], models[1], t, base, _layout(values))
    if method in ("multislerp", "karcher"):
        inputs = _karcher_inputs(values, base, models) if method == "karcher" else models
        if state is None:  # one input: itself
            return widen(inputs)[0].clone()
        return means.combine(state, inputs, base if method == "multislerp" else None)
    if method == "model_stock":
        from della_cli.methods import stock

        filter_wise = values["filter_wise"]
        t = stock.model_stock_t(stock.row_gram(models, base)) if filter_wise else state
        return stock.model_stock_apply(t, models, base, filter_wise)
    if method == "nearswap":
        return entrywise.nearswap(base, models[0], values["t"])
    if method in ("ram", "ramplus_tl"):
        return selection.ramplus_tl_apply(state, models, base, values["epsilon"])
    if method == "sce":
        deltas = selection.task_vectors(models, base)
        keep, ties = selection.sce_block_mask(state["selection"], deltas, state["ties"])
        state["ties"] += ties
        return selection.sce_apply(state["weights"], deltas, keep, base)
    if method == "arcee_fusion":
        if state is None:  # an empty tensor
            return widen([base])[0].clone()
        return selection.arcee_fusion_apply(state, base, models[0])
    raise ValueError(f"della does not run {method} yet")


def _folded(blocks: Blocks, step: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The statistics of a whole tensor: ``step(total, base, models)`` folds each block's rows
    into the total of the blocks before it (None before the first), in row order, so that the
    total does not depend on the blocks (``methods.row_sums``)."""
    total = None
    for base, models in blocks():
        total = step(total, base, models)
    return total


def _summed(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    total = None
    for part in parts:
        total = part if total is None else total + part
    return total


def _karcher_inputs(
    values: Mapping[str, Any], base: torch.Tensor | None, models: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """karcher's inputs: the models, and the base_model after them when it is one."""
    return [*models, base] if values.get(BASE_INPUT) and base is not None else list(models)


def _sce_prepare(values: Mapping[str, Any], blocks: Blocks, numel: int) -> dict:
    """sce's selection (count and radix passes), then its model weights (one more pass,
    counting the ties of the selection block by block as the merge pass will)."""
    from della_cli.methods import selection

    def deltas() -> Iterable[list[torch.Tensor]]:
        return (selection.task_vectors(models, base) for base, models in blocks())

    chosen = selection.sce_selection(deltas, values["select_topk"])
    ties = 0
    squares = None
    for block in deltas():
        keep, found = selection.sce_block_mask(chosen, block, ties)
        ties += found
        part = selection.sce_statistics(block, keep)
        squares = part if squares is None else squares + part
    weights = selection.sce_weights(squares, numel)
    return {"selection": chosen, "weights": weights, "ties": 0}


def _arcee_fusion_threshold(blocks: Blocks, numel: int) -> torch.Tensor | None:
    """median + 1.5·IQR of the importances, the quartiles exact by shared radix passes."""
    from della_cli.methods import selection

    if numel == 0:
        return None
    return selection.arcee_fusion_threshold(
        lambda: (selection.arcee_fusion_importance(base, models[0]) for base, models in blocks())
    )


__all__ = [
    "ARCEE_KEYS_KEPT_BYTES",
    "BASE_INPUT",
    "CPU_CHUNK_ELEMENTS",
    "KEYS_KEPT_BELOW",
    "apply",
    "keys_kept",
    "passes",
    "prepare",
    "statistics_bytes",
]
