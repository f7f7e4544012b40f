"""`della verify` finds what is wrong with a model folder, and says so clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from della_cli.api import MergeOptions, run_merge
from della_cli.cli import app


@pytest.fixture(scope="module")
def merged_sharded(model_zoo, tmp_path_factory) -> Path:
    """A della merge of tiny Llama models, written in several shards."""
    root = tmp_path_factory.mktemp("verify")
    recipe = root / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "merge_method": "della",
                "base_model": str(model_zoo("llama")),
                "models": [{"model": str(model_zoo("llama", expert=1))}],
                "parameters": {"density": 0.7, "epsilon": 0.1},
            }
        )
    )
    out = root / "merged"
    run_merge(recipe, out, MergeOptions(out_shard_bytes=20_000))
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


@pytest.fixture
def damaged(merged_sharded, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(merged_sharded, copy)
    return copy


def verify(folder: Path, *options: str):
    result = CliRunner().invoke(app, ["verify", str(folder), "--json", *options])
    report = json.loads(result.stdout) if result.stdout.strip().startswith("{") else None
    return result, report


def failed(report: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}


def test_a_merged_model_is_healthy_and_generates(merged_sharded):
    result, report = verify(merged_sharded, "--generate")
    assert result.exit_code == 0, result.output
    assert report["healthy"] and failed(report) == {}
    assert [c["name"] for c in report["checks"]] == [
        "files",
        "config",
        "tensors",
        "tokenizer",
        "generate",
    ]


def test_truncated_shard(damaged):
    shard = sorted(damaged.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    result, report = verify(damaged)
    assert result.exit_code == 1
    assert shard.name in failed(report)["files"] and "past the end" in failed(report)["files"]


def test_index_naming_a_missing_tensor(damaged):
    index_path = damaged / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_shard = sorted(damaged.glob("model-*.safetensors"))[0].name
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = first_shard
    index_path.write_text(json.dumps(index))
    result, report = verify(damaged)
    assert result.exit_code == 1
    assert "model.layers.9.mlp.up_proj.weight" in failed(report)["files"]


def test_nan_in_a_tensor(damaged):
    shard = sorted(damaged.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    result, report = verify(damaged)
    assert result.exit_code == 1
    assert failed(report) == {"tensors": f"NaN or Inf in '{name}'"}


def test_tokenizer_larger_than_the_embeddings(damaged):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(damaged)
    tokenizer.add_tokens([f"extra{i}" for i in range(5)])
    tokenizer.save_pretrained(damaged)
    result, report = verify(damaged)
    assert result.exit_code == 1
    assert (
        "has 101 tokens but 'model.embed_tokens.weight' has 96 rows" in failed(report)["tokenizer"]
    )


def test_shapes_that_disagree_with_the_config(damaged):
    config_path = damaged / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"] = 3
    config["vocab_size"] = 100
    config_path.write_text(json.dumps(config))
    result, report = verify(damaged)
    assert result.exit_code == 1
    problems = failed(report)["config"]
    assert "weights hold 2 layers but config.json says 3" in problems
    assert "has 96 rows but config.json vocab_size is 100" in problems


def test_human_report_and_missing_folder(merged_sharded, tmp_path):
    result = CliRunner().invoke(app, ["verify", str(merged_sharded)])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[-1].endswith("healthy")
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "is not a folder" in result.output


def test_merge_checks_its_own_output_before_publishing(model_zoo, write_recipe, tmp_path):
    """A writer bug that produced a broken shard must not be published."""
    from della_cli.io import writer

    recipe = write_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(model_zoo("llama")),
            "models": [{"model": str(model_zoo("llama", expert=1))}],
        }
    )
    original = writer.encode_header

    def wrong_header(tensors, metadata):
        header = original(tensors, metadata)
        return header[:8] + header[8:].replace(b'"F32"', b'"F16"', 1)

    mp = pytest.MonkeyPatch()
    mp.setattr(writer, "encode_header", wrong_header)
    try:
        result = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    finally:
        mp.undo()
    assert result.exit_code == 1
    assert "failed its own check" in result.output
    assert not (tmp_path / "out").exists()


def test_a_shard_the_index_does_not_name_is_not_healthy(tmp_path, model_zoo, write_recipe):
    """A leftover shard of another merge beside the index (what an unsafe resume once left):
    transformers ignores it, a reader of files may not."""
    from della_cli.api import MergeOptions, run_merge
    from della_cli.verify import verify_model

    recipe = write_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(model_zoo("llama")),
            "models": [{"model": str(model_zoo("llama", expert=1))}],
        }
    )
    out = tmp_path / "merged"
    run_merge(recipe, out, MergeOptions(device="cpu", out_shard_bytes=30_000, progress=False))
    assert verify_model(out).healthy
    shards = sorted(out.glob("model-*.safetensors"))
    (out / "model-00001-of-00009.safetensors").write_bytes(shards[0].read_bytes())
    report = verify_model(out)
    assert not report.healthy
    (files,) = [check for check in report.checks if check.name == "files"]
    assert "'model-00001-of-00009.safetensors'" in files.detail
