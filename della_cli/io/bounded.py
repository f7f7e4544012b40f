"""Bounded, non-blocking reads of the files a user hands della: recipes, configs, indexes
and safetensors headers.

A hostile or broken input must fail fast with one line, never hang or exhaust memory: a FIFO
or device named ``model.safetensors`` would block ``open`` or ``read`` forever, and a 200 MB
``config.json`` takes about 7 GB once parsed by ``json``. So files are opened non-blocking and
refused unless regular, sizes are checked against a per-kind limit before anything is read,
and JSON nested deeper than the parser's recursion limit is a ``ModelError``, not a crash.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from della_cli.errors import ModelError

MIB = 1 << 20
# Far above any real file of each kind (a config is a few kB, the largest published index,
# DeepSeek-V3's, about 9 MB), far below what would exhaust a machine once parsed.
MAX_CONFIG_BYTES = 16 * MIB
MAX_INDEX_BYTES = 32 * MIB
MAX_RECIPE_BYTES = 1 * MIB
# The safetensors library's own limit on a header.
MAX_HEADER_BYTES = 100 * MIB


class MalformedJson(ModelError):
    """A file that is not JSON, or JSON nested too deeply to parse."""


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, refused (ModelError) unless it is a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer; the
    check is made on the opened descriptor, so the file cannot be swapped in between."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise ModelError(f"{path}: cannot read ({error.strerror})") from error
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise ModelError(
            f"{path}: not a regular file (a FIFO, device, socket or folder); della reads "
            "only regular files"
        )
    return descriptor


def read_bounded(path: Path, limit_bytes: int, what: str) -> bytes:
    """The bytes of the regular file ``path`` (a ``what``, for the message), refused when it
    is larger than ``limit_bytes`` (checked before reading, and again while reading in case
    the file grows)."""
    descriptor = open_regular(path)
    try:
        if os.fstat(descriptor).st_size > limit_bytes:
            raise too_large(path, what, limit_bytes)
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            data = handle.read(limit_bytes + 1)
    except OSError as error:
        raise ModelError(f"{path}: cannot read ({error.strerror})") from error
    finally:
        os.close(descriptor)
    if len(data) > limit_bytes:
        raise too_large(path, what, limit_bytes)
    return data


def too_large(path: Path, what: str, limit_bytes: int) -> ModelError:
    return ModelError(
        f"{path}: larger than the {limit_bytes // MIB} MiB limit for {what}; this is not "
        f"a {what} della can read"
    )


def load_json(path: Path, limit_bytes: int, what: str) -> Any:
    """The JSON value of ``path``, bounded in size; malformed or too deeply nested JSON is a
    ModelError naming the file."""
    return parse_json(read_bounded(path, limit_bytes, what), path)


def parse_json(raw: bytes | str, path: Path, **options: Any) -> Any:
    """``json.loads`` with every failure a ModelError naming ``path`` (``options`` go to
    ``json.loads``; an ``object_pairs_hook`` may raise ModelError itself)."""
    try:
        return json.loads(raw, **options)
    except RecursionError as error:
        raise MalformedJson(f"{path}: JSON nested too deeply to be a model file") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MalformedJson(f"{path}: not valid JSON ({error})") from error
