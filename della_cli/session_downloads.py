"""A merge session's Hub models made local: their weights downloaded at the commits the plan
pinned, then read from the cache and checked against the headers the plan was made from.

``MergeSession.download_weights`` calls ``downloaded_model`` for each Hub model (or adapter).
"""

from __future__ import annotations

from della_cli.errors import ModelError
from della_cli.hub import HubRef, remote_headers, resolve_model
from della_cli.io.reader import ModelReader, ensure_inside
from della_cli.locate import locate_model
from della_cli.lora_inputs import adapter_layout, open_adapter, with_adapter
from della_cli.model_ref import split_model_ref
from della_cli.quant import dequantizing
from della_cli.recipe import Recipe


def downloaded_model(
    recipe: Recipe,
    pins: dict[str, str],
    ref: str,
    reader: ModelReader,
    files: list[str] | None,
    progress: bool,
) -> ModelReader:
    """``reader``'s model (and adapter) read from local files, those on the Hub
    downloaded at their pinned commits (``files``: just these weight files of the model)
    and checked against the headers planned."""
    parts = split_model_ref(ref)
    recipe_dir = recipe.path.parent if recipe.path else None
    # A local model is kept: closing ``reader`` closes its files, which reopen when read.
    local = reader.model if parts.adapter is not None else reader
    if parts.model in pins:
        where = locate_model(parts.model, recipe_dir)
        assert isinstance(where, HubRef)  # it resolved to the Hub when it was opened
        resolved = resolve_model(
            where,
            weights=True,
            progress=progress,
            commit=pins[parts.model],
            only=files,
        )
        local = dequantizing(_downloaded_reader(resolved, parts.model, files))
    if parts.adapter is not None:
        opened = open_adapter(
            ref,
            parts.adapter,
            recipe_dir,
            progress=progress,
            commit=pins.get(parts.adapter),
        )
        local = with_adapter(local, opened.adapter, ref)
    if _layout(local) != _layout(reader) or adapter_layout(local) != adapter_layout(reader):
        local.close()
        commits = ", ".join(pins[part] for part in parts.parts if part in pins)
        raise ModelError(
            f"model '{ref}': the files downloaded at commit {commits} are not the ones "
            "whose headers were planned; run the merge again"
        )
    return local


def _downloaded_reader(resolved, ref: str, files: list[str] | None) -> ModelReader:
    """A Hub model read from the cache: all of it, or (``files``) the downloaded weight files
    with the headers of the others, read again remotely (header bytes only)."""
    if files is None:
        return ModelReader(resolved.folder, ref, resolved.root)
    for name in files:
        ensure_inside(resolved.folder / name, resolved.root)
    headers, _ = remote_headers(resolved)
    return ModelReader(resolved.folder, ref, resolved.root, headers=headers)


def _layout(reader: ModelReader) -> dict[str, tuple]:
    """Each tensor's dtype, shape and place in its file (the file itself may be a cache blob
    of another name)."""
    return {n: (t.dtype, t.shape, t.offset, t.nbytes) for n, t in reader.tensors.items()}
