"""Opening the adapter of a ``model+adapter`` reference, local or on the Hub (``model_ref``).

A Hub adapter is handled as a Hub model is: its config is downloaded and its commit pinned when
the session opens, its weights' header read remotely for the plan (nothing else downloaded),
and its weights downloaded at the pinned commit when the merge starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from della_cli.errors import ModelError
from della_cli.hub import HubRef, remote_headers, resolve_adapter
from della_cli.io.lora import LoraModelReader
from della_cli.io.lora_adapter import LoraAdapter
from della_cli.io.lora_settings import WEIGHTS_NAME, load_settings
from della_cli.io.reader import ModelReader
from della_cli.locate import locate_model, missing_folder_message


@dataclass(frozen=True)
class OpenedAdapter:
    adapter: LoraAdapter
    commit: str | None = None  # the Hub commit it was pinned to (None: a local folder)
    download_bytes: int = 0  # its weights, still to download


def open_adapter(
    field: str,
    ref: str,
    recipe_dir: Path | None,
    weights: bool = True,
    progress: bool = True,
    commit: str | None = None,
) -> OpenedAdapter:
    """The adapter ``ref`` (of the recipe's ``field``): a local folder, or a Hub repository
    pinned to ``commit`` if given (else to where its revision points now); without
    ``weights``, a Hub adapter's weights are known by their header only."""
    where = locate_model(ref, recipe_dir)
    if not isinstance(where, HubRef):
        if not where.exists():
            raise ModelError(missing_folder_message(f"{field} (adapter)", ref, recipe_dir))
        return OpenedAdapter(LoraAdapter(where, ref))
    resolved = resolve_adapter(where, weights=weights, progress=progress, commit=commit)
    if weights:
        return OpenedAdapter(LoraAdapter(resolved.folder, ref, resolved.root), resolved.commit)
    load_settings(resolved.folder, ref, resolved.root)  # its config, before asking for weights
    headers, missing = remote_headers(resolved, [WEIGHTS_NAME])
    adapter = LoraAdapter(resolved.folder, ref, resolved.root, headers=headers)
    return OpenedAdapter(adapter, resolved.commit, missing)


def with_adapter(model: ModelReader, adapter: LoraAdapter, label: str) -> LoraModelReader:
    """``model`` with ``adapter`` merged in; both closed if they do not fit each other."""
    try:
        return LoraModelReader(model, adapter, label)
    except BaseException:
        model.close()
        adapter.close()
        raise


def adapter_layout(reader: ModelReader) -> dict[str, tuple]:
    """The adapter's tensors (dtype, shape, place in its file), or nothing without one."""
    if not isinstance(reader, LoraModelReader):
        return {}
    tensors = reader.adapter.tensors
    return {n: (t.dtype, t.shape, t.offset, t.nbytes) for n, t in tensors.items()}
