"""The folder that the parts of a merge write their shards into, beside the output.

``.OUT.della-parts`` holds the finished shards of every part under their final names, and one
manifest per part (``part-00002-of-00008.json``) recording the digest of each shard it
finished, with the fingerprint of the merge that made it. Several processes, on one machine or
on several that share the file system, write into it at once safely: each writes its shards in
a work folder of its own and renames each finished shard into place (one step, and two parts
that computed the same shard put the same bytes there), and each writes only its own manifest,
replaced atomically. ``della merge --assemble`` trusts a shard only when some manifest of this
very merge records it and its bytes still have that digest.

The folder is made under a random name, marked as della's (``.della-parts``, naming the
output) and only then given its fixed name, so whatever holds that name and carries the marker
is della's own; anything else there is refused and never emptied or removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from della_cli.errors import OutputError
from della_cli.io import rename
from della_cli.io.atomic import write_atomically
from della_cli.io.destination import output_path

try:
    import fcntl
except ImportError:  # Windows: a part run twice at once is not detected there
    fcntl = None

PARTS_MARKER = ".della-parts"
PARTS_SUFFIX = ".della-parts"
MANIFEST_VERSION = 1


def parts_path(out: Path) -> Path:
    out = output_path(out)
    return out.parent / f".{out.name}{PARTS_SUFFIX}"


def manifest_name(number: int, count: int) -> str:
    return f"part-{number:05d}-of-{count:05d}.json"


@dataclass
class Manifest:
    """What one part (or an assembly that computed shards itself) finished, and for which
    merge: ``fingerprint`` names everything that determines the output bytes."""

    fingerprint: str
    part: str
    shards: dict[str, str] = field(default_factory=dict)  # file name -> XXH3-128 digest
    nonfinite: bool = False  # an input tensor held NaN or Inf
    resumed: bool = False  # some shards came from an earlier run, unread by this one

    def save(self, folder: Path, name: str) -> None:
        """Replace the manifest atomically: a reader sees the old one or the new one."""
        payload = {"version": MANIFEST_VERSION, **self.__dict__}
        write_atomically(folder / name, json.dumps(payload))

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        try:
            payload = json.loads(path.read_text())
            if payload.pop("version") != MANIFEST_VERSION:
                return None
            manifest = cls(**payload)
            if not isinstance(manifest.shards, dict):
                return None
            return manifest
        except (OSError, ValueError, KeyError, TypeError):
            return None


def manifests(folder: Path) -> dict[str, Manifest]:
    """Every readable manifest in the folder, by file name."""
    found = {}
    for path in sorted(folder.glob("part-*.json")) + sorted(folder.glob("assembly.json")):
        manifest = Manifest.load(path)
        if manifest is not None:
            found[path.name] = manifest
    return found


def open_parts_folder(out: Path, create: bool) -> Path | None:
    """The parts folder of ``out``: della's own, made if missing and ``create`` (else None
    when missing). Refuses (OutputError) anything at its name that della did not make."""
    out = output_path(out)
    folder = parts_path(out)
    if not _is_own(folder, out):
        if not create:
            return None
        out.parent.mkdir(parents=True, exist_ok=True)
        fresh = folder.parent / f"{folder.name}-{secrets.token_hex(8)}"
        os.mkdir(fresh, 0o755)
        marker = json.dumps({"della": "parts", "out": str(out)})
        (fresh / PARTS_MARKER).write_text(marker)
        try:
            rename.move_to_new_name(fresh, folder)
        except FileExistsError:  # another part made it a moment ago, or something else is there
            shutil.rmtree(fresh, ignore_errors=True)
        if not _is_own(folder, out):
            raise OutputError(
                f"{folder} exists but was not made by della for the parts of {out}; della "
                "never writes into or removes a folder it did not make: move it away"
            )
    return folder


def _is_own(folder: Path, out: Path) -> bool:
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise OutputError(
            f"{folder} is not a folder of this user's; della never writes into it: move it away"
        )
    try:
        marker = json.loads((folder / PARTS_MARKER).read_text())
        return marker.get("della") == "parts" and marker.get("out") == str(out)
    except (OSError, ValueError, AttributeError):
        return False


def lock_part(folder: Path, name: str, label: str) -> int:
    """Hold the lock of one part (released by the kernel when the process ends, even killed),
    so that the same part computed twice at once is refused rather than interleaved."""
    descriptor = os.open(folder / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise OutputError(
                f"part {label} of this merge is being computed by another process right now; "
                "wait for it, or stop it before running the part again"
            ) from None
    return descriptor


def fresh_work_folder(folder: Path, name: str) -> Path:
    """An empty work folder of one part's own, where its shards are written before they are
    renamed into place (what a killed run left there is removed)."""
    work = folder / f".{name}.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


def link_or_copy(source: Path, destination: Path) -> None:
    """Put a shard into the output's temporary folder: a hard link (no bytes copied, and the
    parts folder keeps its own until the output is published), or a copy where the file
    system has no hard links."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def remove_parts_folder(folder: Path) -> None:
    """Remove the parts folder once the output is published (only della's own: checked by
    its marker when it was opened)."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)
