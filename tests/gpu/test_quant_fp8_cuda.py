"""Issue #19 on a CUDA device (skipped without one): an FP8 base merged on CUDA gives the
CPU's bytes, and transformers' own FP8 kernels load the FP8 output della writes and run it,
close to the same merge dequantized (transformers needs a GPU, and accelerate, for those)."""

from __future__ import annotations

import json

import pytest
import torch
from quant_fixtures import quantize
from safetensors.torch import load_file

from della_cli.api import MergeOptions, run_merge
from della_cli.tiny import make_base, make_expert, random_delta

pytestmark = pytest.mark.gpu


@pytest.fixture
def fp8_recipe(tmp_path):
    plain = make_base(tmp_path / "plain", "llama", dtype=torch.bfloat16)
    base = quantize(plain, tmp_path / "base", "fp8", block=(16, 16))
    experts = [make_expert(plain, tmp_path / f"e{i}", random_delta(i)) for i in (1, 2)]

    def write(out_dtype: str, method: str = "della", density: float = 0.7):
        recipe = tmp_path / f"{out_dtype}.yaml"
        models = [
            {"model": str(e), "parameters": {"weight": 0.5, "density": density}} for e in experts
        ]
        body = {
            "merge_method": method,
            "base_model": str(base),
            "models": models,
            "parameters": {"epsilon": 0.1},
            "seed": 7,
            "out_dtype": out_dtype,
        }
        recipe.write_text(json.dumps(body))
        return recipe

    return write


def test_an_fp8_base_merges_on_cuda_as_on_the_cpu(fp8_recipe, tmp_path):
    recipe = fp8_recipe("bfloat16")
    run_merge(recipe, tmp_path / "cpu", MergeOptions(device="cpu"))
    run_merge(recipe, tmp_path / "cuda", MergeOptions(device="cuda"))
    cpu, cuda = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "cuda"))
    assert cpu.keys() == cuda.keys()
    for name in cpu:  # the random draws are integer hashes: the same bytes on both devices
        torch.testing.assert_close(cuda[name], cpu[name], rtol=0, atol=0)


def test_transformers_runs_the_fp8_output_della_writes(fp8_recipe, tmp_path):
    pytest.importorskip("accelerate")
    import transformers

    for out_dtype in ("fp8", "bfloat16"):
        run_merge(fp8_recipe(out_dtype), tmp_path / out_dtype, MergeOptions(device="cuda"))
    fp8 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", device_map="cuda")
    assert type(fp8.model.layers[0].mlp.down_proj).__name__ == "FP8Linear"
    plain = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "bfloat16", device_map="cuda"
    )
    tokens = torch.tensor([[1, 5, 9, 13, 17]], device="cuda")
    with torch.no_grad():
        ours, reference = fp8(tokens).logits.float(), plain(tokens).logits.float()
    assert torch.isfinite(ours).all()
    # FP8 weights (3 mantissa bits) and FP8 activations: logits within a few percent
    assert (ours - reference).norm() / reference.norm() < 0.1
