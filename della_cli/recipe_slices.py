"""``slices:`` and ``modules:`` in a recipe: checked, and where each output tensor sits (its
slice, its layer in the slice, the layer each source gives it); ``recipe_slices_read`` reads
them from YAML.

As mergekit 0.1.5 reads them (MERGEKIT-SEMANTICS.md, "Slices and modules"):

- ``slices:`` lists output slices; each lists ``sources``, every one a ``model`` and a
  ``layer_range: [start, end)``, all of one length within a slice. Output layers are numbered
  consecutively across the slices; layer ``k`` of a slice reads layer ``start + k`` of each
  source. A slice may set its own ``base_model`` and ``parameters``; with slices the base is
  not added to the sources: a method with a base needs it listed among them.
- ``modules: {default: {models | slices, parameters}}`` is the same for a single-module
  architecture (every causal LM della merges); the module's ``parameters`` sit between the
  slice's and the top level's.
- Precedence: the source's own ``parameters`` in its slice, then the slice's, the module's,
  the top level's, then the method's default; per-model values match filters against that
  model's input tensor name (``model.layers.{start + k}``), merge-wide ones against the output's.
- A gradient's t is placed per slice: layer k of an n-layer slice has t = k/(n−1), a one-layer
  slice t = 1. Tensors outside the layers take t = 0 and the sources and parameters of the
  first slice (embeddings) or of the last (final norm, ``lm_head``).

The parameter blocks themselves are checked by ``recipe`` (passed in as a check), which keeps
this module free of the schema's types; ``recipe_scopes`` looks values up in them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from della_cli.errors import RecipeError

MODULE_NAME = "default"  # mergekit's name of the one module of a single-module architecture
# A numbered layer of a stack, as recipe_settings places gradients on it.
_LAYER = re.compile(r"^(?P<stack>.*?\.(?:layers|h|blocks|layer))\.(?P<index>\d+)\.")
# Tensors outside the layers that come before them (mergekit's ``pre_weights``): embeddings.
_PRE_LAYERS = re.compile(
    r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|embed_in|tok_embeddings|embed_positions|"
    r"position_embeddings|token_type_embeddings)(\.|$)"
)


@dataclass(frozen=True)
class SliceSource:
    """One model's layers ``[start, end)`` in an output slice, with its own parameters."""

    model: str
    start: int
    end: int
    parameters: Any  # ModelParameters (recipe), possibly empty

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class OutputSlice:
    """Consecutive output layers, each merged from the same layer offset of every source."""

    sources: tuple[SliceSource, ...]
    path: str  # where the recipe wrote it: ``slices[1]`` (for messages)
    base_model: str | None = None
    parameters: Any = None  # GlobalParameters (recipe) or None
    residual_weight: float | None = None  # mergekit reads it and does nothing with it

    @property
    def length(self) -> int:
        return self.sources[0].length

    def source_of(self, model: str) -> SliceSource | None:
        return next((s for s in self.sources if s.model == model), None)


@dataclass(frozen=True)
class Place:
    """Where an output tensor sits: its slice, the layer offset in it (None outside the
    layers) and its gradient position t."""

    slice_index: int
    offset: int | None
    t: float


def slice_models(slices: tuple[OutputSlice, ...]) -> list[str]:
    """Every model the slices read, once each, in the order they first appear."""
    return list(dict.fromkeys(source.model for s in slices for source in s.sources))


def output_layers(slices: tuple[OutputSlice, ...]) -> int:
    """The output's number of layers: the sum of the slices' lengths."""
    return sum(s.length for s in slices)


def layer_index(tensor_name: str) -> int | None:
    """The layer a tensor belongs to (``model.layers.3.x`` → 3), None outside the layers."""
    match = _LAYER.match(tensor_name)
    return None if match is None else int(match.group("index"))


def before_layers(tensor_name: str) -> bool:
    """Whether a tensor outside the layers comes before them (an embedding): it is then
    merged from the first slice's sources, any other from the last slice's."""
    return _PRE_LAYERS.search(tensor_name) is not None


def place_of(slices: tuple[OutputSlice, ...], tensor_name: str) -> Place:
    """The slice, offset and t of output tensor ``tensor_name``. Outside the layers: the first
    slice for embeddings, the last for everything else (final norm, ``lm_head``), t = 0."""
    layer = layer_index(tensor_name)
    if layer is None:
        return Place(0 if before_layers(tensor_name) else len(slices) - 1, None, 0.0)
    for index, piece in enumerate(slices):
        if layer < piece.length:
            t = 1.0 if piece.length == 1 else layer / (piece.length - 1)
            return Place(index, layer, t)
        layer -= piece.length
    return Place(len(slices) - 1, None, 0.0)  # past the output's layers: not one of its names


def input_name(tensor_name: str, layer: int) -> str:
    """``tensor_name`` with its layer index replaced by ``layer`` (unchanged outside layers)."""
    match = _LAYER.match(tensor_name)
    if match is None:
        return tensor_name
    return f"{match.group('stack')}.{layer}.{tensor_name[match.end() :]}"


def source_tensor(piece: OutputSlice, source: SliceSource, place: Place, tensor_name: str) -> str:
    """The name of the tensor ``source`` gives for output tensor ``tensor_name``."""
    if place.offset is None:
        return tensor_name
    return input_name(tensor_name, source.start + place.offset)


def slice_base(piece: OutputSlice, top_base: str | None) -> str | None:
    """The base of a slice: its own ``base_model``, else the recipe's."""
    return piece.base_model or top_base


def check_slice_bases(slices: tuple[OutputSlice, ...], top_base: str | None, method) -> None:
    """Each slice of a method that merges into a base has one, listed among its sources (with
    slices mergekit adds no source), and some model besides it where the method needs one."""
    if not method.on_deltas:
        return
    for piece in slices:
        base = slice_base(piece, top_base)
        if base is None:
            if method.needs_base:
                raise RecipeError(
                    f"{piece.path}.base_model: {method.name} merges into a base and this slice "
                    "has none; set base_model here or at the top level"
                )
            continue
        if piece.source_of(base) is None:
            where = "its base_model" if piece.base_model else "the base_model"
            raise RecipeError(
                f"{piece.path}.sources: {where} '{base}' is not among them; with slices the "
                "base is not added to the sources, so list it with its layer_range"
            )


def describe_layer_map(slices: tuple[OutputSlice, ...], label: Callable[[str], str]) -> str:
    """The layer map in one line: ``layers 0-3 ← base 0-3; 4-7 ← expert 2-5``; a slice of
    several sources lists them joined by ``+``."""
    parts, first = [], 0
    for piece in slices:
        last = first + piece.length - 1
        sources = " + ".join(f"{label(s.model)} {_span(s.start, s.end - 1)}" for s in piece.sources)
        parts.append(f"{_span(first, last)} ← {sources}")
        first = last + 1
    return "layers " + "; ".join(parts)


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def rebind_slices(
    slices: tuple[OutputSlice, ...], ref: Callable[[str | None], str | None]
) -> tuple[OutputSlice, ...]:
    """``slices`` with every model reference (sources, slice bases) replaced by ``ref(it)``:
    a multi-stage file's stage names become their output folders."""
    return tuple(
        replace(
            piece,
            sources=tuple(replace(s, model=ref(s.model)) for s in piece.sources),
            base_model=ref(piece.base_model),
        )
        for piece in slices
    )


def model_field(schema, index: int) -> str:
    """The field that names the recipe's model ``index``: ``models.1.model``, or under slices
    the first source that reads it (``slices[0].sources[1].model``)."""
    if schema.slices is None:
        return f"models.{index}.model"
    ref = schema.models[index].model
    for piece in schema.slices:
        for number, source in enumerate(piece.sources):
            if source.model == ref:
                return f"{piece.path}.sources[{number}].model"
    return f"models.{index}.model"


def reads(slices: tuple[OutputSlice, ...] | None, model: str, tensor_name: str) -> bool:
    """Whether ``model`` is a source of output tensor ``tensor_name``'s slice (always, without
    slices)."""
    if slices is None:
        return True
    return slices[place_of(slices, tensor_name).slice_index].source_of(model) is not None


def slice_notes(slices: tuple[OutputSlice, ...] | None) -> list[str]:
    """What mergekit reads and ignores in the slices, said in the plan."""
    return [
        f"{piece.path}.residual_weight: ignored, as mergekit ignores it"
        for piece in slices or ()
        if piece.residual_weight is not None
    ]
