"""Whether two models share an architecture, said as a cause rather than as its symptoms.

A fine-tune of another size differs from the base in hundreds of tensors; listing each one
buries the reason. The plan compares what decides every shape first (the widths in
config.json, the number of layers in each stack of tensor names) and reports that once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# config.json fields that fix tensor shapes (transformers' names, GPT-2's in the second row).
WIDTH_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_local_experts",
    "moe_intermediate_size",
    "n_embd",
    "n_inner",
    "n_head",
)
# Nested configs of composite models (vision-language models keep the LM's in text_config).
NESTED_CONFIGS = ("text_config", "vision_config")
_LAYER = re.compile(r"^(?P<stack>.*?\.(?:layers|h|blocks|layer))\.(?P<index>\d+)\.")


def config_differences(reference: dict | None, other: dict | None) -> list[str]:
    """The shape-deciding fields whose values differ, as ``hidden_size 48 vs 32`` (the other
    model's value first); nothing when either config is missing."""
    if not isinstance(reference, dict) or not isinstance(other, dict):
        return []
    found = [
        f"{name} {other[name]} vs {reference[name]}"
        for name in WIDTH_FIELDS
        if name in reference and name in other and other[name] != reference[name]
    ]
    for nested in NESTED_CONFIGS:
        inner = config_differences(reference.get(nested), other.get(nested))
        found += [f"{nested}.{difference}" for difference in inner]
    return found


def layer_counts(names: Iterable[str]) -> dict[str, int]:
    """Layers per stack of numbered tensor names: ``{'model.layers': 32}``."""
    counts: dict[str, int] = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            stack, index = match.group("stack"), int(match.group("index"))
            counts[stack] = max(counts.get(stack, 0), index + 1)
    return counts


def layer_differences(reference: Iterable[str], other: Iterable[str]) -> list[str]:
    """Stacks whose depth differs, as ``24 layers in 'model.layers' vs 32``."""
    mine, theirs = layer_counts(reference), layer_counts(other)
    return [
        f"{theirs[stack]} layers in '{stack}' vs {mine[stack]}"
        for stack in sorted(mine.keys() & theirs.keys())
        if mine[stack] != theirs[stack]
    ]


def shape_summary(label: str, mismatches: list[tuple[str, tuple, tuple]], causes: list[str]) -> str:
    """One problem line for all of a model's tensors whose shapes differ from the base's."""
    name, shape, ref_shape = mismatches[0]
    line = f"'{label}' has '{name}' of shape {shape} but the base has {ref_shape}"
    if len(mismatches) > 1:
        more = ", ".join(f"'{n}' {s} vs {r}" for n, s, r in mismatches[1:3])
        rest = len(mismatches) - 3
        line += f", and {len(mismatches) - 1} more tensor(s) differ ({more}"
        line += f", ...{rest} more)" if rest > 0 else ")"
    if causes:
        line += f"; the cause: {', '.join(causes)} in its config.json"
    return line + "; all models must share the base's architecture"
