"""Resume trusts nothing it has not verified (issue #14, findings 4, 5 and 10).

A resumed merge whose recipe, seed, shard layout or inputs changed starts over from an empty
folder; an input replaced by same-size content with its mtime kept is noticed; the disk check
of a resumed merge counts only what is left to write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from killed_merges import kill_after, make_model
from safetensors.numpy import load_file, save_file

from della_cli.api import MergeOptions, run_merge
from della_cli.io.journal import JOURNAL_NAME
from della_cli.io.output import staging_path
from della_cli.verify import verify_model

SHARD_BYTES = 600_000


@pytest.fixture
def recipe(tmp_path) -> Path:
    base = make_model(tmp_path / "base", 0)
    experts = [make_model(tmp_path / f"expert{i}", i) for i in (1, 2)]
    path = tmp_path / "recipe.yaml"
    recipe = {
        "merge_method": "della",
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "parameters": {"density": 0.6, "epsilon": 0.1, "lambda": 1.1},
        "seed": 5,
    }
    path.write_text(json.dumps(recipe))
    return path


def files(folder: Path) -> dict[str, bytes]:
    """Every file of an output but its card (which names the folder)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "README.md"}


@pytest.mark.parametrize(
    "change",
    [{"out_shard_bytes": 400_000}, {"seed": 6}, {"out_shard_bytes": 10**9}],
    ids=["shard-size", "seed", "one-shard"],
)
def test_a_resume_that_starts_over_leaves_no_stale_file(recipe, tmp_path, monkeypatch, change):
    """Finding 4: the output held the new shards plus the old ones and the old index."""
    out = tmp_path / "merged"
    kill_after(7, recipe, out, MergeOptions(out_shard_bytes=SHARD_BYTES), monkeypatch)
    options = {"out_shard_bytes": SHARD_BYTES, **change}
    warnings: list[str] = []
    report = run_merge(
        recipe, out, MergeOptions(resume=True, **options), on_warning=warnings.append
    )
    assert report.resumed_shards == 0
    assert any("starting over" in w for w in warnings)
    reference = tmp_path / "reference"
    run_merge(recipe, reference, MergeOptions(**options))
    assert files(out) == files(reference)
    assert verify_model(out).healthy


@pytest.mark.parametrize("how", ["in-place", "new-file"])
def test_an_input_replaced_with_its_size_and_mtime_kept_is_noticed(
    recipe, tmp_path, monkeypatch, how
):
    """Finding 5: `cp -p` of same-size content over an expert; the resume mixed old and new."""
    out = tmp_path / "merged"
    kill_after(7, recipe, out, MergeOptions(out_shard_bytes=SHARD_BYTES), monkeypatch)
    weights = tmp_path / "expert2" / "model.safetensors"
    stat = weights.stat()
    tensors = load_file(str(weights))
    tensors = {name: value * np.float32(1.5) for name, value in tensors.items()}
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata={"format": "pt"})
    assert other.stat().st_size == stat.st_size
    if how == "in-place":  # cp -p onto the file: same inode, data rewritten
        with weights.open("r+b") as handle:
            handle.write(other.read_bytes())
    else:  # a copy renamed over it: a new inode
        os.replace(other, weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns
    report = run_merge(recipe, out, MergeOptions(out_shard_bytes=SHARD_BYTES, resume=True))
    assert report.resumed_shards == 0
    reference = tmp_path / "reference"
    run_merge(recipe, reference, MergeOptions(out_shard_bytes=SHARD_BYTES))
    assert files(out) == files(reference)


def test_a_resume_on_a_tight_disk_needs_only_what_is_left(recipe, tmp_path, monkeypatch):
    """Finding 10: the plan demanded the whole output's size, ignoring the verified shards."""
    out = tmp_path / "merged"
    kill_after(9, recipe, out, MergeOptions(out_shard_bytes=SHARD_BYTES), monkeypatch)
    staging = staging_path(out)
    done = json.loads((staging / JOURNAL_NAME).read_text())["shards"]
    written = sum((staging / name).stat().st_size for name in done)
    total = 12 * 128 * 512 * 4
    assert written > total // 3
    monkeypatch.setattr("della_cli.preflight.free_bytes", lambda path: total - written + 50_000)
    report = run_merge(recipe, out, MergeOptions(out_shard_bytes=SHARD_BYTES, resume=True))
    assert report.resumed_shards == len(done)
    fresh = tmp_path / "fresh"
    from della_cli.errors import PlanError

    with pytest.raises(PlanError, match="free"):  # a fresh merge still needs it all
        run_merge(recipe, fresh, MergeOptions(out_shard_bytes=SHARD_BYTES))


def test_a_partial_folder_della_did_not_make_is_not_resumed(recipe, tmp_path):
    """A folder at the temporary path holding a plausible journal and shards, but made by
    someone else: refused, untouched."""
    out = tmp_path / "merged"
    planted = staging_path(out)
    planted.mkdir()
    (planted / JOURNAL_NAME).write_text(
        json.dumps({"version": 2, "fingerprint": "x", "shards": {}})
    )
    (planted / "model-00001-of-00006.safetensors").write_bytes(b"someone's")
    from della_cli.errors import OutputError

    with pytest.raises(OutputError, match="della"):
        run_merge(recipe, out, MergeOptions(out_shard_bytes=SHARD_BYTES, resume=True))
    assert (planted / "model-00001-of-00006.safetensors").read_bytes() == b"someone's"
