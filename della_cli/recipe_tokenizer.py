"""The ``tokenizer:`` block of a recipe: per-token embedding settings and vocabulary padding.

mergekit 0.1.5's ``tokenizer`` block (``tokenizer/config.py``): ``source`` (union, base or a
model; ``recipe_compat`` moves it to ``tokenizer_source``), ``tokens`` (for a token, where its
row comes from for models that lack it, or for every model with ``force: true``) and
``pad_to_multiple_of``. Checked here when the recipe is read, each error naming its field; what
needs the tokenizer files (does the token exist, is the id in range) is checked by the plan
(``della_cli.vocab_rows``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from della_cli.errors import RecipeError

TOKEN_KEYS = ("source", "force")
SOURCE_KEYS = ("kind", "model", "token", "token_id")


@dataclass(frozen=True)
class TokenSource:
    """Where a token's default row comes from: zero, a model's row for the same token
    (``model``), or a model's row for another token or id of its own vocabulary
    (``model_token``)."""

    kind: Literal["zero", "model", "model_token"]
    model: str | None = None
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenSetting:
    """One entry of ``tokens:``; without a source, the automatic rule gives the row."""

    source: TokenSource | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSettings:
    """``tokens`` (in recipe order) and ``pad_to_multiple_of`` of a ``tokenizer:`` block."""

    tokens: tuple[tuple[str, TokenSetting], ...] = ()
    pad_to_multiple_of: int | None = None

    def with_models(self, rename: Callable[[str | None], str | None]) -> TokenizerSettings:
        """The settings with each model reference passed through ``rename`` (a multi-stage
        file's reference to an earlier stage becomes that stage's folder)."""
        tokens = []
        for token, setting in self.tokens:
            source = setting.source
            if source is not None and source.model is not None:
                source = dataclasses.replace(source, model=rename(source.model))
            tokens.append((token, dataclasses.replace(setting, source=source)))
        return dataclasses.replace(self, tokens=tuple(tokens))


def _fail(path: str, problem: str) -> RecipeError:
    return RecipeError(f"{path}: {problem}")


def _mapping(value: Any, path: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise _fail(path, f"must be a mapping, got {value!r}")
    for key in value:
        if key not in keys:
            raise _fail(f"{path}.{key}", f"unknown key; known keys: {', '.join(keys)}")
    return value


def check_tokenizer_block(value: Any, path: str) -> TokenizerSettings:
    """The ``tokenizer:`` block left once its ``source`` is read (``tokens``,
    ``pad_to_multiple_of``), checked."""
    block = _mapping(value, path, ("tokens", "pad_to_multiple_of"))
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (type(pad) is not int or pad < 1):
        raise _fail(f"{path}.pad_to_multiple_of", f"must be a positive integer, got {pad!r}")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise _fail(f"{path}.tokens", f"must be a mapping from token to settings, got {tokens!r}")
    settings = tuple(
        (str(token), _token_setting(entry, f"{path}.tokens.{token}"))
        for token, entry in tokens.items()
    )
    return TokenizerSettings(settings, pad)


def _token_setting(value: Any, path: str) -> TokenSetting:
    entry = _mapping({} if value is None else value, path, TOKEN_KEYS)
    force = entry.get("force", False)
    if not isinstance(force, bool):
        raise _fail(f"{path}.force", f"must be true or false, got {force!r}")
    source = _token_source(entry["source"], f"{path}.source") if "source" in entry else None
    if force and source is None:
        raise _fail(f"{path}.force", "force: true needs a source to force (zero or a model)")
    return TokenSetting(source, force)


def _token_source(value: Any, path: str) -> TokenSource:
    """A model's name, ``{kind: zero}``, or ``{kind: model_token, model, token | token_id}``."""
    if isinstance(value, str):
        return TokenSource("model", model=value)
    entry = _mapping(value, path, SOURCE_KEYS)
    kind = entry.get("kind")
    if kind == "zero":
        extra = [key for key in entry if key != "kind"]
        if extra:
            raise _fail(f"{path}.{extra[0]}", "a zero source takes no other key")
        return TokenSource("zero")
    if kind != "model_token":
        raise _fail(f"{path}.kind", f"must be zero or model_token, got {kind!r}")
    model = entry.get("model")
    if not isinstance(model, str):
        raise _fail(f"{path}.model", f"must name one of the recipe's models, got {model!r}")
    if ("token" in entry) == ("token_id" in entry):
        raise _fail(path, "a model_token source takes exactly one of token and token_id")
    token, token_id = entry.get("token"), entry.get("token_id")
    if "token" in entry and not isinstance(token, str):
        raise _fail(f"{path}.token", f"must be a string, got {token!r}")
    if "token_id" in entry and (type(token_id) is not int or token_id < 0):
        raise _fail(f"{path}.token_id", f"must be a non-negative integer, got {token_id!r}")
    return TokenSource("model_token", model, token, token_id)


def check_token_models(
    settings: TokenizerSettings | None, base_model: str | None, model_refs: list[str]
) -> None:
    """Each model a ``tokens:`` entry names must be the base or one of the models."""
    if settings is None:
        return
    known = [ref for ref in (base_model, *model_refs) if ref]
    for token, setting in settings.tokens:
        source = setting.source
        if source is None or source.model is None or source.model in known:
            continue
        field = "source" if source.kind == "model" else "source.model"
        names = ", ".join(f"'{ref}'" for ref in known)
        raise _fail(
            f"tokenizer.tokens.{token}.{field}",
            f"'{source.model}' is neither the base_model nor one of the models ({names})",
        )
