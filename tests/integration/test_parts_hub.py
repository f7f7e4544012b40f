"""Parts of a merge of Hub models (the fake Hub of tests/hub_server.py): each part downloads
only the weight files its shards read, ``della plan --parts`` says how many bytes that is, and
the assembled output has the bytes of the merge of the same models from local folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from della_cli.api import MergeOptions, run_merge
from della_cli.assemble import assemble
from della_cli.part_merge import plan_parts_report, run_part

SHARD_BYTES = 8000  # one (32, 48) float32 tensor a shard


def sharded_model(folder: Path, seed: int) -> Path:
    """Eight tensors in two weight files (layers 0-3, then 4-7) and their index."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{k}.weight": torch.randn(32, 48, generator=generator) for k in range(8)}
    weight_map = {}
    for number, layers in ((1, range(4)), (2, range(4, 8))):
        name = f"model-0000{number}-of-00002.safetensors"
        chunk = {f"layers.{k}.weight": tensors[f"layers.{k}.weight"] for k in layers}
        save_file(chunk, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    index = {"metadata": {"total_size": 8 * 32 * 48 * 4}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return folder


def ties_recipe(base: str, *experts: str) -> dict:
    return {
        "merge_method": "ties",
        "base_model": base,
        "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.5}} for e in experts],
    }


def full_downloads(hub) -> list[str]:
    """The weight files the fake Hub served whole (not a header range)."""
    return sorted(
        r.path.rsplit("/", 1)[-1]
        for r in hub.requests
        if r.method == "GET" and r.range is None and r.path.endswith(".safetensors")
    )


def test_each_part_downloads_only_the_files_its_shards_read(fake_hub, tmp_path, write_recipe):
    local = [sharded_model(tmp_path / f"m{i}", i) for i in range(3)]
    for name, folder in zip(("org/base", "org/a", "org/b"), local, strict=True):
        fake_hub.add_model(name, folder)
    recipe = write_recipe(ties_recipe("org/base", "org/a", "org/b"))
    options = MergeOptions(device="cpu", out_shard_bytes=SHARD_BYTES, progress=False)

    _, parts = plan_parts_report(recipe, None, options, 2)
    first_files = sum((f / "model-00001-of-00002.safetensors").stat().st_size for f in local)
    assert [p.download_bytes for p in parts] == [
        first_files,
        sum(sum(p.stat().st_size for p in f.glob("*.safetensors")) for f in local) - first_files,
    ]
    assert full_downloads(fake_hub) == []  # planning reads headers only

    out = tmp_path / "hub" / "out"
    run_part(recipe, out, options, 1, 2)
    assert full_downloads(fake_hub) == ["model-00001-of-00002.safetensors"] * 3
    run_part(recipe, out, options, 2, 2)
    assert (
        full_downloads(fake_hub)
        == ["model-00001-of-00002.safetensors"] * 3 + ["model-00002-of-00002.safetensors"] * 3
    )
    assemble(recipe, out, options)

    local_recipe = write_recipe(ties_recipe(*map(str, local)), "local.yaml")
    whole = tmp_path / "local" / "out"
    run_merge(local_recipe, whole, options)
    weights = sorted(p.name for p in whole.glob("*.safetensors*"))
    assert len(weights) == 9  # eight shards and the index
    for name in [*weights, "config.json"]:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
