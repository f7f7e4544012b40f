"""``model+adapter`` experts end to end: merged against the closed form, reloaded and run by
transformers, planned (adapter shown, nothing downloaded), resumed only into the same
adapter's merge, refused in one line, and read from the (fake) Hub at pinned commits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub
from killed_merges import kill_after, make_model
from lora_factory import write_adapter
from safetensors.torch import load_file
from typer.testing import CliRunner, Result

from della_cli.api import MergeOptions, run_merge
from della_cli.cli import app

runner = CliRunner()
WEIGHT = 0.6


def invoke(*args: object) -> Result:
    return runner.invoke(app, [str(arg) for arg in args])


def one_line_error(result: Result, fragment: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]


def recipe(base: str, lora_expert: str, other: str, method: str = "task_arithmetic") -> dict:
    return {
        "merge_method": method,
        "base_model": base,
        "models": [
            {"model": lora_expert, "parameters": {"weight": WEIGHT}},
            {"model": other, "parameters": {"weight": 0.0}},
        ],
    }


@pytest.fixture(scope="module")
def adapter(model_zoo, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    factors = write_adapter(folder, model_zoo("llama"), ("q_proj", "down_proj"), r=4, alpha=8)
    return folder, factors


def test_merge_equals_the_closed_form_and_transformers_runs_it(
    model_zoo, adapter, write_recipe, tmp_path
):
    base, (folder, factors) = model_zoo("llama"), adapter
    path = write_recipe(recipe(str(base), f"{base}+{folder}", str(model_zoo("llama", expert=1))))
    out = tmp_path / "out"
    report = run_merge(path, out, MergeOptions(device="cpu", progress=False))
    merged, original = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    for name, tensor in original.items():
        module = name.removesuffix(".weight")
        expected = tensor
        if module in factors:
            a, b = factors[module]
            expected = tensor + WEIGHT * (8 / 4) * (b @ a)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=2e-6)
    assert len(factors) == 4 and report.tensors == len(original)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 96) and torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert f"model: {base.name}\n  role: model\n  source: local folder\n  adapter:" in card
    assert "| local folder + adapter local folder |" in card


def test_plan_shows_the_adapter_and_computed_tensors_skip_the_streamed_reader(
    model_zoo, adapter, write_recipe
):
    base, (folder, _) = model_zoo("llama"), adapter
    path = write_recipe(recipe(str(base), f"{base}+{folder}", str(model_zoo("llama", expert=1))))
    result = invoke("plan", path)
    assert result.exit_code == 0, result.output
    assert f"{base}+{folder}: LoRA adapter, r 4, alpha 8, targets q_proj, down_proj; 8 tensors" in (
        result.stdout
    )
    lines = result.stdout.splitlines()
    assert any("q_proj.weight (2)  [cpu/weighted_sum]" in line for line in lines)
    assert any("k_proj.weight (2)  [cpu/streamed_sum]" in line for line in lines)
    report = json.loads(invoke("plan", path, "--json").stdout)
    assert report["adapters"][f"{base}+{folder}"]["target_modules"] == ["q_proj", "down_proj"]


def test_killed_merge_resumes_to_the_same_bytes_unless_the_adapter_changed(
    write_recipe, tmp_path, monkeypatch
):
    base = make_model(tmp_path / "base", 0)
    adapter = tmp_path / "adapter"
    write_adapter(adapter, base, ("layers.3", "layers.7", "layers.10"), r=8, alpha=16)
    path = write_recipe(
        {
            "merge_method": "della",
            "base_model": str(base),
            "models": [
                {"model": f"{base}+{adapter}"},
                {"model": str(make_model(tmp_path / "e", 2))},
            ],
            "parameters": {"density": 0.6, "epsilon": 0.1},
            "seed": 5,
        }
    )
    options = MergeOptions(out_shard_bytes=600_000, progress=False)
    reference = tmp_path / "uninterrupted"
    run_merge(path, reference, options)
    out = tmp_path / "merged"
    kill_after(7, path, out, options, monkeypatch)
    resumed = MergeOptions(out_shard_bytes=600_000, progress=False, resume=True)
    assert run_merge(path, out, resumed).resumed_shards > 0
    assert shard_bytes(out) == shard_bytes(reference)

    again = tmp_path / "again"
    kill_after(7, path, again, options, monkeypatch)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 4}))
    warnings: list[str] = []
    report = run_merge(path, again, resumed, on_warning=warnings.append)
    assert report.resumed_shards == 0
    assert any("different recipe, seed or inputs" in w for w in warnings)
    assert shard_bytes(again) != shard_bytes(reference)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors*"))}


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        ("a+b+c", "models.0.model: 'a+b+c' has 2 '+'"),
        ("missing", "models.0.model (adapter): model folder 'missing' does not exist"),
        ("no-config", "no adapter_config.json in"),
        ("dora", "DoRA on weights stored transposed (use_dora with fan_in_fan_out), whose norms"),
        ("ia3", "adapter_config.json: peft_type is 'IA3'; della merges LoRA adapters"),
        ("transposed", "has shape (4, 64) but 'model.layers.0.mlp.down_proj.weight' of shape"),
    ],
)
def test_bad_adapters_are_refused_in_one_line(
    edit, fragment, model_zoo, write_recipe, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    base = model_zoo("llama")
    folder = tmp_path / "adapter"
    if edit == "no-config":
        write_adapter(folder, base)
        (folder / "adapter_config.json").unlink()
    elif edit in ("dora", "ia3"):
        write_adapter(
            folder,
            base,
            **(
                {"use_dora": True, "fan_in_fan_out": True}
                if edit == "dora"
                else {"peft_type": "IA3"}
            ),
        )
    elif edit == "transposed":  # an adapter whose config says its weights are stored (in, out)
        write_adapter(folder, base, ("down_proj",))
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    ref = "a+b+c" if edit == "a+b+c" else f"{base}+{edit if edit == 'missing' else folder}"
    path = write_recipe(recipe(str(base), ref, str(model_zoo("llama", expert=1))))
    one_line_error(invoke("plan", path), fragment)
    one_line_error(invoke("merge", path, tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("on_hub", [True, False], ids=["hub-model", "local-model"])
def test_hub_adapter_is_pinned_planned_from_headers_and_merged_as_the_local_one(
    on_hub, fake_hub: FakeHub, model_zoo, adapter, write_recipe, tmp_path
):
    base, (folder, _) = model_zoo("llama"), adapter
    other = model_zoo("llama", expert=1)
    fake_hub.add_model("org/base", base)
    commit = fake_hub.add_model("org/lora", folder, tag="v1")
    model = "org/base" if on_hub else str(base)
    path = write_recipe(recipe(str(base), f"{model}+org/lora@v1", str(other)))
    result = invoke("plan", path)
    assert result.exit_code == 0, result.output
    assert f"org/lora@v1: commit {commit}" in result.stdout
    assert f"{model}+org/lora@v1: LoRA adapter, r 4, alpha 8" in result.stdout
    served = [r for r in fake_hub.requests if r.path.endswith(".safetensors") and r.served_bytes]
    assert served and all(r.range for r in served), "headers only"
    report = json.loads(invoke("plan", path, "--json").stdout)
    weights = [folder / "adapter_model.safetensors"] + [base / "model.safetensors"] * on_hub
    assert report["download_bytes"] == sum(path.stat().st_size for path in weights)

    out = tmp_path / "hub-out"
    report = run_merge(path, out, MergeOptions(device="cpu", progress=False))
    assert report.inputs["org/lora@v1"] == commit
    local = write_recipe(recipe(str(base), f"{base}+{folder}", str(other)), "local.yaml")
    run_merge(local, tmp_path / "local-out", MergeOptions(device="cpu", progress=False))
    ours = (out / "model.safetensors").read_bytes()
    assert ours == (tmp_path / "local-out" / "model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert f"  adapter:\n    model: org/lora\n    revision: v1\n    commit: {commit}\n" in card
