"""``huggingface_hub`` and network errors as one-line della errors: whether the user's input is
at fault (exit 2) or the Hub or the network (exit 1), and what to do next; never the token,
never a URL with credentials."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from della_cli.errors import HubError, ModelError, UsageError
from della_cli.hub_settings import cache_dir, endpoint, offline

# Network failures by class name: huggingface_hub has used requests, httpx and httpx2.
_NETWORK_ERRORS = {"TransportError", "ConnectionError", "TimeoutException", "Timeout"}


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn ``huggingface_hub`` and network errors into one-line della errors naming ``what``
    (never the token, never a URL with credentials)."""
    try:
        yield
    except (ModelError, HubError, UsageError):
        raise
    except Exception as error:
        message = describe_hub_error(error)
        if message is None:
            raise
        usage, text = message
        raise (ModelError if usage else HubError)(f"{what}: {text}") from error


def describe_hub_error(error: BaseException) -> tuple[bool, str] | None:
    """(is it the user's input, one line) for a Hub error; None for errors that are not."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError):
        return False, "the repository is gated; accept its terms on the Hub with your account"
    if isinstance(error, RepositoryNotFoundError):
        return True, (
            "no such repository on the Hub, or it is private and no token that can read it "
            "was found (set HF_TOKEN or run `hf auth login`)"
        )
    if isinstance(error, RevisionNotFoundError):
        return True, "no such revision (branch, tag or commit) in the repository"
    if isinstance(error, RemoteEntryNotFoundError):
        return True, (
            "the repository lacks a weight file at this commit; della merges safetensors "
            "weights (model.safetensors, or shards listed in model.safetensors.index.json)"
        )
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        where = "HF_HUB_OFFLINE is set" if offline() else f"{endpoint()} cannot be reached"
        return False, (
            f"not in the local Hub cache ({cache_dir()}) and {where}; connect once to download it"
        )
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status == 401:
        return False, "the Hub refused the token (401); check HF_TOKEN or run `hf auth login`"
    if isinstance(error, HfHubHTTPError) and status == 403:
        return False, "the token has no write access there (403); use a token with write access"
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "no"
        return False, f"the Hub answered HTTP {status}; try again later"
    if any(kind.__name__ in _NETWORK_ERRORS for kind in type(error).__mro__):
        return False, f"the Hub ({endpoint()}) cannot be reached ({type(error).__name__})"
    return None
