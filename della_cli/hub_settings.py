"""The Hub settings della reads from the environment at call time, not at import time as
``huggingface_hub`` does, so that a library user or a test that changes them is honoured:
the endpoint, the cache folder, offline mode and the user's token (never shown in a message)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "on", "yes", "true"}


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def cache_dir() -> Path:
    """The shared Hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().lower() in _TRUE


def token() -> str | None:
    """The user's Hub token from the usual places: ``HF_TOKEN``, the login cache under
    ``HF_HOME`` (or ``HF_TOKEN_PATH``), then whatever else ``huggingface_hub`` knows."""
    from huggingface_hub import get_token

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
    path = os.environ.get("HF_TOKEN_PATH") or (
        Path(os.environ["HF_HOME"]).expanduser() / "token" if os.environ.get("HF_HOME") else None
    )
    if path is not None and Path(path).is_file():
        return Path(path).read_text().strip() or None
    return get_token()
