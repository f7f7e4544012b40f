"""Pure tensor functions for the merge methods: no IO, no globals, randomness passed in."""

from della_cli.methods.merge import elect_signs, fuse, merge_tensor, sparsify_delta
from della_cli.methods.parameters import ExpertParams, GlobalParams, Rescale
from della_cli.methods.registry import METHODS, MethodSpec, Sparsifier

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
