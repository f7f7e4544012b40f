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
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from della_cli.io.atomic import write_atomically

JOURNAL_NAME = ".della-progress.json"
JOURNAL_VERSION = 2  # 1 recorded SHA-256 digests
_CHUNK_BYTES = 16 << 20


@dataclass
class Journal:
    fingerprint: str
    shards: dict[str, str] = field(default_factory=dict)  # file name -> XXH3-128 hex digest

    def save(self, folder: Path) -> None:
        """Write atomically: a crash leaves the old journal or the new one, never half."""
        payload = {
            "version": JOURNAL_VERSION,
            "fingerprint": self.fingerprint,
            "shards": self.shards,
        }
        write_atomically(folder / JOURNAL_NAME, json.dumps(payload))

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
    """A digest of what determines the output bytes: the recipe, the seed, the shard layout,
    and each input file by ``file_identity``."""
    files = []
    for folder in inputs:
        weights = [*folder.glob("*.safetensors*"), *folder.glob("pytorch_model*.bin*")]
        # adapter_config.json: a LoRA adapter's folder (its scale is there)
        for path in sorted({*weights, folder / "config.json", folder / "adapter_config.json"}):
            if path.is_file():  # a regular file (never a FIFO, which would block the read)
                files.append([str(path.resolve()), file_identity(path)])
    material = json.dumps([recipe_text, seed, layout, files], sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()


_SAMPLES = 16
_SAMPLE_BYTES = 4096
_HEAD_BYTES = 1 << 20


def file_identity(path: Path) -> list:
    """What tells an input file from any other version of it, short of reading it all.

    Size and mtime alone miss a copy made with ``cp -p`` or ``rsync -t``, which keep both.
    What a copy cannot keep: the inode (a file renamed over it gets a new one) and the change
    time (``ctime``), which the kernel sets on every write, rename or chmod and no user call
    can set back, so a file rewritten in place changes it too. On file systems with coarse
    timestamps a rewrite within the same tick could keep it, so a digest of the safetensors
    header (names, dtypes, shapes, offsets; up to 1 MiB) and of 16 blocks of 4 KiB spread
    evenly over the file (the last included) is part of the identity as well: about 70 KiB
    read per file. What escapes is an in-place rewrite within one timestamp tick that keeps
    the header and touches no sampled byte; hashing every input in full would catch that too,
    at the cost of reading all of them once more on every merge.
    """
    info = path.stat()
    digest = xxhash.xxh3_128()
    with path.open("rb") as handle:
        prefix = handle.read(8)
        header_bytes = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        digest.update(prefix + handle.read(min(header_bytes, _HEAD_BYTES)))
        step = max(info.st_size - _SAMPLE_BYTES, 0) // (_SAMPLES - 1)
        for sample in range(_SAMPLES):
            handle.seek(sample * step)
            digest.update(handle.read(_SAMPLE_BYTES))
    return [
        info.st_size,
        info.st_dev,
        info.st_ino,
        info.st_ctime_ns,
        info.st_mtime_ns,
        digest.hexdigest(),
    ]
