"""The catalog's methods (``catalog``) as the engine runs them: passes over row blocks.

For a method and its settled parameters: how many passes it makes over a tensor's row blocks
(``passes``), the partial statistics of one block, which add up over the blocks
(``statistics``), and one output block from the summed statistics and the block's inputs
(``apply``). The math is the reference's (``interpolation``, ``stock``, ``selection``); here
only the dispatch. Blocks arrive as slices along dim 0 in their tensor's own shape (a 1-D
tensor whole), in the compute dtype; ``base`` is None for a merge without one. Planning reads
``passes`` without importing torch (the reference modules are imported on first use).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from della_cli.methods.parameters import ExpertParams

if TYPE_CHECKING:
    import torch

# Methods whose statistics pass is skipped: none of their results depends on other blocks.
ONE_PASS = ("passthrough",)


def passes(method: str, values: Mapping[str, Any]) -> int:
    """Passes over a tensor's row blocks: a statistics pass, then the merge pass."""
    del values
    return 1 if method in ONE_PASS else 2


def statistics_bytes(method: str, shape: tuple[int, ...], inputs: int) -> int:
    """Bytes of the summed statistics of one tensor (float64 scalars)."""
    del shape, inputs
    return 0 if method in ONE_PASS else 3 * 8


def statistics(
    method: str,
    values: Mapping[str, Any],
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The partial statistics of one block (float64; they add up over the blocks)."""
    from della_cli.methods import interpolation

    del values
    if method == "slerp":
        return interpolation.slerp_statistics(base, models[0])
    raise ValueError(f"{method} has no statistics pass")


def apply(
    method: str,
    values: Mapping[str, Any],
    params: Sequence[ExpertParams],
    stats: torch.Tensor | None,
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
) -> torch.Tensor:
    """One output block, in the compute dtype: always a new tensor, never an input's memory
    (the engine recycles the input buffers before the output is written)."""
    from della_cli.methods import interpolation

    if method == "slerp":
        return interpolation.slerp_apply(stats, base, models[0], values["t"])
    if method == "passthrough":
        scale = params[0].scale
        (model,) = interpolation.widen([models[0]])
        return model.clone() if scale is None else model * scale
    raise ValueError(f"della does not run {method} yet")


__all__ = ["ONE_PASS", "apply", "passes", "statistics", "statistics_bytes"]
