"""Replacing an output folder never loses a user's file (issue #14, findings 1, 2, 3, 6 and 7).

Each test is the finding's reproduction: a planted temporary-folder symlink, ``--overwrite`` on
``""``, ``.``, a project folder, the home folder; a second merge that finishes first; an input
folder at the temporary path; a mount point; a second Ctrl-C during clean-up; a signal while the
old output is removed. What the user owns must be byte for byte as it was, and the output is
either the old one or the new one, complete, with nothing beside it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from della_cli.api import MergeOptions, run_merge
from della_cli.cli import app
from della_cli.errors import DellaError, OutputError
from della_cli.io.writer import ShardWriter


def raw_model(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tensors = {f"layers.{i}.weight": rng.standard_normal((32, 64), np.float32) for i in range(4)}
    if seed:
        noise = np.random.default_rng(seed)
        tensors = {
            k: v + 0.01 * noise.standard_normal(v.shape, np.float32) for k, v in tensors.items()
        }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return folder


def toy_recipe(
    root: Path, expert_folder: Path | None = None, recipe_dir: Path | None = None
) -> Path:
    base = raw_model(root / "base", 0)
    experts = [raw_model(expert_folder or root / "expert1", 1), raw_model(root / "expert2", 2)]
    recipe = {
        "merge_method": "della",
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "parameters": {"density": 0.6, "epsilon": 0.1},
        "seed": 5,
    }
    path = (recipe_dir or root) / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture
def recipe(tmp_path) -> Path:
    return toy_recipe(tmp_path)


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry below ``folder`` (not following symlinks): file bytes, link targets."""
    state: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = ("link", os.readlink(path))
        elif path.is_file():
            state[key] = path.read_bytes()
        else:
            state[key] = "dir"
    return state


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".della-" in p.name)


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def model_folder(folder: Path) -> Path:
    """A folder holding only what a merged model holds (a stand-in for an earlier output)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(b"earlier weights")
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("an earlier card")
    return folder


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_a_planted_temporary_symlink_is_never_followed(recipe, tmp_path, resume):
    """Finding 1: `.merged.della-tmp-partial` -> another folder; della must neither empty the
    target, nor write there, nor publish a symlink."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    (victim / "model.safetensors").write_bytes(b"not della's")
    before = snapshot(victim)
    planted = tmp_path / ".merged.della-tmp-partial"
    planted.symlink_to(victim, target_is_directory=True)
    result = invoke("merge", recipe, tmp_path / "merged", *(["--resume"] if resume else []))
    assert result.exit_code == 2, result.output
    assert str(planted) in result.output
    assert snapshot(victim) == before
    assert planted.is_symlink() and os.readlink(planted) == str(victim)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged").is_symlink()


@pytest.mark.parametrize("out", ["", "."])
def test_overwrite_of_an_empty_or_dot_output_touches_nothing(recipe, tmp_path, monkeypatch, out):
    """Finding 2: a script with an empty $OUT ran `della merge r.yaml "" --overwrite` and lost
    the working directory's files."""
    work = model_folder(tmp_path / "work")  # even a folder of model files: "" is never OUT
    before = snapshot(work)
    monkeypatch.chdir(work)
    result = invoke("merge", recipe, out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert snapshot(work) == before
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_a_project_folder_holding_the_recipe(tmp_path):
    """Finding 2: `della merge proj/r.yaml proj --overwrite` deleted the recipe and the notes."""
    project = tmp_path / "proj"
    project.mkdir()
    recipe = toy_recipe(tmp_path, recipe_dir=project)
    (project / "notes.md").write_text("my notes")
    before = snapshot(project)
    result = invoke("merge", recipe, project, "--overwrite")
    assert result.exit_code == 2, result.output
    assert snapshot(project) == before
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_other_content_and_names_it(recipe, tmp_path):
    out = model_folder(tmp_path / "merged")
    (out / "notes.txt").write_text("mine")
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("mine too")
    before = snapshot(out)
    result = invoke("merge", recipe, out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "notes.txt" in result.output and "runs" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_the_recipes_own_folder_even_of_model_files(tmp_path):
    """Re-running from the recipe copy inside an output: that output holds the recipe."""
    first = toy_recipe(tmp_path)
    out = tmp_path / "merged"
    assert invoke("merge", first, out).exit_code == 0
    before = snapshot(out)
    result = invoke("merge", out / "della_recipe.yaml", out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert snapshot(out) == before


def test_overwrite_refuses_the_home_folder(recipe, tmp_path, monkeypatch):
    home = model_folder(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    before = snapshot(home)
    result = invoke("merge", recipe, home, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "home" in result.output
    assert snapshot(home) == before


@pytest.mark.parametrize("where", ["/", "ancestor"])
def test_root_and_ancestors_of_inputs_are_refused_in_the_check(recipe, tmp_path, where):
    from della_cli.io.output import check_destination

    out = Path("/") if where == "/" else tmp_path
    with pytest.raises(OutputError):
        check_destination(out, True, [tmp_path / "base"])


def test_a_second_merge_never_replaces_the_output_a_first_one_finished(recipe, tmp_path):
    """Finding 3: OUT did not exist when checked, another merge published it meanwhile."""
    out = tmp_path / "merged"

    def first_merge_publishes(job) -> None:
        if not out.exists():
            model_folder(out)

    with pytest.raises(DellaError) as raised:
        run_merge(recipe, out, MergeOptions(), on_progress=first_merge_publishes)
    assert raised.value.exit_code in (1, 2)
    assert (out / "model.safetensors").read_bytes() == b"earlier weights"
    assert leftovers(tmp_path) == []


def test_an_input_at_the_temporary_path_is_never_emptied(tmp_path):
    """Finding 6: an expert folder named like OUT's temporary folder was emptied and removed."""
    expert = tmp_path / ".merged.della-tmp-partial"
    recipe = toy_recipe(tmp_path, expert_folder=expert)
    before = snapshot(expert)
    for extra in ([], ["--resume"]):
        result = invoke("merge", recipe, tmp_path / "merged", *extra)
        assert result.exit_code == 2, result.output
        assert snapshot(expert) == before
    assert not (tmp_path / "merged").exists()


def _can_mount(point: Path) -> bool:
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "none", str(point)], capture_output=True)
    return done.returncode == 0


def test_a_mount_point_is_refused_in_the_plan(recipe, tmp_path):
    """Finding 7: OUT a mount point with --overwrite: the rename fails; the complete temporary
    folder stayed. della refuses before any work, naming the fix."""
    out = tmp_path / "mounted"
    out.mkdir()
    if not _can_mount(out):
        pytest.skip("mounting a tmpfs needs root and CAP_SYS_ADMIN")
    try:
        model_folder(out)
        before = snapshot(out)
        result = invoke("merge", recipe, out, "--overwrite")
        assert result.exit_code == 2, result.output
        assert "mount point" in result.output
        assert snapshot(out) == before
        assert leftovers(tmp_path) == []
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_a_failed_publish_leaves_the_old_output_and_nothing_else(recipe, tmp_path, monkeypatch):
    """The rename that publishes fails (EBUSY, as for a mount point that was not detected): the
    old output stays, the complete temporary folder is removed, and the message says so."""
    out = model_folder(tmp_path / "merged")
    before = snapshot(out)
    real_rename = os.rename

    def busy(src, dst, *args, **kwargs):
        if Path(os.fsdecode(src)).name == "merged" or Path(os.fsdecode(dst)).name == "merged":
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", busy)
    try:  # the portable way: no renameat2
        import della_cli.io.rename as rename

        monkeypatch.setattr(rename, "renameat2", None)
    except ImportError:
        pass
    result = invoke("merge", recipe, out, "--overwrite")
    assert result.exit_code == 1, result.output
    assert "busy" in result.output
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def _interrupt_after_shards(monkeypatch, shards: int) -> None:
    """A Ctrl-C as the ``shards``-th shard is finished."""
    original = ShardWriter._finish_shard
    count = 0

    def finish(self) -> None:
        nonlocal count
        original(self)
        count += 1
        if count == shards:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "_finish_shard", finish)


def _signal_on_first(monkeypatch, function: str, signum: int, name: str | None = None) -> list:
    """Send ``signum`` to this process the first time ``os.<function>`` removes ``name`` (any
    name when None), just before it does."""
    real = getattr(os, function)
    sent: list[str] = []

    def removing(path, *args, **kwargs):
        entry = os.path.basename(os.fsdecode(path))
        if not sent and (name is None or entry == name):
            sent.append(entry)
            os.kill(os.getpid(), signum)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, function, removing)
    return sent


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_second_signal_does_not_interrupt_the_clean_up(recipe, tmp_path, monkeypatch, second):
    """Finding 7: a double Ctrl-C: the second one arrived while the temporary folder was being
    removed and left it half removed."""
    out = tmp_path / "merged"
    _interrupt_after_shards(monkeypatch, 2)
    sent = _signal_on_first(monkeypatch, "unlink", second)
    _signal_on_first(monkeypatch, "rmdir", second)
    result = invoke("merge", recipe, out, "--out-shard-size", "10kB")
    assert sent, "the clean-up removed no file"
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_a_signal_while_the_old_output_is_removed(tmp_path, monkeypatch):
    """Finding 7: SIGTERM while the old OUT was being deleted: exit 130 "nothing was written",
    yet OUT was replaced and `.merged.della-old-PID` remained."""
    recipe = toy_recipe(tmp_path)
    out = tmp_path / "merged"
    assert invoke("merge", recipe, out, "--seed", "1").exit_code == 0
    reference = tmp_path / "reference"
    assert invoke("merge", recipe, reference, "--seed", "2").exit_code == 0
    sent = _signal_on_first(monkeypatch, "unlink", signal.SIGTERM, name="config.json")
    result = invoke("merge", recipe, out, "--seed", "2", "--overwrite")
    assert sent, "the old output was not removed file by file"
    assert leftovers(tmp_path) == []
    if result.exit_code != 0:
        assert result.exit_code == 130, result.output
        assert "nothing was written" not in result.output
    # the new output, complete (the card names its folder, so it is left out)
    assert without_card(snapshot(out)) == without_card(snapshot(reference))


def without_card(state: dict[str, object]) -> dict[str, object]:
    return {name: value for name, value in state.items() if name != "README.md"}
