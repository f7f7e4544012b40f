"""Tiny random-weight models for the built-in demo and the tests.

Real ``transformers`` architectures at toy sizes, saved with ``save_pretrained`` (so the files
are exactly what a user's models look like), plus a word-level tokenizer, and experts derived as
``base + known delta`` so that merge results can be checked in closed form.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

VOCAB_SIZE = 96
DEMO_DELTA_SCALE = 0.004  # the tiny models' weights have a spread of 0.02
# Decoder-only configs built from the shared toy sizes: name -> (config class, extra fields).
_DECODERS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", {"head_dim": 8}),
    "phi3": ("Phi3Config", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}
ARCHITECTURES = (*_DECODERS, "gpt2", "llava")
# Architectures whose model class is not a plain causal LM.
_AUTO_CLASSES = {"llava": "AutoModelForImageTextToText"}


def auto_class_name(architecture: str) -> str:
    """The transformers Auto class that loads ``architecture``."""
    return _AUTO_CLASSES.get(architecture, "AutoModelForCausalLM")


def tiny_config(
    architecture: str, vocab_size: int = VOCAB_SIZE, tie: bool | None = None, layers: int = 2
):
    """A transformers config of ``architecture`` small enough to build in milliseconds (two
    layers unless ``layers`` says otherwise)."""
    import transformers

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    decoder = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if architecture == "gpt2":
        config = transformers.GPT2Config(
            n_embd=32, n_layer=layers, n_head=4, n_positions=64, **common
        )
    elif architecture == "llava":  # a vision-language model: CLIP vision tower + Llama
        vision = transformers.CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
            projection_dim=16,
        )
        text = transformers.LlamaConfig(**decoder, **common)
        config = transformers.LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=vocab_size - 1
        )
    else:
        class_name, extra = _DECODERS[architecture]
        config = getattr(transformers, class_name)(**decoder, **extra, **common)
    if tie is not None:
        config.tie_word_embeddings = tie
    return config


def save_tokenizer(folder: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """A word-level tokenizer over ``vocab_size`` made-up words, saved the transformers way."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer = word_level_tokenizer(
        specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(folder)


def word_level_tokenizer(words: list[str]):
    """A fast tokenizer that splits on whitespace and maps each of ``words`` to its position
    (the first four being <pad>, <s>, </s> and <unk>, its special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def make_base(
    folder: Path,
    architecture: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    vocab_size: int = VOCAB_SIZE,
    tie: bool | None = None,
    layers: int = 2,
) -> Path:
    """Build and save a tiny random model of ``architecture`` with its tokenizer."""
    import transformers
    from transformers import GenerationConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = tiny_config(architecture, vocab_size, tie, layers)
    auto_class = getattr(transformers, auto_class_name(architecture))
    model = auto_class.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=[2], pad_token_id=0, max_new_tokens=8
    )
    model.save_pretrained(folder)
    save_tokenizer(folder, vocab_size)
    return folder


DeltaFunction = Callable[[str, torch.Tensor], torch.Tensor]


def random_delta(seed: int, scale: float = 0.02) -> DeltaFunction:
    """Deltas drawn from N(0, scale²), seeded per tensor name."""

    def delta(name: str, tensor: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)))
        return torch.randn(tensor.shape, generator=generator) * scale

    return delta


def make_expert(
    base: Path, folder: Path, delta: DeltaFunction, rename: dict[str, str] | None = None
) -> Path:
    """An expert = base + delta(name, tensor) on every floating tensor; metadata copied."""
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path in sorted(base.glob("*.safetensors")):
        for name, tensor in load_file(path).items():
            if tensor.is_floating_point():
                changed = tensor.to(torch.float32) + delta(name, tensor)
                tensor = changed.to(tensor.dtype)
            tensors[(rename or {}).get(name, name)] = tensor
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    for path in base.iterdir():
        if path.is_file() and not path.name.startswith("model") and path.suffix != ".safetensors":
            shutil.copy2(path, folder / path.name)
    return folder


def make_demo_models(root: Path, architecture: str = "llama") -> Path:
    """A base and two experts under ``root`` and a DELLA recipe that merges them. The recipe
    names the models relative to its own folder (``./base``), so it reads as a user would
    write it and still works from any working directory."""
    root.mkdir(parents=True, exist_ok=True)
    base = make_base(root / "base", architecture)
    # Deltas a fifth of the weights' spread, as a fine-tune's are small against its base
    # (``della inspect`` warns about experts whose task vectors are as large as the weights).
    make_expert(base, root / "expert-math", random_delta(1, DEMO_DELTA_SCALE))
    make_expert(base, root / "expert-code", random_delta(2, DEMO_DELTA_SCALE))
    recipe = {
        "merge_method": "della",
        "base_model": "./base",
        "models": [
            {"model": "./expert-math", "parameters": {"weight": 1.0}},
            {"model": "./expert-code", "parameters": {"weight": 1.0}},
        ],
        "parameters": {"density": 0.7, "epsilon": 0.07, "lambda": 1.1},
        "seed": 42,
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
