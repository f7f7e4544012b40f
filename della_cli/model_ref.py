"""A model reference as recipes write it: a model, optionally with a LoRA adapter merged in.

mergekit reads ``BASE+ADAPTER`` (each a local folder or a Hub id, each optionally
``@revision``) as "the model ``BASE`` with the PEFT LoRA adapter ``ADAPTER`` merged into it";
della reads it the same way, anywhere a model may be named. A ``+`` always separates the two,
as in mergekit, so a folder whose name holds a ``+`` must be renamed (or linked) to be used.
"""

from __future__ import annotations

from dataclasses import dataclass

from della_cli.errors import shown


@dataclass(frozen=True)
class ModelRef:
    """``model`` (as written, ``@revision`` included) and the ``adapter`` merged into it."""

    model: str
    adapter: str | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        """The references to open: the model, then its adapter if any."""
        return (self.model,) if self.adapter is None else (self.model, self.adapter)


def split_model_ref(ref: str) -> ModelRef:
    """``ref`` split at its ``+``; raise ValueError (a one-line reason) when it has more than
    one, or an empty side."""
    pieces = ref.split("+")
    if len(pieces) > 2:
        raise ValueError(
            f"{shown(ref)} has {len(pieces) - 1} '+'; write one model and at most one "
            "adapter, as model+adapter"
        )
    if len(pieces) == 2 and not all(piece.strip() for piece in pieces):
        raise ValueError(f"{shown(ref)} needs a model before its '+' and an adapter after it")
    return ModelRef(pieces[0], pieces[1] if len(pieces) == 2 else None)


def has_adapter(ref: str) -> bool:
    return "+" in ref
