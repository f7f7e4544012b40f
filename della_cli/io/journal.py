"""The progress journal that lets an interrupted merge resume.

Shards are written in order; when one is complete (flushed and fsynced) its XXH3-128 digest,
computed while it was written, is recorded in ``.della-progress.json`` inside the staging
folder, itself replaced atomically. A resumed merge re-hashes the recorded shards, keeps the
verified prefix and recomputes the rest. The journal also records a fingerprint of everything
that determines the output bytes (recipe text and seed, shard layout, input files), so a merge
resumes only into a partial output of the very same merge. Every random draw is keyed by (seed,
tensor, expert, element), so the recomputed shards are byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

JOURNAL_NAME = ".della-progress.json"
JOURNAL_VERSION = 2  # 1 recorded SHA-256 digests
_CHUNK_BYTES = 16 << 20


@dataclass
class Journal:
    fingerprint: str
    shards: dict[str, str] = field(default_factory=dict)  # file name -> XXH3-128 hex digest

    def save(self, folder: Path) -> None:
        """Write atomically: a crash leaves the old journal or the new one, never half."""
        temporary = folder / (JOURNAL_NAME + ".tmp")
        payload = {
            "version": JOURNAL_VERSION,
            "fingerprint": self.fingerprint,
            "shards": self.shards,
        }
        with temporary.open("w") as handle:
            json.dump(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, folder / JOURNAL_NAME)

    @classmethod
    def load(cls, folder: Path) -> Journal | None:
        try:
            payload = json.loads((folder / JOURNAL_NAME).read_text())
            if payload["version"] != JOURNAL_VERSION:  # another digest: start over
                return None
            return cls(str(payload["fingerprint"]), dict(payload["shards"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def shard_digest(data: bytes = b""):
    """The running digest of a shard: XXH3-128, a checksum (not a cryptographic hash) that
    catches a truncated or altered shard at over 10 GB/s, where SHA-256 ran at 1.4 GB/s and
    held back the writer."""
    return xxhash.xxh3_128(data)


def file_digest(path: Path) -> str:
    digest = shard_digest()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verified_shard_count(folder: Path, journal: Journal, file_names: list[str]) -> int:
    """How many leading shards are on disk exactly as recorded when they were finished."""
    count = 0
    for name in file_names:
        recorded = journal.shards.get(name)
        path = folder / name
        if recorded is None or not path.is_file() or file_digest(path) != recorded:
            break
        count += 1
    return count


def merge_fingerprint(recipe_text: str, seed: int, layout: object, inputs: list[Path]) -> str:
    """A digest of what determines the output bytes; input files by name, size and mtime."""
    files = []
    for folder in inputs:
        weights = [*folder.glob("*.safetensors*"), *folder.glob("pytorch_model*.bin*")]
        for path in sorted(weights):
            stat = path.stat()
            files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    material = json.dumps([recipe_text, seed, layout, files], sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()
