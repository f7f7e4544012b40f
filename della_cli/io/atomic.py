"""Small files replaced in one step: a journal, a part's manifest, a sweep's state and tables.

The text goes to a hidden temporary file beside the target (a random name, so that two writers
never share one), is flushed to the disk, then renamed over the target: a reader, or a run
killed at any instant, sees the old content or all of the new, never a half-written file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """``text`` in ``path``, which holds either its old content or all of the new."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with temporary.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
