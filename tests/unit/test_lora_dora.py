"""DoRA adapters merged in on the fly (io.lora): each row of V = W + scale * B @ A rescaled to
the norm its magnitude m gives it, W'[i] = m[i] / ||V[i]|| * V[i], against values worked
by hand, the same in any split into row blocks; what is not row-wise refused in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from della_cli.errors import ModelError
from della_cli.io.lora import LoraModelReader
from della_cli.io.lora_adapter import LoraAdapter
from della_cli.io.reader import ModelReader

TARGET = "model.layers.0.proj.weight"
PREFIX = "base_model.model.model.layers.0.proj"
W = torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # out 3 x in 2
A = torch.tensor([[0.0, 1.0]])  # r 1 x in 2
B = torch.tensor([[4.0], [2.0], [0.0]])  # out 3 x r 1: W + B @ A = [[3, 4], [0, 2], [1, 1]]
M = torch.tensor([10.0, 1.0, 2.0])  # row norms 5, 2 and sqrt(2) become 10, 1 and 2
ROOT2 = math.sqrt(2)


def dora(a=A, b=B, m=M, module: str = PREFIX) -> dict[str, torch.Tensor]:
    return {
        f"{module}.lora_A.weight": a,
        f"{module}.lora_B.weight": b,
        f"{module}.lora_magnitude_vector": m,
    }


def merged(tmp_path: Path, model: dict, adapter: dict, **config) -> LoraModelReader:
    (tmp_path / "model").mkdir()
    save_file(model, str(tmp_path / "model" / "model.safetensors"))
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(adapter, str(folder / "adapter_model.safetensors"))
    settings = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "use_dora": True, **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    reader = ModelReader(tmp_path / "model", "model")
    return LoraModelReader(reader, LoraAdapter(folder, "a"), "m+a")


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (1, [[6, 8], [0, 1], [ROOT2, ROOT2]]),  # scale 1: rows [3, 4], [0, 2], [1, 1]
        # scale 1/2: rows [3, 2] (norm sqrt 13), [0, 1], [1, 1]
        (0.5, [[30 / math.sqrt(13), 20 / math.sqrt(13)], [0, 1], [ROOT2, ROOT2]]),
    ],
)
def test_rows_take_the_norms_of_the_magnitude(tmp_path, alpha, expected):
    reader = merged(tmp_path, {TARGET: W}, dora(), lora_alpha=alpha)
    assert reader.patches[TARGET].magnitude == f"{PREFIX}.lora_magnitude_vector"
    rows = reader.read(TARGET)
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows, expected, rtol=1e-6)
    np.testing.assert_allclose(reader.read_rows(TARGET, 1, 3), expected[1:], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), M.numpy(), rtol=1e-6)


def test_bias_is_left_as_the_model_has_it(tmp_path):
    """peft's DoRA merge rescales the weight only; the layer's bias is the model's."""
    bias = torch.tensor([1.0, 2.0, 3.0])
    reader = merged(tmp_path, {TARGET: W, "model.layers.0.proj.bias": bias}, dora())
    assert not reader.computes("model.layers.0.proj.bias")
    np.testing.assert_array_equal(reader.read("model.layers.0.proj.bias"), bias.numpy())


def test_blocks_of_rows_give_the_rows_of_the_whole(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(9, 6, generator=generator)
    a, b = torch.randn(2, 6, generator=generator), torch.randn(9, 2, generator=generator)
    m = torch.rand(9, generator=generator) + 0.5
    reader = merged(tmp_path, {TARGET: weight}, dora(a, b, m), r=2, lora_alpha=3)
    adapted = weight + 1.5 * b @ a
    expected = (m / torch.linalg.norm(adapted, dim=1))[:, None] * adapted  # peft's formula
    whole = reader.read(TARGET)
    torch.testing.assert_close(torch.from_numpy(whole), expected, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr("della_cli.io.lora.DELTA_ELEMENTS", 12)  # two rows at a time
    blocks = [reader.read_rows(TARGET, first, min(first + 4, 9)) for first in range(0, 9, 4)]
    np.testing.assert_array_equal(np.concatenate(blocks), whole)


EMBED = "base_model.model.model.embed_tokens"


@pytest.mark.parametrize(
    ("adapter", "config", "fragment"),
    [
        (dora(), {"fan_in_fan_out": True}, "DoRA on weights stored transposed (use_dora with"),
        (dora(), {"lora_bias": True}, "DoRA with a bias on lora_B (use_dora with lora_bias)"),
        ({**dora(), f"{PREFIX}.lora_B.bias": M.clone()}, {}, "DoRA with a bias on lora_B ('base_"),
        (dora(), {"use_dora": False}, "is a DoRA magnitude but adapter_config.json does not"),
        ({f"{EMBED}.lora_embedding_A": A, f"{EMBED}.lora_embedding_B": B,
          f"{EMBED}.lora_magnitude_vector": M[:2]}, {}, "DoRA on an embedding ('base_model"),
        ({f"{PREFIX}.lora_magnitude_vector": M}, {}, "has no lora_A and lora_B for"),
        (dora(m=M[:2]), {}, "lora_magnitude_vector' has shape (2,) but 'model.layers.0.proj"),
        (dora(module="base_model.model.model.layers.0.norm"), {}, "only LoRA on 2-D weights"),
    ],
)  # fmt: skip
def test_what_is_not_row_wise_is_refused(tmp_path, adapter, config, fragment):
    model = {
        TARGET: W,
        "model.embed_tokens.weight": W.T.contiguous(),
        "model.layers.0.norm.weight": M,
    }
    with pytest.raises(ModelError) as caught:
        merged(tmp_path, model, adapter, **config)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_the_plan_says_the_adapter_is_dora(tmp_path):
    from della_cli.plan_report import adapter_line

    reader = merged(tmp_path, {TARGET: W}, dora())
    line = adapter_line("m+a", reader.adapter.summary())
    assert line.startswith("m+a: DoRA adapter (each row rescaled to its magnitude), r 1, alpha 1")
    plain = {**reader.adapter.summary(), "dora": False}
    assert adapter_line("m+a", plain).startswith("m+a: LoRA adapter, r 1")
