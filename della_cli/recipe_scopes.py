"""Where a model's parameters for a tensor are looked up: the parameter blocks of a recipe,
highest precedence first (MERGEKIT-SEMANTICS.md, "Parameters: precedence, filters, gradients").

Per model: its own block (under ``models:`` its entry's; under ``slices:`` its source's in the
tensor's slice, matched against its own input tensor name), then the slice's, the module's and
the top level's. Merge-wide values start at the slice's. The recipe's checks run over the same
blocks, grouped as the models are merged: all of ``models:``, or each slice's sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from della_cli.recipe_slices import MODULE_NAME, place_of, slice_base, source_tensor


@dataclass(frozen=True)
class Member:
    """One input of a parameter group, with its own parameter block and where it is written."""

    model: str
    path: str  # ``models.1.parameters``, ``slices[0].sources[1].parameters``
    parameters: Any


@dataclass(frozen=True)
class ParameterGroup:
    """Inputs merged together (the models, or one slice's sources) and the parameter blocks
    above theirs, highest precedence first, each with its path: what the recipe's checks of
    contracts, required parameters and bounds run over."""

    path: str  # ``models`` or ``slices[1].sources``
    members: tuple[Member, ...]
    base: str | None
    upper: tuple[tuple[str, Any], ...]
    adds_base: bool  # ``models:`` takes an unlisted base as an input where the method would


def parameter_groups(schema) -> list[ParameterGroup]:
    """The groups of a recipe's schema: one for ``models:``, one per slice under ``slices:``."""
    top = (("parameters", schema.parameters),)
    if schema.module_parameters is not None:
        top = ((f"modules.{MODULE_NAME}.parameters", schema.module_parameters), *top)
    if schema.slices is None:
        members = tuple(
            Member(entry.model, f"models.{index}.parameters", entry.parameters)
            for index, entry in enumerate(schema.models)
        )
        return [ParameterGroup("models", members, schema.base_model, top, adds_base=True)]
    groups = []
    for piece in schema.slices:
        members = tuple(
            Member(source.model, f"{piece.path}.sources[{index}].parameters", source.parameters)
            for index, source in enumerate(piece.sources)
        )
        upper = ((f"{piece.path}.parameters", piece.parameters),) if piece.parameters else ()
        base = slice_base(piece, schema.base_model)
        groups.append(ParameterGroup(f"{piece.path}.sources", members, base, upper + top, False))
    return groups


def shared_blocks(schema, tensor_name: str) -> tuple[Any, ...]:
    """The parameter blocks merge-wide values of ``tensor_name`` are looked up in, highest
    precedence first: its slice's, the module's, the top level's."""
    blocks = [schema.parameters]
    if schema.module_parameters is not None:
        blocks.insert(0, schema.module_parameters)
    if schema.slices is not None:
        piece = schema.slices[place_of(schema.slices, tensor_name).slice_index]
        blocks[:0] = [piece.parameters] if piece.parameters is not None else []
    return tuple(blocks)


def own_block(schema, model: str, tensor_name: str) -> tuple[Any, str, float]:
    """Under slices: ``model``'s own parameter block in the slice of output tensor
    ``tensor_name`` (None where the slice does not read it), the name of the tensor it gives
    (what its filters match), and the tensor's t."""
    place = place_of(schema.slices, tensor_name)
    piece = schema.slices[place.slice_index]
    source = piece.source_of(model)
    if source is None:
        return None, tensor_name, place.t
    return source.parameters, source_tensor(piece, source, place, tensor_name), place.t


def parameter_blocks(schema) -> list[Any]:
    """Every parameter block of a recipe: top level, models, module, slices and sources."""
    blocks = [schema.parameters, *(entry.parameters for entry in schema.models)]
    blocks += [schema.module_parameters] if schema.module_parameters is not None else []
    for piece in schema.slices or ():
        blocks += [piece.parameters] if piece.parameters is not None else []
        blocks += [source.parameters for source in piece.sources]
    return blocks
