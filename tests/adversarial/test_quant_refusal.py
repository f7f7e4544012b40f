"""Issue #14, finding 13: a quantized checkpoint must be refused, not merged silently wrong.

An FP8 base with DeepSeek-style block scales (``weight_scale_inv``) was merged from its raw
FP8 values without the scales, and the scale tensors were copied into the output as if they
were weights. Until della supports a format, the plan refuses it with one line naming the
format, the model and a first tensor: from ``quantization_config`` in config.json and from
the tensors themselves (their names, or an FP8 dtype). FP8 and MXFP4 checkpoints that
config.json declares are read since issue #19 (tests/unit/test_quant_formats.py); without
that declaration their tensors are still refused here."""

from __future__ import annotations

import numpy as np
import pytest
from hostile_files import TENSORS, della, entry, model_folder, safetensors_bytes

F8 = np.frombuffer(bytes(range(0, 64, 8)), dtype=np.uint8)  # 8 FP8 E4M3 values


def raw_tensors(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    header, data = {}, b""
    for name, (dtype, shape, payload) in tensors.items():
        header[name] = entry(dtype, shape, len(data), len(data) + len(payload))
        data += payload
    return safetensors_bytes(header, data)


def f32(values: np.ndarray) -> tuple[str, list[int], bytes]:
    return ("F32", list(values.shape), values.astype(np.float32).tobytes())


W = "model.layers.0.mlp.down_proj"
# format: (config.json, tensors, what the message must name)
CHECKPOINTS = {
    "fp8 block scales, no quantization_config": (
        {},
        {f"{W}.weight": ("BF16", [2, 4], bytes(16)), f"{W}.weight_scale_inv": f32(np.ones((1, 1)))},
        ("fp8", f"{W}.weight_scale_inv"),
    ),
    "an fp8 tensor alone": (
        {},
        {f"{W}.weight": ("F8_E5M2", [2, 4], F8.tobytes())},
        ("fp8", f"{W}.weight"),
    ),
    "gptq": (
        {"quantization_config": {"quant_method": "gptq", "bits": 4}},
        {
            f"{W}.qweight": ("I32", [2], bytes(8)),
            f"{W}.qzeros": ("I32", [1], bytes(4)),
            f"{W}.scales": ("F16", [2], bytes(4)),
        },
        ("gptq", f"{W}.qweight"),
    ),
    "awq, tensors only": (
        {},
        {f"{W}.qweight": ("I32", [2], bytes(8)), f"{W}.scales": ("F16", [2], bytes(4))},
        ("gptq or awq", f"{W}.qweight"),
    ),
    "bitsandbytes 4-bit": (
        {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}},
        {
            f"{W}.weight": ("U8", [4, 1], bytes(4)),
            f"{W}.weight.absmax": f32(np.ones(1)),
            f"{W}.weight.quant_map": f32(np.ones(4)),
        },
        ("bitsandbytes", f"{W}.weight.absmax"),
    ),
}


def recipe_for(tmp_path, base, expert):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {expert}\n"
    )
    return recipe


@pytest.mark.parametrize(
    ("config", "tensors", "named"), CHECKPOINTS.values(), ids=CHECKPOINTS.keys()
)
def test_a_quantized_base_is_refused_naming_format_model_and_tensor(
    tmp_path, config, tensors, named
):
    content = raw_tensors(tensors)
    base = model_folder(tmp_path / "base", weights=content, config={"model_type": "toy", **config})
    expert = model_folder(tmp_path / "expert", weights=content, config={"model_type": "toy"})
    for command in (
        ["plan", recipe_for(tmp_path, base, expert)],
        ["merge", tmp_path / "recipe.yaml", tmp_path / "out"],
    ):
        result = della(*command)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        form, tensor = named
        assert f"'{base}' is quantized ({form}" in line and f"'{tensor}'" in line, line
    assert not (tmp_path / "out").exists()


def test_a_quantized_expert_is_refused_too(tmp_path):
    base = model_folder(tmp_path / "base")
    config = CHECKPOINTS["gptq"][0]
    quantized = {
        name: ("F8_E4M3", list(values.shape), bytes(values.size))
        for name, values in TENSORS.items()
    }
    expert = model_folder(
        tmp_path / "expert", weights=raw_tensors(quantized), config={"model_type": "toy", **config}
    )
    result = della("plan", recipe_for(tmp_path, base, expert))
    assert result.returncode == 2, result.stderr
    assert f"'{expert}' is quantized (gptq" in result.stderr


def test_an_unknown_quantized_dtype_says_it_is_quantized(tmp_path):
    # MXFP4 scales as stored by newer writers: a dtype della cannot even read.
    content = safetensors_bytes({"w": entry("F8_E8M0", [2], 0, 2)}, bytes(2))
    base = model_folder(tmp_path / "base", weights=content)
    result = della("plan", recipe_for(tmp_path, base, model_folder(tmp_path / "expert")))
    assert result.returncode == 2, result.stderr
    assert "dtype 'F8_E8M0'" in result.stderr and "a quantized format" in result.stderr
