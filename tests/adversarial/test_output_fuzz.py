"""A seeded fuzz of the output-replacement and resume state machine (issue #14, "done when").

Sequences of merges into one output, each run in-process with a fault at a random moment: a
SIGINT or SIGTERM (one, or two in a row), a full disk, or a simulated SIGKILL (from that moment
every file-system change fails, so nothing after it happens, clean-up included). Before each
run the fuzz may plant things at OUT and at its temporary path (a symlink to a victim folder,
a user's folder, a file, a user's file inside an old output), change an expert's content in
place keeping its size and mtime, and pick --overwrite, --resume, the seed and the shard size.
After each run: every file the user owns is as it was; OUT is the old output or the new one,
complete and byte-identical to an uninterrupted merge of the current inputs; exit 0 means the
new one; and nothing is left beside it but a killed run's partial folder (della's own) and what
the user planted. A few real processes get real signals at random delays at the end. Bounded by
a time budget; the seed makes any failure reproducible.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from della_cli.cli import app
from della_cli.io import rename
from della_cli.io.journal import Journal
from della_cli.io.writer import ShardWriter

SEED = 20261205
BUDGET_S = 25.0
SHARD_SIZES = ("10kB", "20kB", "1GB")


class Killed(BaseException):
    """A simulated SIGKILL: raised by every file-system change from the chosen moment on."""


def snapshot(path: Path) -> object:
    """A path's state, not following symlinks: bytes, link target, or a folder's entries."""
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return {child.name: snapshot(child) for child in sorted(path.iterdir())}
    return None


def write_model(folder: Path, seed: int, scale: float = 1.0) -> None:
    rng = np.random.default_rng(seed)
    tensors = {f"layers.{i}.weight": rng.standard_normal((32, 64), np.float32) for i in range(4)}
    tensors = {name: value * np.float32(scale) for name, value in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


class World:
    """The folders of one fuzz sequence: inputs, recipe, OUT's parent, a victim, references."""

    def __init__(self, root: Path):
        self.root = root
        self.parent = root / "work"
        self.parent.mkdir(parents=True)
        self.out = self.parent / "merged"
        self.staging = self.parent / ".merged.della-tmp-partial"
        self.victim = root / "victim"
        self.victim.mkdir()
        (self.victim / "thesis.tex").write_text("years of work")
        (self.victim / "model.safetensors").write_bytes(b"not della's")
        self.models = []
        for index in range(3):
            folder = root / f"model{index}"
            folder.mkdir()
            write_model(folder, index)
            (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
            self.models.append(folder)
        self.version = 0  # which content expert 2 holds
        self.recipe = root / "recipe.yaml"
        recipe = {
            "merge_method": "della",
            "base_model": str(self.models[0]),
            "models": [{"model": str(m)} for m in self.models[1:]],
            "parameters": {"density": 0.6, "epsilon": 0.1},
            "seed": 1,
        }
        self.recipe.write_text(json.dumps(recipe))
        self.references: dict[tuple, object] = {}
        self.debris: set[str] = set()  # what simulated SIGKILLs left beside OUT

    def change_input(self) -> None:
        """Rewrite expert 2 in place with other values, size and mtime kept (``cp -p``)."""
        weights = self.models[2] / "model.safetensors"
        stat = weights.stat()
        self.version = 1 - self.version
        scratch = self.root / "scratch"
        scratch.mkdir()
        write_model(scratch, 2, scale=1.0 + self.version)
        with weights.open("r+b") as handle:
            handle.write((scratch / "model.safetensors").read_bytes())
        shutil.rmtree(scratch)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    def reference(self, seed: int, shard_size: str) -> object:
        """An uninterrupted merge of the current inputs, into a folder named like OUT."""
        key = (seed, shard_size, self.version)
        if key not in self.references:
            folder = self.root / "references" / "-".join(map(str, key)) / "merged"
            args = ["merge", self.recipe, folder, "--seed", seed, "--out-shard-size", shard_size]
            result = CliRunner().invoke(app, [str(a) for a in args])
            assert result.exit_code == 0, result.output
            self.references[key] = snapshot(folder)
        return self.references[key]


_WRITES = ("mkdir", "open", "write_part", "save")


class Faults:
    """Counts file-system steps of a merge and injects one fault at step ``at``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kind: str, at: int):
        self.kind, self.at, self.steps = kind, at, 0
        self.dead = self.armed = False
        for name in ("unlink", "rmdir", "mkdir", "rename", "replace", "open"):
            monkeypatch.setattr(os, name, self.wrap(getattr(os, name), name))
        monkeypatch.setattr(shutil, "rmtree", self.wrap(shutil.rmtree, "rmtree"))
        if rename.renameat2 is not None:
            monkeypatch.setattr(rename, "renameat2", self.wrap(rename.renameat2, "renameat2"))
        for owner, name in ((ShardWriter, "write_part"), (Journal, "save")):
            monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name), name))

    def wrap(self, real: Callable, name: str) -> Callable:
        def step(*args, **kwargs):
            changes = name != "open" or _opens_for_writing(args, kwargs)
            if self.dead and changes:
                raise Killed
            self.steps += 1
            if self.steps == self.at:
                self.strike()
            elif self.kind == "double" and self.steps == self.at + 1:
                os.kill(os.getpid(), signal.SIGINT)
            if self.armed and name in _WRITES and changes:
                self.armed = False
                raise OSError(errno.ENOSPC, "No space left on device")
            if self.dead and changes:
                raise Killed
            return real(*args, **kwargs)

        return step

    def strike(self) -> None:
        if self.kind in ("sigint", "double"):
            os.kill(os.getpid(), signal.SIGINT)
        elif self.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.kind == "disk-full":  # at the next write: removals do not fail on a full disk
            self.armed = True
        elif self.kind == "kill":
            self.dead = True


def _opens_for_writing(args: tuple, kwargs: dict) -> bool:
    flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
    return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def plant(world: World, rng: np.random.Generator) -> dict[Path, object]:
    """Put user things at OUT and at its temporary path; return what the user owns there."""
    owned: dict[Path, object] = {}
    out_choice = rng.choice(["keep", "keep", "symlink", "file", "user-file-inside"])
    if out_choice != "keep" and not world.out.exists() and not world.out.is_symlink():
        if out_choice == "symlink":
            world.out.symlink_to(world.victim, target_is_directory=True)
        elif out_choice == "file":
            world.out.write_text("a user's file named like the output")
    if out_choice == "user-file-inside" and world.out.is_dir() and not world.out.is_symlink():
        (world.out / "notes.txt").write_text("a user's notes")
    if world.out.is_symlink() or world.out.is_file():
        owned[world.out] = snapshot(world.out)
    if world.out.is_dir() and (world.out / "notes.txt").exists():
        owned[world.out] = snapshot(world.out)
    temp_choice = rng.choice(["none", "none", "none", "symlink", "user-folder", "file"])
    if not world.staging.exists() and not world.staging.is_symlink():
        if temp_choice == "symlink":
            world.staging.symlink_to(world.victim, target_is_directory=True)
        elif temp_choice == "user-folder":
            world.staging.mkdir()
            (world.staging / "model.safetensors").write_bytes(b"a user's weights")
        elif temp_choice == "file":
            world.staging.write_text("a user's file")
    if (world.staging.exists() or world.staging.is_symlink()) and not _is_dellas(world.staging):
        owned[world.staging] = snapshot(world.staging)  # also a killed run's debris
    return owned


def _is_dellas(path: Path) -> bool:
    return not path.is_symlink() and (path / ".della-partial").is_file()


def unplant(world: World, owned: dict[Path, object]) -> None:
    """The user takes their things back, so that the next run may succeed."""
    for path in owned:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path == world.out:
            (path / "notes.txt").unlink()
        else:
            shutil.rmtree(path)


def check_run(world: World, result, fault: Faults | None, before: object, new: object) -> None:
    after = snapshot(world.out) if not world.out.is_symlink() else before
    assert after in (before, new), "OUT is neither the old output nor the new one, complete"
    if result is None:  # killed: no exit status to check
        pass
    elif result.exit_code == 0:
        assert after == new
    elif after == new and before != new:
        assert result.exit_code == 130 and "written in full" in result.output, result.output
    else:
        assert result.exit_code in (1, 2, 130), result.output
    if fault is not None and fault.dead:  # a SIGKILL may leave its temporary folders
        world.debris |= {p.name for p in world.parent.iterdir() if ".della-" in p.name}
    allowed = {world.out.name, world.staging.name, *world.debris}  # the staging path: checked
    assert {p.name for p in world.parent.iterdir()} <= allowed


def test_fuzz_output_replacement_and_resume(tmp_path, monkeypatch):
    rng = np.random.default_rng(SEED)
    deadline = time.monotonic() + BUDGET_S
    runs = 0
    outcomes: Counter[object] = Counter()
    while time.monotonic() < deadline:
        world = World(tmp_path / f"sequence{runs}")
        victim = snapshot(world.victim)
        for _ in range(8):
            if rng.random() < 0.2:
                world.change_input()
            seed, shard_size = int(rng.integers(1, 3)), str(rng.choice(SHARD_SIZES))
            new = world.reference(seed, shard_size)
            owned = plant(world, rng)
            inputs = {m: snapshot(m) for m in world.models}
            before = snapshot(world.out) if not world.out.is_symlink() else None
            kind = str(rng.choice(["none", "sigint", "sigterm", "double", "disk-full", "kill"]))
            args = ["merge", world.recipe, world.out, "--seed", seed]
            args += ["--out-shard-size", shard_size, "--quiet"]
            args += ["--overwrite"] * int(rng.random() < 0.7) + ["--resume"] * int(
                rng.random() < 0.5
            )
            with monkeypatch.context() as patched:
                if rng.random() < 0.3:  # the portable way, without renameat2
                    patched.setattr(rename, "renameat2", None)
                at = int(rng.integers(1, 60))
                fault = Faults(patched, kind, at) if kind != "none" else None
                try:
                    result = CliRunner().invoke(app, [str(a) for a in args])
                except Killed:
                    result = None
            runs += 1
            context = f"run {runs}: {args[3:]} fault {kind} at {at}"
            assert result is not None or (fault and fault.dead), context
            assert result is None or "Traceback" not in result.output, context
            assert snapshot(world.victim) == victim, context
            assert {m: snapshot(m) for m in world.models} == inputs, context
            for path, state in owned.items():
                assert snapshot(path) == state, f"{context}: {path} changed"
            check_run(world, result, fault, before, new)
            outcomes[result.exit_code if result is not None else "killed"] += 1
            unplant(world, owned)
    assert runs >= 40, f"only {runs} runs in {BUDGET_S} s"
    assert {0, 1, 2, 130, "killed"} <= set(outcomes), outcomes  # every path was taken


@pytest.mark.parametrize("case", range(3))
def test_fuzz_real_signals_at_random_moments(tmp_path, case):
    """Real processes, real signals: SIGINT, SIGTERM, a double Ctrl-C or SIGKILL after a
    seeded random delay, into an OUT that holds an earlier output; then the same merge again
    (with --resume after SIGKILL) must give the uninterrupted bytes."""
    rng = np.random.default_rng(SEED + case)
    world = World(tmp_path)
    for index, model in enumerate(world.models):  # larger, so that signals land mid-merge
        values = np.random.default_rng(index).standard_normal((8, 256, 512), np.float32)
        tensors = {f"layers.{i}.weight": values[i] for i in range(8)}
        save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    new = world.reference(2, "300kB")
    earlier = ["merge", world.recipe, world.out, "--seed", "1", "--out-shard-size", "300kB"]
    assert CliRunner().invoke(app, [str(a) for a in earlier]).exit_code == 0
    before = snapshot(world.out)
    command = [sys.executable, "-m", "della_cli", "merge", str(world.recipe), str(world.out)]
    command += ["--seed", "2", "--out-shard-size", "300kB", "--overwrite", "--quiet"]
    kind = ["sigint", "double", "kill"][case]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as process:
        time.sleep(float(rng.uniform(0.4, 2.0)))
        if kind == "kill":
            process.kill()
        else:
            process.send_signal(signal.SIGINT)
            if kind == "double":
                time.sleep(0.002)
                process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    after = snapshot(world.out)
    assert after in (before, new), stderr
    if kind != "kill":
        assert process.returncode in (0, 130), stderr
        assert [p.name for p in world.parent.iterdir()] == ["merged"], stderr
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert snapshot(world.out) == new
    assert [p.name for p in world.parent.iterdir()] == ["merged"]
