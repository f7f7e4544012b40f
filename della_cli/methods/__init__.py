"""Pure tensor functions for the merge methods: no IO, no globals, randomness passed in.

The torch reference functions (``merge``) are imported on first use, so that the compiled CPU
path, and commands that only read recipes, start without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from della_cli.methods.parameters import ExpertParams, GlobalParams, Rescale
from della_cli.methods.registry import METHODS, MethodSpec, Sparsifier

if TYPE_CHECKING:
    from della_cli.methods.merge import elect_signs, fuse, merge_tensor, sparsify_delta

_TORCH_FUNCTIONS = {"elect_signs", "fuse", "merge_tensor", "sparsify_delta"}

__all__ = [
    "METHODS",
    "ExpertParams",
    "GlobalParams",
    "MethodSpec",
    "Rescale",
    "Sparsifier",
    "elect_signs",
    "fuse",
    "merge_tensor",
    "sparsify_delta",
]


def __getattr__(name: str):
    if name in _TORCH_FUNCTIONS:
        from della_cli.methods import merge

        return getattr(merge, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
