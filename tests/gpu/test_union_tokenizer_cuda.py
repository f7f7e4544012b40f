"""A union tokenizer merged on CUDA against the same merge on the CPU (skipped without a CUDA
device): the re-indexed rows reach the torch backend as they reach the CPU kernels, so DELLA's
integer-hash draws give the same bytes on both."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from vocabularies import with_added_tokens

from della_cli.api import MergeOptions, run_merge

pytestmark = pytest.mark.gpu
CHATML = (("<|im_start|>", True), ("<|im_end|>", True))


def test_a_union_merges_on_cuda_as_on_the_cpu(model_zoo, write_recipe, tmp_path):
    chat = with_added_tokens(model_zoo("llama", expert=1), tmp_path / "chat", CHATML)
    recipe = write_recipe(
        {
            "merge_method": "della",
            "base_model": str(model_zoo("llama")),
            "models": [
                {"model": str(chat)},
                {"model": str(model_zoo("llama", expert=2)), "parameters": {"weight": 0.5}},
            ],
            "parameters": {"density": 0.7, "epsilon": 0.07},
            "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
            "out_dtype": "float32",
            "seed": 3,
        }
    )
    run_merge(recipe, tmp_path / "cpu", MergeOptions(device="cpu"))
    run_merge(recipe, tmp_path / "cuda", MergeOptions(device="cuda"))
    cpu, cuda = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "cuda"))
    assert cpu.keys() == cuda.keys() and cpu["lm_head.weight"].shape == (104, 32)
    for name, expected in cpu.items():
        assert torch.equal(cuda[name].view(torch.int32), expected.view(torch.int32)), name
