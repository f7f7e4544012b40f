"""PEFT LoRA adapters written by hand, in peft's layout, for tests that need no peft.

``write_adapter`` saves ``adapter_config.json`` and ``adapter_model.safetensors`` as peft's
``save_pretrained`` does (tensor names ``base_model.model.<module>.lora_A.weight``), with A and
B drawn from a seeded generator (B non-zero, unlike a freshly initialised adapter), and returns
the factors so that a test can compute the merged weights in closed form.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PREFIX = "base_model.model."


def model_shapes(model: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(model / "model.safetensors"), "pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118 (a safe_open handle)


def write_adapter(
    folder: Path,
    model: Path,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    r: int = 4,
    alpha: float = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **config: object,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """An adapter of ``model`` on every 2-D weight whose module ends with one of ``targets``;
    returns (A, B) by module name. ``config``: more adapter_config.json keys."""
    generator = torch.Generator().manual_seed(seed)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    factors, tensors = {}, {}
    for name, shape in sorted(model_shapes(model).items()):
        module = name.removesuffix(".weight")
        if len(shape) != 2 or not module.endswith(targets):
            continue
        out_features, in_features = reversed(shape) if fan_in_fan_out else shape
        a = (torch.randn(r, in_features, generator=generator) * 0.3).to(dtype)
        b = (torch.randn(out_features, r, generator=generator) * 0.3).to(dtype)
        factors[module] = (a, b)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    settings = {
        "peft_type": "LORA",
        "base_model_name_or_path": str(model),
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": "CAUSAL_LM",
        **config,
    }
    (folder / "adapter_config.json").write_text(json.dumps(settings, indent=2))
    return factors
