"""LoRA adapters merged in on the fly (io.lora, io.lora_adapter), against closed forms worked
by hand: W' = W + scale * B @ A, scale = alpha / r (alpha / sqrt(r) with rsLoRA), transposed
for fan_in_fan_out; peft's names mapped onto the model's; every refusal one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from della_cli.errors import ModelError
from della_cli.io.lora import LoraModelReader
from della_cli.io.lora_adapter import LoraAdapter
from della_cli.io.lora_settings import LoraSettings
from della_cli.io.reader import ModelReader
from della_cli.model_ref import split_model_ref

W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # out 3 x in 2
A = torch.tensor([[1.0, 0.0]] * 4)  # r 4 x in 2
B = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 1.0]])  # out 3 x r 4; B @ A:
# [[1, 0], [1, 0], [2, 0]]
PROJ = "layers.0.proj"


def model_folder(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def adapter_folder(folder: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    settings = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    return folder


def factors(module: str = f"model.{PROJ}", a=A, b=B) -> dict[str, torch.Tensor]:
    prefix = f"base_model.model.{module}"
    return {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}


def merged(tmp_path: Path, model: dict, adapter: dict, **config) -> LoraModelReader:
    reader = ModelReader(model_folder(tmp_path / "model", model), "model")
    return LoraModelReader(
        reader, LoraAdapter(adapter_folder(tmp_path / "adapter", adapter, **config), "a"), "m+a"
    )


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, [[2, 2], [4, 4], [7, 6]]),  # alpha 4 / r 4 = 1
        ({"lora_alpha": 8}, [[3, 2], [5, 4], [9, 6]]),  # 8 / 4 = 2
        ({"use_rslora": True}, [[3, 2], [5, 4], [9, 6]]),  # 4 / sqrt(4) = 2
        ({"rank_pattern": {"proj": 4}, "alpha_pattern": {"layers.0.proj": 12}, "r": 8},
         [[4, 2], [6, 4], [11, 6]]),  # the patterns win: 12 / 4 = 3
    ],
)  # fmt: skip
def test_closed_form(tmp_path, config, expected):
    reader = merged(tmp_path, {f"model.{PROJ}.weight": W}, factors(), **config)
    name = f"model.{PROJ}.weight"
    assert reader.computes(name)
    np.testing.assert_array_equal(reader.read(name), np.array(expected, dtype=np.float32))
    np.testing.assert_array_equal(reader.read_rows(name, 1, 3), np.array(expected[1:3]))


def test_fan_in_fan_out_takes_the_product_transposed(tmp_path):
    stored = W.T.contiguous()  # GPT-2's Conv1D: in 2 x out 3
    reader = merged(tmp_path, {f"model.{PROJ}.weight": stored}, factors(), fan_in_fan_out=True)
    expected = np.array([[2, 4, 7], [2, 4, 6]], dtype=np.float32)
    np.testing.assert_array_equal(reader.read(f"model.{PROJ}.weight"), expected)
    np.testing.assert_array_equal(reader.read_rows(f"model.{PROJ}.weight", 1, 2), expected[1:])


def test_embedding_lora_and_whole_tensors(tmp_path):
    """An embedding's A is r x vocabulary and B width x r; a saved lm_head replaces the
    model's; untouched tensors are read as stored, in their own dtype."""
    embedding = torch.arange(6.0).reshape(3, 2)  # vocabulary 3 x width 2
    a = torch.tensor([[1.0, 0.0, 2.0]])  # r 1 x vocabulary 3
    b = torch.tensor([[1.0], [10.0]])  # width 2 x r 1
    head = torch.full((3, 2), 7.0)
    norm = torch.ones(2, dtype=torch.bfloat16)
    adapter = {
        "base_model.model.model.embed_tokens.lora_embedding_A": a,
        "base_model.model.model.embed_tokens.lora_embedding_B": b,
        "base_model.model.lm_head.weight": head,
    }
    model = {"model.embed_tokens.weight": embedding, "lm_head.weight": W, "model.norm.weight": norm}
    reader = merged(tmp_path, model, adapter, r=1, lora_alpha=2)
    expected = embedding.numpy() + 2 * (b @ a).T.numpy()  # row t gains 2 * A[0, t] * B[:, 0]
    np.testing.assert_array_equal(reader.read("model.embed_tokens.weight"), expected)
    np.testing.assert_array_equal(reader.read_rows("model.embed_tokens.weight", 2, 3), expected[2:])
    np.testing.assert_array_equal(reader.read("lm_head.weight"), head.numpy())
    assert not reader.computes("model.norm.weight")
    assert reader.read("model.norm.weight").dtype.name == "bfloat16"


def test_bfloat16_model_is_widened_to_float32(tmp_path):
    reader = merged(tmp_path, {f"model.{PROJ}.weight": W.bfloat16()}, factors(a=A.bfloat16()))
    rows = reader.read_rows(f"model.{PROJ}.weight", 0, 3)
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, [[2, 2], [4, 4], [7, 6]])


@pytest.mark.parametrize(
    "module",
    [
        PROJ,  # trained on the bare decoder: no "model." before the layers
        "model.model.layers.0.proj",  # one wrapper more
    ],
)
def test_names_map_onto_the_model(tmp_path, module):
    reader = merged(tmp_path, {f"model.{PROJ}.weight": W}, factors(module))
    assert list(reader.patches) == [f"model.{PROJ}.weight"]


def test_rank_and_scale_match_patterns_as_peft_does():
    settings = LoraSettings(8, 16.0, False, False, {"v_proj": 2}, {"layers.0.q_proj": 4.0}, ())
    assert settings.rank_and_scale("model.layers.0.v_proj") == (2, 8.0)
    assert settings.rank_and_scale("model.layers.0.q_proj") == (8, 0.5)
    assert settings.rank_and_scale("model.layers.10.q_proj") == (8, 2.0)


@pytest.mark.parametrize(
    ("adapter", "config", "fragment"),
    [
        (factors("model.layers.0.gone"), {}, "'base_model.model.model.layers.0.gone.lora_A"),
        (factors(b=B[:, :2].contiguous()), {}, "has shape (3, 2) but 'model.layers.0.proj.weight'"),
        (factors(a=A[:, :1].contiguous()), {}, "needs (4, 2)"),
        (factors(), {"use_dora": True, "fan_in_fan_out": True}, "DoRA on weights stored trans"),
        (factors(), {"peft_type": "IA3"}, "peft_type is 'IA3'; della merges LoRA adapters"),
        (factors(), {"r": 0}, "r must be a positive integer"),
        ({**factors(), "base_model.model.model.layers.0.proj.lora_magnitude_vector": W[0]}, {},
         "is a DoRA magnitude but adapter_config.json does not set use_dora"),
        ({"base_model.model.model.layers.0.proj.lora_A.weight": A}, {}, "no matching lora_B"),
        (factors("model.layers.0.norm"), {"fan_in_fan_out": True}, "only LoRA on 2-D weights"),
    ],
)  # fmt: skip
def test_refusals_name_the_problem(tmp_path, adapter, config, fragment):
    model = {f"model.{PROJ}.weight": W, "model.layers.0.norm.weight": W[0].clone()}
    with pytest.raises(ModelError) as caught:
        merged(tmp_path, model, adapter, **config)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_a_folder_without_adapter_config_is_refused(tmp_path):
    folder = model_folder(tmp_path / "adapter", factors())
    with pytest.raises(ModelError, match=r"no adapter_config.json in .*; an adapter is a PEFT"):
        LoraAdapter(folder, "a")


@pytest.mark.parametrize(
    ("ref", "parts"),
    [("org/m", ("org/m",)), ("org/m@v1+./lora", ("org/m@v1", "./lora")), ("a+b", ("a", "b"))],
)
def test_model_refs_split_at_their_plus(ref, parts):
    assert split_model_ref(ref).parts == parts


@pytest.mark.parametrize(("ref", "fragment"), [("a+b+c", r"has 2 '\+'"), ("a+", "needs a model")])
def test_malformed_model_refs_are_refused(ref, fragment):
    with pytest.raises(ValueError, match=fragment):
        split_model_ref(ref)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_the_product_in_pieces_equals_it_whole(tmp_path, monkeypatch, fan_in_fan_out):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(7, 5, generator=generator)
    out_features, in_features = (5, 7) if fan_in_fan_out else (7, 5)
    a = torch.randn(3, in_features, generator=generator)
    b = torch.randn(out_features, 3, generator=generator)
    config = {"r": 3, "lora_alpha": 6, "fan_in_fan_out": fan_in_fan_out}
    reader = merged(tmp_path, {f"model.{PROJ}.weight": weight}, factors(a=a, b=b), **config)
    product = b @ a
    expected = weight + 2 * (product.T if fan_in_fan_out else product)
    monkeypatch.setattr("della_cli.io.lora.DELTA_ELEMENTS", 10)  # two rows at a time
    rows = reader.read_rows(f"model.{PROJ}.weight", 1, 6)
    torch.testing.assert_close(torch.from_numpy(rows), expected[1:6], rtol=0, atol=1e-6)


def test_lora_bias_is_added_scaled(tmp_path):
    bias = torch.tensor([1.0, 1.0, 1.0])
    adapter = {**factors(), "base_model.model.model.layers.0.proj.lora_B.bias": torch.arange(3.0)}
    model = {f"model.{PROJ}.weight": W, f"model.{PROJ}.bias": bias}
    reader = merged(tmp_path, model, adapter, lora_alpha=8, lora_bias=True)  # scale 2
    np.testing.assert_array_equal(reader.read(f"model.{PROJ}.bias"), [1, 3, 5])
    np.testing.assert_array_equal(reader.read_rows(f"model.{PROJ}.bias", 0, 1), [[1, 3, 5]])
    np.testing.assert_array_equal(reader.read(f"model.{PROJ}.weight"), [[3, 2], [5, 4], [9, 6]])
