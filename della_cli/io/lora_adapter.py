"""A PEFT LoRA adapter folder: its settings, its tensors, and the model tensor each one changes.

A LoRA adapter (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685) stores, for each adapted module, two small matrices A (r x in) and B
(out x r); merging it into the model replaces the module's weight W (out x in) by

    W' = W + scale * B @ A,   scale = lora_alpha / r   (lora_alpha / sqrt(r) with rsLoRA,
                                                         Kalajdzievski, 2023, arXiv:2312.03732)

as ``peft``'s ``merge_and_unload`` does, with r and lora_alpha per module where the config's
``rank_pattern`` and ``alpha_pattern`` name it. A weight stored transposed (GPT-2's Conv1D,
``fan_in_fan_out``) and an embedding's LoRA (``lora_embedding_A``: r x vocabulary,
``lora_embedding_B``: width x r) take (B @ A) transposed. A DoRA adapter (Liu et al., 2024,
"DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353) also stores a magnitude m
(``lora_magnitude_vector``, one value per output row) that rescales each row of W + scale * B @ A
to norm m (``io.lora``); on an embedding or a weight stored transposed those norms run across
stored rows, which della does not compute, so it refuses them. Tensors that are no LoRA factor
(``modules_to_save``, an embedding's ``base_layer`` saved whole) replace the model's tensor of
that name, as peft loads them. Everything here is read from headers and the small JSON config,
so a plan can check every name and shape before any weight is downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from della_cli.errors import ModelError
from della_cli.io.lora_settings import CONFIG_NAME, WEIGHTS_NAME, load_settings
from della_cli.io.reader import ModelReader, TensorInfo

_PREFIX = "base_model.model."  # what peft puts before the model's own module names
_PAIRS = (("A", "B"), ("embedding_A", "embedding_B"))  # the roles of the two factors
# Adapter tensor names: (pattern, role). Roles: A and B are the factors, "bias" lora_B's bias
# (lora_bias), "magnitude" DoRA's magnitude vector, "replace" a whole tensor of the model.
_ROLES = [
    (re.compile(r"^(?P<module>.+)\.lora_A(?:\.[^.]+)?\.weight$"), "A"),
    (re.compile(r"^(?P<module>.+)\.lora_B(?:\.[^.]+)?\.weight$"), "B"),
    (re.compile(r"^(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias$"), "bias"),
    (re.compile(r"^(?P<module>.+)\.lora_embedding_A(?:\.[^.]+)?$"), "embedding_A"),
    (re.compile(r"^(?P<module>.+)\.lora_embedding_B(?:\.[^.]+)?$"), "embedding_B"),
    (re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"), "magnitude"),
    (
        re.compile(r"^(?P<module>.+)\.(?:base_layer|modules_to_save\.[^.]+)\.(?P<leaf>[^.]+)$"),
        "whole",
    ),
]


@dataclass(frozen=True)
class Patch:
    """How one model tensor is changed: its rows taken from ``replacement`` (an adapter
    tensor) instead of the model, ``bias`` (lora_B's bias) and ``scale * B @ A`` added,
    (B @ A) transposed where ``transposed``, then each row scaled to the norm that DoRA's
    ``magnitude`` vector gives it."""

    target: str
    scale: float = 0.0
    a: str | None = None
    b: str | None = None
    transposed: bool = False
    bias: str | None = None
    replacement: str | None = None
    magnitude: str | None = None


class LoraAdapter:
    """An adapter folder (local, or a Hub snapshot whose weights' header was read remotely)."""

    def __init__(
        self,
        folder: Path,
        label: str,
        root: Path | None = None,
        headers: dict[str, tuple[bytes, int]] | None = None,
    ):
        self.folder, self.label, self.root = folder, label, root or folder
        self.settings = load_settings(folder, label, self.root)
        if headers is None and not (folder / WEIGHTS_NAME).is_file():
            pickled = (folder / "adapter_model.bin").is_file()
            raise ModelError(
                f"adapter '{label}': no {WEIGHTS_NAME} in {folder}"
                + ("; it has only adapter_model.bin, convert it to safetensors" if pickled else "")
            )
        self.weights = ModelReader(folder, label, self.root, headers)

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.weights.tensors

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def patches(self, model: dict[str, TensorInfo]) -> dict[str, Patch]:
        """Each changed tensor of ``model`` (its headers) and how; every adapter tensor must
        change one, with the shapes its role needs, else a ModelError naming it."""
        parts: dict[str, dict[str, str]] = {}  # model tensor -> role -> adapter tensor
        modules: dict[str, str] = {}  # model tensor -> its module's name
        for name, info in self.tensors.items():
            if not info.is_floating:
                raise ModelError(
                    f"adapter '{self.label}': tensor '{name}' is {info.dtype}, not floating"
                )
            role, module, target = _role(name.removeprefix(_PREFIX))
            if role == "magnitude" and not self.settings.dora:
                raise ModelError(
                    f"adapter '{self.label}': '{name}' is a DoRA magnitude but "
                    f"{CONFIG_NAME} does not set use_dora"
                )
            if role == "bias" and self.settings.dora:
                raise ModelError(
                    f"adapter '{self.label}': DoRA with a bias on lora_B ('{name}'), which peft "
                    "refuses too, is not supported"
                )
            found = self.model_tensor(name, target, model)
            own = parts.setdefault(found, {})
            if role in own:
                raise ModelError(
                    f"adapter '{self.label}': '{name}' and '{own[role]}' both give "
                    f"{role} of '{found}'"
                )
            own[role] = name
            modules[found] = module  # as peft named it, which its patterns match
        return {
            target: self.patch(target, roles, modules[target], model[target])
            for target, roles in parts.items()
        }

    def model_tensor(self, name: str, target: str, model: dict[str, TensorInfo]) -> str:
        """The model tensor that adapter tensor ``name`` (aimed at ``target``) changes: the
        same name, or with a leading ``model.`` added or dropped (an adapter trained on the
        bare decoder), or the one model tensor whose name ends with it."""
        bare = target.removeprefix("model.")
        for candidate in (target, "model." + target, bare):
            if candidate in model:
                return candidate
        ending = [tensor for tensor in model if tensor.endswith("." + bare)]
        if len(ending) == 1:
            return ending[0]
        raise ModelError(
            f"adapter '{self.label}': tensor '{name}' changes '{target}', which the model "
            "lacks; the adapter was trained on another architecture"
        )

    def patch(self, target: str, roles: dict[str, str], module: str, info: TensorInfo) -> Patch:
        """The patch of ``target`` from its adapter tensors, shapes checked."""
        r, scale = self.settings.rank_and_scale(module)
        pairs = [pair for pair in _PAIRS if pair[0] in roles or pair[1] in roles]
        if len(pairs) > 1:
            raise ModelError(
                f"adapter '{self.label}': '{target}' has both a linear and an embedding LoRA "
                f"('{roles['A'] if 'A' in roles else roles['B']}')"
            )
        a, b = (roles.get(pairs[0][0]), roles.get(pairs[0][1])) if pairs else (None, None)
        if (a is None) != (b is None):
            raise ModelError(
                f"adapter '{self.label}': '{a or b}' has no matching "
                f"{'lora_B' if b is None else 'lora_A'} for '{target}'"
            )
        replacement = roles.get("replace")
        if replacement is not None:
            self.check_shape(replacement, info.shape, target, info.shape)
        bias = roles.get("bias")
        if bias is not None:
            self.check_shape(bias, (info.shape[0],) if info.shape else (), target, info.shape)
        magnitude = roles.get("magnitude")
        if a is None:
            if magnitude is not None:
                raise ModelError(
                    f"adapter '{self.label}': DoRA magnitude '{magnitude}' has no lora_A and "
                    f"lora_B for '{target}'"
                )
            return Patch(target, scale, bias=bias, replacement=replacement)
        if len(info.shape) != 2:
            raise ModelError(
                f"adapter '{self.label}': '{a}' changes '{target}' of shape {info.shape}; "
                "only LoRA on 2-D weights (linear layers, embeddings) is supported"
            )
        transposed = "embedding_A" in roles or self.settings.fan_in_fan_out
        if "embedding_A" in roles and self.settings.dora:
            raise ModelError(
                f"adapter '{self.label}': DoRA on an embedding ('{a}'), whose norms run across "
                "stored rows, is not supported; merge the adapter into its model with peft first"
            )
        rows, columns = (info.shape[1], info.shape[0]) if transposed else info.shape
        self.check_shape(a, (r, columns), target, info.shape)
        self.check_shape(b, (rows, r), target, info.shape)
        if magnitude is not None:
            self.check_shape(magnitude, (rows,), target, info.shape)

        return Patch(target, scale, a, b, transposed, bias, replacement, magnitude)

    def check_shape(self, name: str, wanted: tuple, target: str, target_shape: tuple) -> None:
        shape = self.tensors[name].shape
        if tuple(shape) != tuple(wanted):
            raise ModelError(
                f"adapter '{self.label}': '{name}' has shape {tuple(shape)} but '{target}' of "
                f"shape {tuple(target_shape)} needs {tuple(wanted)}; the adapter does not fit "
                "this model"
            )

    def summary(self) -> dict:
        """What ``della plan`` shows of the adapter."""
        settings = self.settings
        targets = settings.target_modules
        return {
            "r": settings.r,
            "alpha": settings.alpha,
            "rslora": settings.rslora,
            "dora": settings.dora,
            "target_modules": targets if isinstance(targets, str) else list(targets),
            "rank_pattern": settings.rank_pattern,
            "alpha_pattern": settings.alpha_pattern,
            "tensors": len(self.tensors),
            "bytes": self.nbytes,
        }

    def close(self) -> None:
        self.weights.close()


def _role(name: str) -> tuple[str, str, str]:
    """(role, module, model tensor aimed at) of an adapter tensor name, prefix removed."""
    for pattern, role in _ROLES:
        match = pattern.match(name)
        if match is None:
            continue
        module = match["module"]
        if role == "whole":  # saved whole: replaces the model's tensor, as peft loads it
            return "replace", module, f"{module}.{match['leaf']}"
        if role == "bias":
            return role, module, f"{module}.bias"
        return role, module, f"{module}.weight"
    return "replace", name.rsplit(".", 1)[0], name
