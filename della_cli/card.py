"""The model card (README.md) of a merged model: front matter for the Hub, then what went in."""

from __future__ import annotations

from pathlib import Path

import yaml

from della_cli.methods import Rescale
from della_cli.recipe import Recipe

_RESCALE_NAMES = {Rescale.KEEP_PROB: "true (1/p)", Rescale.L1: "l1", Rescale.NONE: "false"}


def display_name(ref: str) -> str:
    """A model's name for the card: Hub ids as written, local folders by their own name only,
    so that the user's file system layout does not leak into a published card."""
    path = Path(ref).expanduser()
    if ref.startswith((".", "/", "~")) or path.exists():
        return path.resolve().name or ref
    return ref


def render_card(recipe: Recipe, title: str, seed: int) -> str:
    schema, spec = recipe.schema, recipe.method
    inputs = ([schema.base_model] if schema.base_model else []) + [
        ref for ref in recipe.model_refs if ref != schema.base_model
    ]
    front = {
        "base_model": [display_name(ref) for ref in inputs],
        "tags": list(dict.fromkeys(["merge", "della", spec.name])),
        "library_name": "transformers",
    }
    rows = []
    for index, ref in enumerate(recipe.model_refs):
        params = recipe.expert_params(index, "")
        values = {name: getattr(params, name) for name in spec.expert_parameters}
        rows.append(
            f"| {display_name(ref)} | "
            + " | ".join(f"{values[n]:g}" for n in spec.expert_parameters)
            + " |"
        )
    header = "| model | " + " | ".join(spec.expert_parameters) + " |"
    rule = "|---" * (len(spec.expert_parameters) + 1) + "|"
    merge_wide = recipe.global_params()
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        f"# {title}",
        "",
        f"A merge of pre-trained language models made with della using **{spec.name}** "
        f"({spec.summary}; {spec.paper}).",
        "",
        "## Models",
        "",
        f"Base model: {display_name(schema.base_model) if schema.base_model else 'none'}",
        "",
        header,
        rule,
        *rows,
        "",
        "## Merge-wide parameters",
        "",
        f"- lambda: {merge_wide.lambda_:g}" if spec.on_deltas else "- lambda: not used",
        f"- normalize: {str(merge_wide.normalize).lower()}",
        f"- rescale: {_RESCALE_NAMES[merge_wide.rescale]}"
        if spec.is_random
        else "- rescale: not used",
        f"- seed: {seed}",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe.text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
