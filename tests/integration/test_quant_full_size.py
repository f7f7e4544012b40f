"""Issue #19: ``della plan`` on header-only stand-ins of the published quantized MoE releases
at full size (tests/quant_stand_ins.py), served by the fake Hub: the sizes it reports match
the published checkpoints (what a merge downloads), and the output it plans."""

from __future__ import annotations

import json

import pytest
from quant_stand_ins import (
    deepseek_v3_config,
    deepseek_v3_layout,
    gpt_oss_config,
    gpt_oss_layout,
    layout_bytes,
    repository,
    stand_in,
)
from typer.testing import CliRunner

from della_cli.cli import app


def file_bytes(layout: dict) -> int:
    """The size of the safetensors file: its tensors' bytes (the index's total_size) and
    its header."""
    return len(stand_in(layout))


def planned(fake_hub, tmp_path, config: dict, layout: dict, repos: tuple[str, str], extra=""):
    """The JSON plan of a task arithmetic of ``repos[1]`` on ``repos[0]``, both stand-ins of
    ``layout``; the only problem allowed is the disk here, too small for such an output."""
    for repo in repos:
        fake_hub.add_files(repo, repository(config, layout), "add")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {repos[0]}\n{extra}"
        f"models:\n  - model: {repos[1]}\n    parameters: {{weight: 1.0}}\n"
    )
    result = CliRunner().invoke(app, ["plan", str(recipe), "--device", "cpu", "--json"])
    plan = json.loads(result.stdout)
    assert all("free some space" in p for p in plan["problems"]), plan["problems"]
    assert result.exit_code == (2 if plan["problems"] else 0)
    assert fake_hub.served(".safetensors") < 2 * 16 * 2**20, "headers only, no weights"
    return plan


@pytest.mark.slow  # 92,000 tensors: about 10 s of CPU
def test_deepseek_v3_fp8_plans_at_its_published_size(fake_hub, tmp_path):
    config = deepseek_v3_config()
    layout = deepseek_v3_layout(config)
    # 688.6 GB, as the release's 163 shards: 671B parameters of the main model and 14B of
    # its MTP layer, nearly all in one byte each, and a float32 scale per 128x128 block
    assert layout_bytes(layout) == 688_574_839_360
    repos = ("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1")
    plan = planned(fake_hub, tmp_path, config, layout, repos, "out_dtype: fp8\n")
    assert plan["download_bytes"] == 2 * file_bytes(layout)
    assert plan["output_bytes"] == layout_bytes(layout)  # written back in FP8, scales and all
    weights = sum(1 for name in layout if name.endswith("_scale_inv"))
    assert plan["tensors"] == len(layout) - weights  # a scale is no job of its own


@pytest.mark.parametrize(
    ("repo", "layers", "experts", "published", "parameters"),
    [
        ("openai/gpt-oss-120b", 36, 128, 65_248_815_744, 116_829_156_672),
        ("openai/gpt-oss-20b", 24, 32, 13_761_264_768, 20_914_757_184),
    ],
)
def test_gpt_oss_mxfp4_plans_at_its_published_size(
    fake_hub, tmp_path, repo, layers, experts, published, parameters
):
    config = gpt_oss_config(layers, experts)
    layout = gpt_oss_layout(config)
    assert layout_bytes(layout) == published  # 65.2 GB and 13.8 GB, as released
    plan = planned(fake_hub, tmp_path, config, layout, (repo, repo + "-tuned"))
    assert plan["download_bytes"] == 2 * file_bytes(layout)
    assert plan["output_bytes"] == 2 * parameters  # dequantized experts, in bfloat16
    assert plan["tensors"] == len(layout) - 2 * layers  # blocks and scales: one tensor


def test_gpt_oss_written_back_in_mxfp4_plans_at_its_published_size(fake_hub, tmp_path):
    config = gpt_oss_config(24, 32)
    layout = gpt_oss_layout(config)
    repos = ("openai/gpt-oss-20b", "openai/gpt-oss-20b-tuned")
    plan = planned(fake_hub, tmp_path, config, layout, repos, "out_dtype: mxfp4\n")
    assert plan["output_bytes"] == layout_bytes(layout) == 13_761_264_768  # as released
    assert plan["tensors"] == len(layout) - 2 * 24  # the blocks and scales of each: one job
