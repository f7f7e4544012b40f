"""The output tensors of a merge by ``slices:``, each with the tensors it is merged from.

From the recipe's slices (``recipe_slices``) and the models' headers: output layer k of a slice
reads layer ``start + k`` of each of its sources, so ``model.layers.{out}.x`` is merged from
``model.layers.{start + k}.x`` of each source; the output's layers are numbered consecutively
across the slices. Tensors before the layers (embeddings) come from the first slice's sources,
those after them (final norm, ``lm_head``) from the last slice's, as mergekit 0.1.5 plans them
(``plan.py:plan_module``). In each slice, a method that merges into a base takes the slice's
base as the reference; any other method takes the slice's first source.

Output order: a single slice that covers every layer of every source (mergekit's reading of
``models:``) keeps the reference model's file order, so its output is the one ``models:``
gives; otherwise the tensors before the layers, then each output layer, then those after.

``output_config`` gives config.json its number of layers and, for per-layer lists
(``layer_types``), the entry of the layer each output layer is read from, as its model's
config gives it; a list of layer indices (``mlp_only_layers``) names the output layers read
from the layers it named.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from della_cli.architecture import layer_counts
from della_cli.io.reader import ModelReader
from della_cli.recipe_settings import layer_count
from della_cli.recipe_slices import (
    OutputSlice,
    before_layers,
    describe_layer_map,
    input_name,
    layer_index,
    output_layers,
    slice_base,
)

BASE = -1  # as plan.BASE
# config.json keys that hold one entry per layer, remapped with the layers.
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
# config.json keys that list layer indices (Qwen's MoE models: the layers with a dense MLP).
LAYER_INDEX_KEYS = ("mlp_only_layers",)
# config.json keys that hold the number of layers (transformers' name, GPT-2's, others').
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class SlicedTensor:
    """One output tensor: the (model, tensor) it takes its shape and dtype from (the base of
    a merge into a base), and the (model, tensor) of each input merged into it."""

    name: str
    reference: tuple[int, str]
    inputs: tuple[tuple[int, str], ...]
    reference_is_base: bool  # the reference is a slice's own base, one of the recipe's models


@dataclass(frozen=True)
class LayerMap:
    """What the plan says about the output's layers."""

    layers: int  # the output's number of layers
    description: str  # ``layers 0-3 ← base 0-3; 4-7 ← expert 2-5``
    # config.json's per-layer lists for the output's layers (``_per_layer_values``)
    config_lists: dict[str, list] = field(default_factory=dict)


@dataclass
class SlicedPlan:
    layer_map: LayerMap
    tensors: list[SlicedTensor]
    problems: list[str]


class _Slicer:
    def __init__(self, recipe, base: ModelReader | None, experts: list[ModelReader]):
        self.recipe = recipe
        self.slices: tuple[OutputSlice, ...] = recipe.schema.slices
        self.base, self.experts = base, experts
        self.problems: list[str] = []

    def index(self, model: str, as_base: bool) -> int:
        """The model's index in the plan: BASE for the recipe's base taken as a base."""
        if as_base and model == self.recipe.schema.base_model and self.base is not None:
            return BASE
        return self.recipe.model_refs.index(model)

    def reader(self, index: int) -> ModelReader:
        return self.base if index == BASE else self.experts[index]

    def depth(self, model: str) -> int | None:
        """The model's number of layers, or None (a problem said why) when it has not one
        stack of numbered layers."""
        reader = self.experts[self.recipe.model_refs.index(model)]
        stacks = layer_counts(reader.tensors)
        if len(stacks) != 1:
            what = "no numbered layers" if not stacks else f"{len(stacks)} stacks of layers"
            self.problems.append(
                f"'{model}' has {what} ({', '.join(stacks) or 'none'}); slices need a model "
                "with one stack of layers"
            )
            return None
        return next(iter(stacks.values()))

    def check_ranges(self) -> bool:
        depths = {ref: self.depth(ref) for ref in self.recipe.model_refs}
        for piece in self.slices:
            for number, source in enumerate(piece.sources):
                depth = depths[source.model]
                if depth is not None and source.end > depth:
                    self.problems.append(
                        f"{piece.path}.sources[{number}].layer_range: [{source.start}, "
                        f"{source.end}) goes past the {depth} layers of '{source.model}'"
                    )
        whole = len(self.slices) == 1 and all(
            s.start == 0 and s.end == depths[s.model] for s in self.slices[0].sources
        )
        return whole

    def roles(self, piece: OutputSlice) -> tuple[tuple[int, int], list[tuple[int, int]], bool]:
        """(reference, inputs, reference_is_base) of a slice, each (model index, source
        number in the slice)."""
        method = self.recipe.method
        base = slice_base(piece, self.recipe.schema.base_model)
        if method.on_deltas and base is not None:
            number = next(i for i, s in enumerate(piece.sources) if s.model == base)
            reference = (self.index(base, as_base=True), number)
            inputs = [
                (self.index(s.model, as_base=False), i)
                for i, s in enumerate(piece.sources)
                if i != number
            ]
            return reference, inputs, reference[0] != BASE
        inputs = [(self.index(s.model, as_base=False), i) for i, s in enumerate(piece.sources)]
        return inputs[0], inputs, False

    def tensor(self, name: str, slice_index: int, layer: int | None) -> SlicedTensor:
        """Output tensor ``name`` of slice ``slice_index`` (at its layer offset ``layer``)."""
        piece = self.slices[slice_index]
        (ref_model, ref_number), inputs, own_base = self.roles(piece)

        def named(number: int) -> str:
            source = piece.sources[number]
            return name if layer is None else input_name(name, source.start + layer)

        reference = (ref_model, named(ref_number))
        sources = tuple((model, named(number)) for model, number in inputs)
        return SlicedTensor(name, reference, sources, own_base)

    def reference_names(self, slice_index: int) -> tuple[ModelReader, list[str]]:
        """The reference model of a slice and its tensor names in file order."""
        (model, _), _, _ = self.roles(self.slices[slice_index])
        reader = self.reader(model)
        ordered = sorted(reader.tensors.values(), key=lambda t: (str(t.path), t.offset))
        return reader, [t.name for t in ordered]


def plan_slices(recipe, base: ModelReader | None, experts: list[ModelReader]) -> SlicedPlan:
    """Every output tensor of a sliced merge, in output order, with its inputs; the problems
    found (ranges past a model's layers, models without one stack of layers)."""
    slicer = _Slicer(recipe, base, experts)
    slices = slicer.slices
    whole = slicer.check_ranges()
    layer_map = LayerMap(output_layers(slices), describe_layer_map(slices, lambda ref: ref))
    if slicer.problems:
        return SlicedPlan(layer_map, [], slicer.problems)
    layer_map = replace(layer_map, config_lists=_per_layer_values(slicer))
    last = len(slices) - 1
    if whole:  # mergekit's models: one slice of every layer; the reference's file order
        last_reader, names = slicer.reference_names(0)
        tensors = [slicer.tensor(n, 0, layer_index(n)) for n in names]
    else:
        _, first_names = slicer.reference_names(0)
        before = [n for n in first_names if layer_index(n) is None and before_layers(n)]
        tensors = [slicer.tensor(n, 0, None) for n in before]
        tensors += _layer_tensors(slicer)
        last_reader, last_names = slicer.reference_names(last)
        after = [n for n in last_names if layer_index(n) is None and not before_layers(n)]
        tensors += [slicer.tensor(n, last, None) for n in after]
    tensors += _untied_lm_head(slicer, last_reader, {t.name for t in tensors})
    return SlicedPlan(layer_map, tensors, [])


def _layer_tensors(slicer: _Slicer) -> list[SlicedTensor]:
    """The output layers' tensors, layer by layer, each layer's in its reference's file order."""
    tensors, out_layer = [], 0
    for index, piece in enumerate(slicer.slices):
        _, names = slicer.reference_names(index)
        (_, number), _, _ = slicer.roles(piece)
        start = piece.sources[number].start
        for offset in range(piece.length):
            for name in names:
                if layer_index(name) == start + offset:
                    tensors.append(slicer.tensor(input_name(name, out_layer), index, offset))
            out_layer += 1
    return tensors


def _untied_lm_head(slicer: _Slicer, reader: ModelReader, written: set[str]) -> list:
    """The last slice's reference ties its embeddings but one of its sources has its own
    lm_head: the output gets one, whose tied sources give their embedding (``plan``)."""
    if "lm_head.weight" in written or "lm_head.weight" in reader.tensors:
        return []
    piece = slicer.slices[-1]
    readers = [slicer.experts[slicer.recipe.model_refs.index(s.model)] for s in piece.sources]
    if not any("lm_head.weight" in r.tensors for r in readers):
        return []
    return [slicer.tensor("lm_head.weight", len(slicer.slices) - 1, None)]


def _per_layer_values(slicer: _Slicer) -> dict[str, list]:
    """Each per-layer list of config.json (and list of layer indices) for the output: output
    layer k takes the entry its slice's reference model's config gives the layer it reads. A
    key some slice's reference lacks (or holds at another length) is left out."""
    found: dict[str, list] = {}
    for key in (*PER_LAYER_KEYS, *LAYER_INDEX_KEYS):
        values: list = []
        for piece in slicer.slices:
            (model, number), _, _ = slicer.roles(piece)
            config = slicer.reader(model).config or {}
            own, depth = config.get(key), layer_count(config, ())
            start = piece.sources[number].start
            layers = range(start, start + piece.length)
            lengths_fit = len(own) == depth and layers.stop <= depth if own else False
            if not isinstance(own, list) or (key in PER_LAYER_KEYS and not lengths_fit):
                break
            values += (
                [own[i] for i in layers] if key in PER_LAYER_KEYS else [i in own for i in layers]
            )
        else:
            found[key] = values if key in PER_LAYER_KEYS else [k for k, v in enumerate(values) if v]
    return found


def output_config(config: dict | None, layer_map: LayerMap | None) -> dict | None:
    """``config`` (the reference's config.json) with the output's number of layers and its
    per-layer lists (``LayerMap.config_lists``); unchanged without a layer map."""
    if config is None or layer_map is None:
        return config
    config = _relayered(config, layer_map)
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = _relayered(config["text_config"], layer_map)
    return config


def _relayered(config: dict, layer_map: LayerMap) -> dict:
    """A copy of one config level with the layer count and per-layer lists of the output
    (only the keys it has)."""
    config = dict(config)
    for key in LAYER_COUNT_KEYS:
        if type(config.get(key)) is int:
            config[key] = layer_map.layers
    for key, values in layer_map.config_lists.items():
        if key in config:
            config[key] = list(values)
    return config
