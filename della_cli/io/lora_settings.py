"""A LoRA adapter's ``adapter_config.json``: the settings that decide its merged weights.

peft writes the rank ``r``, ``lora_alpha``, whether the scale is rsLoRA's (``use_rslora``),
whether weights are stored transposed (``fan_in_fan_out``), and per-module ranks and alphas
(``rank_pattern``, ``alpha_pattern``, matched against module names as peft matches them), and
whether the adapter is DoRA (``use_dora``, its merge in ``io.lora``). Settings that change what
merging means and that della does not implement (DoRA on transposed weights, ...) are refused
here, with the reason, before any weight is read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from della_cli.errors import ModelError, shown
from della_cli.io.bounded import MAX_CONFIG_BYTES, load_json
from della_cli.io.reader import ensure_inside

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Config keys whose non-empty value changes what merging means; each refused with its reason.
_REFUSED = {
    "trainable_token_indices": "trainable token rows (trainable_token_indices) are",
    "target_parameters": "LoRA on raw parameters (target_parameters) is",
    "layer_replication": "layer replication (layer_replication) is",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is",
}
# Settings refused together with use_dora: DoRA normalises each row of the weight in its
# (out, in) layout, which della computes block by block only where stored rows are those rows.
_REFUSED_WITH_DORA = {
    "fan_in_fan_out": "DoRA on weights stored transposed (use_dora with fan_in_fan_out), whose "
    "norms run across stored rows, is",
    "lora_bias": "DoRA with a bias on lora_B (use_dora with lora_bias), which peft refuses too, is",
}


@dataclass(frozen=True)
class LoraSettings:
    """The parts of ``adapter_config.json`` that decide the merged weights."""

    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: tuple[str, ...] | str
    dora: bool = False

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """Module ``module``'s rank and scale, its patterns matched as peft matches them (a
        pattern names the module's whole name or its last dotted parts)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.alpha)
        return r, alpha / math.sqrt(r) if self.rslora else alpha / r


def _pattern_key(patterns: dict, module: str) -> str | None:
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue
    return None


def _refusal(key: str, dora: bool = False) -> str:
    reason = (_REFUSED_WITH_DORA if dora else _REFUSED)[key]
    return f"{reason} not supported; merge the adapter into its model with peft first"


def load_settings(folder: Path, label: str, root: Path | None = None) -> LoraSettings:
    """The settings of the adapter folder ``folder`` (``label`` as the recipe names it)."""
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise ModelError(f"adapter '{label}': {folder} is not a folder")
    if not path.is_file():
        raise ModelError(
            f"adapter '{label}': no {CONFIG_NAME} in {folder}; an adapter is a PEFT LoRA "
            f"folder with {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    ensure_inside(path, root or folder)
    return read_settings(path, load_json(path, MAX_CONFIG_BYTES, "a config"))


def read_settings(path: Path, config: object) -> LoraSettings:
    """The LoRA settings of an adapter config, refusing what della cannot merge."""
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ModelError(
            f"{path}: peft_type is {shown(kind)}; della merges LoRA adapters (peft_type LORA) only"
        )
    for key in _REFUSED:
        if config.get(key):
            raise ModelError(f"{path}: {_refusal(key)}")
    dora = config.get("use_dora") is True
    for key in _REFUSED_WITH_DORA:
        if dora and config.get(key):
            raise ModelError(f"{path}: {_refusal(key, dora=True)}")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not _positive(r, integer=True) or not _number(alpha):
        raise ModelError(
            f"{path}: r must be a positive integer and lora_alpha a number, got r={shown(r)}, "
            f"lora_alpha={shown(alpha)}"
        )
    ranks = config.get("rank_pattern") or {}
    alphas = config.get("alpha_pattern") or {}
    if not isinstance(ranks, dict) or not all(_positive(v, integer=True) for v in ranks.values()):
        raise ModelError(f"{path}: rank_pattern must map module names to positive integers")
    if not isinstance(alphas, dict) or not all(_number(v) for v in alphas.values()):
        raise ModelError(f"{path}: alpha_pattern must map module names to numbers")
    targets = config.get("target_modules") or ()
    return LoraSettings(
        r=r,
        alpha=float(alpha),
        rslora=config.get("use_rslora") is True,
        fan_in_fan_out=config.get("fan_in_fan_out") is True,
        rank_pattern=dict(ranks),
        alpha_pattern={key: float(value) for key, value in alphas.items()},
        target_modules=targets if isinstance(targets, str) else tuple(map(str, targets)),
        dora=dora,
    )


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: object, integer: bool = False) -> bool:
    whole = isinstance(value, int) or not integer
    return _number(value) and whole and value > 0
