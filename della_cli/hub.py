"""The Hugging Face Hub: resolve model references, read remote headers, push merged folders.

The only module that talks to the network. Everything goes through ``huggingface_hub`` (its
cache layout, token lookup and progress bars), with the settings it reads from the environment
at import time (``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``) read again
(``hub_settings``) at call time and passed explicitly, so that a library user or a test that
changes them is honoured. Tokens are handed to ``huggingface_hub`` and never appear in della's
messages (``hub_errors`` words its failures).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from della_cli.errors import HubError, ModelError, UsageError
from della_cli.hub_errors import describe_hub_error, hub_errors
from della_cli.hub_settings import DEFAULT_ENDPOINT, cache_dir, endpoint, offline, token
from della_cli.io.lora_settings import CONFIG_NAME as ADAPTER_CONFIG_NAME
from della_cli.io.lora_settings import WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from della_cli.io.metadata import TOKENIZER_PATTERNS
from della_cli.io.reader import INDEX_NAME, SINGLE_NAME, read_weight_map

# Re-exported: the Hub's settings and errors are reached through this module.
__all__ = [
    "DEFAULT_ENDPOINT",
    "HubRef",
    "ResolvedModel",
    "cache_dir",
    "check_can_push",
    "describe_hub_error",
    "endpoint",
    "hub_errors",
    "offline",
    "parse_hub_ref",
    "push_files",
    "remote_headers",
    "resolve_adapter",
    "resolve_model",
    "token",
    "weight_names",
]

# What a merge reads from a model repository besides its weight shards.
# README.md: the license in its front matter goes onto the merged model's card.
METADATA_PATTERNS = [
    "config.json",
    "generation_config.json",
    "README.md",
    INDEX_NAME,
    *TOKENIZER_PATTERNS,
]
# What a merge reads from a LoRA adapter repository besides its weights.
ADAPTER_PATTERNS = [ADAPTER_CONFIG_NAME, "README.md"]
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s@]+))?$")


@dataclass(frozen=True)
class HubRef:
    """``org/name`` or ``org/name@revision`` (a branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class ResolvedModel:
    """A Hub model in the local cache: ``folder`` is its snapshot at ``commit``; ``root`` is
    the cache entry that the snapshot's symlinks point into."""

    ref: HubRef
    commit: str
    folder: Path
    root: Path


def parse_hub_ref(ref: str) -> HubRef | None:
    """The Hub id in ``ref``, or None when it is not shaped like one. Whether a string that
    is also a local folder is local is the caller's decision (local folders win)."""
    if ref.startswith((".", "/", "~")):
        return None
    match = _HUB_ID.match(ref)
    if match is None:
        return None
    return HubRef(match["repo"], match["revision"])


def _silent_tqdm():
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def _snapshot(ref: HubRef, revision: str, patterns: list[str], progress: bool) -> Path:
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        ref.repo_id,
        revision=revision,
        allow_patterns=patterns,
        cache_dir=cache_dir(),
        endpoint=endpoint(),
        local_files_only=offline(),
        token=token() or False,
        tqdm_class=None if progress else _silent_tqdm(),
        max_workers=4,
    )
    return Path(folder)


def resolve_model(
    ref: HubRef,
    weights: bool = True,
    progress: bool = True,
    commit: str | None = None,
    only: list[str] | None = None,
) -> ResolvedModel:
    """Download what a merge reads of ``ref`` (config, generation config, tokenizer files,
    index, and with ``weights`` the safetensors shards the index names) into the Hub cache,
    pinned to the commit its revision points to now (or to ``commit``, pinned earlier).
    ``only``: just these weight files, for a part of a merge (none when empty). Offline, the
    cache alone answers."""
    names = weight_names if only is None else (lambda folder: only)
    wanted = weights and only != []
    return _resolve(ref, "model", METADATA_PATTERNS, names if wanted else None, progress, commit)


def resolve_adapter(
    ref: HubRef, weights: bool = True, progress: bool = True, commit: str | None = None
) -> ResolvedModel:
    """``resolve_model`` for a LoRA adapter: its config and card, and with ``weights`` its
    ``adapter_model.safetensors``."""
    names = (lambda folder: [ADAPTER_WEIGHTS_NAME]) if weights else None
    return _resolve(ref, "adapter", ADAPTER_PATTERNS, names, progress, commit)


def _resolve(ref, what, patterns, weights, progress, commit) -> ResolvedModel:
    """``patterns`` of ``ref`` at ``commit`` (else its revision, pinned now), then the weight
    files ``weights`` names from that snapshot (None: none)."""
    with hub_errors(f"{what} '{ref}'"):
        revision = commit or ref.revision or "main"
        folder = _snapshot(ref, revision, patterns, progress)
        commit = folder.name  # the snapshot folder is named by its commit
        if weights is not None:
            folder = _snapshot(ref, commit, weights(folder), progress)
    return ResolvedModel(ref, commit, folder, folder.parent.parent)


def weight_names(folder: Path, remote: bool = False) -> list[str]:
    """The safetensors files a model's index names. Without an index: its single file, as a
    pattern for downloads, or the name ``model.safetensors`` for remote header reads."""
    weight_map = read_weight_map(folder)
    if weight_map is None:
        return [SINGLE_NAME] if remote else ["*.safetensors"]
    return sorted(set(weight_map.values()))


def remote_headers(
    resolved: ResolvedModel, names: list[str] | None = None
) -> tuple[dict[str, tuple[bytes, int]], int]:
    """The raw safetensors header and size of each weight file at the pinned commit (those of
    the model's index, or ``names``), read with HTTP range requests (the first 8 bytes, then
    the header) so that no tensor data is downloaded; and the bytes a merge still has to
    download. Cached files are read locally."""
    found: dict[str, tuple[bytes, int]] = {}
    missing_bytes = 0
    with hub_errors(f"model '{resolved.ref}'"):
        for name in names or weight_names(resolved.folder, remote=True):
            cached = resolved.folder / name
            if cached.is_file():
                with cached.open("rb") as handle:
                    (length,) = struct.unpack("<Q", handle.read(8))
                    found[name] = (handle.read(length), cached.stat().st_size)
                continue
            prefix = _read_range(resolved, name, 0, 7)
            total = int(prefix.headers.get("Content-Range", "/0").rsplit("/", 1)[-1] or 0)
            (length,) = struct.unpack("<Q", prefix.content)
            if length > min(total - 8, 100 * 1024 * 1024):
                raise ModelError(f"model '{resolved.ref}': {name} has a header past its end")
            found[name] = (_read_range(resolved, name, 8, 7 + length).content, total)
            missing_bytes += total
    return found, missing_bytes


def _read_range(resolved: ResolvedModel, name: str, first: int, last: int):
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = hf_hub_url(resolved.ref.repo_id, name, revision=resolved.commit, endpoint=endpoint())
    headers = build_hf_headers(token=token() or False, library_name="della")
    headers["Range"] = f"bytes={first}-{last}"
    response = get_session().get(url, headers=headers, follow_redirects=True)
    hf_raise_for_status(response)
    if len(response.content) != last - first + 1:
        raise ModelError(f"model '{resolved.ref}': {name} is not a safetensors file")
    return response


def check_repo_id(repo_id: str) -> None:
    ref = parse_hub_ref(repo_id)
    if ref is None or ref.revision is not None:
        raise UsageError(f"'{repo_id}' is not a Hub repository id; give it as org/name")


def check_can_push(repo_id: str) -> str:
    """Refuse a push that cannot work before anything else is done; return the token."""
    check_repo_id(repo_id)
    secret = token()
    if secret is None:
        raise HubError(
            "no Hugging Face token found; set HF_TOKEN or run `hf auth login`, then push again"
        )
    if offline():
        raise HubError("HF_HUB_OFFLINE is set; unset it to push")
    return secret


def push_files(
    repo_id: str,
    files: dict[str, Path | bytes],
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str,
) -> str:
    """Upload ``files`` (path in the repo -> local file or content) to ``repo_id`` in one
    commit, creating the repository (and the branch ``revision``) when missing; return the
    URL of the uploaded tree."""
    from huggingface_hub import CommitOperationAdd, HfApi

    secret = check_can_push(repo_id)
    api = HfApi(endpoint=endpoint(), token=secret, library_name="della")
    with hub_errors(f"pushing to {repo_id}"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [
            CommitOperationAdd(
                path_in_repo=name, path_or_fileobj=str(data) if isinstance(data, Path) else data
            )
            for name, data in sorted(files.items())
        ]
        api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    return f"{endpoint()}/{repo_id}" + (f"/tree/{revision}" if revision else "")
