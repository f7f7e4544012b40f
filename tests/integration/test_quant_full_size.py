"""Issue #19: ``della plan`` on header-only stand-ins of the published quantized MoE releases
at full size (tests/quant_stand_ins.py), served by the fake Hub: the sizes it reports match
the published checkpoints (what a merge downloads), and the output it plans."""

from __future__ import annotations

import json

from quant_stand_ins import (
    deepseek_v3_config,
    deepseek_v3_layout,
    layout_bytes,
    repository,
)
from typer.testing import CliRunner

from della_cli.cli import app

GB = 10**9


def planned(fake_hub, tmp_path, config: dict, layout: dict, repos: tuple[str, str], extra=""):
    for repo in repos:
        fake_hub.add_files(repo, repository(config, layout), "add")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {repos[0]}\n{extra}"
        f"models:\n  - model: {repos[1]}\n    parameters: {{weight: 1.0}}\n"
    )
    result = CliRunner().invoke(app, ["plan", str(recipe), "--device", "cpu", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert fake_hub.served(".safetensors") < 4 * 20 * 2**20, "headers only, no weights"
    return json.loads(result.stdout)


def test_deepseek_v3_fp8_plans_at_its_published_size(fake_hub, tmp_path):
    config = deepseek_v3_config()
    layout = deepseek_v3_layout(config)
    # the release's 163 shards hold 688.6 GB: 671B parameters of the main model and 14B of
    # the MTP layer, nearly all of them in one byte, plus one float32 scale per 16384
    assert layout_bytes(layout) == 688_574_839_360
    plan = planned(
        fake_hub, tmp_path, config, layout, ("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1")
    )
    print(json.dumps({k: v for k, v in plan.items() if k != "jobs"}, indent=1)[:3000])
    assert plan["download_bytes"] == 2 * layout_bytes(layout)
