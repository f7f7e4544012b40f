"""Methods that merge entry by entry, with no statistics: one pass (ALGORITHMS.md).

- nearswap (section S5): move the base toward the other model by at most t per entry.
- passthrough (section S11): one input, optionally scaled.

What they compute is in the compute dtype (``block_sums.compute_dtype``); the caller casts
once to the output dtype.
"""

from __future__ import annotations

import torch

from della_cli.methods.block_sums import widen


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """Per entry w = clamp(t / max(|base − other|, 1e-6), 0, 1), result w·other + (1−w)·base:
    entries closer than t take ``other``, the rest move toward it by t. One pass."""
    base, other = widen([base, other])
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return weight * other + (1 - weight) * base


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The single input as stored, or × ``scale`` in the compute dtype. One pass, no base."""
    if scale is None:
        return tensor
    return widen([tensor])[0] * scale


__all__ = ["nearswap", "passthrough"]
