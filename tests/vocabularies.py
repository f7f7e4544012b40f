"""Models whose vocabulary differs from the tiny base's, as fine-tunes that add tokens are."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from della_cli.tiny import save_tokenizer, word_level_tokenizer

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def with_vocabulary(source: Path, folder: Path, rows: int) -> Path:
    """A copy of ``source`` whose tokenizer and vocabulary tensors have ``rows`` tokens (new
    rows random, seeded; removed rows cut from the end), as a fine-tune that added or
    removed tokens would have."""
    tensors = load_model(source)
    generator = torch.Generator().manual_seed(rows)
    for name in VOCAB_TENSORS:
        tensor = tensors[name]
        extra = max(0, rows - tensor.shape[0])
        grown = torch.cat([tensor, torch.randn(extra, tensor.shape[1], generator=generator)])
        tensors[name] = grown[:rows].contiguous()
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    (folder / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    save_tokenizer(folder, rows)
    return folder


def save_words(folder: Path, words: list[str], added: tuple[tuple[str, bool], ...] = ()) -> Path:
    """A word-level tokenizer over ``words`` (ids in that order; the first four are the
    special tokens <pad>, <s>, </s>, <unk> as ``della_cli.tiny`` has them), then ``added``
    tokens (content, special) at the next ids, saved the transformers way."""
    from tokenizers import AddedToken

    tokenizer = word_level_tokenizer(words)
    for content, special in added:
        tokenizer.add_tokens([AddedToken(content, special=special, normalized=not special)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return folder


def with_added_tokens(
    source: Path, folder: Path, added: tuple[tuple[str, bool], ...], seed: int = 5
) -> Path:
    """A copy of ``source`` whose tokenizer adds ``added`` tokens (content, special) after its
    own, with a seeded random row for each in its vocabulary tensors and ``vocab_size`` grown
    to match, as a fine-tune that added ChatML tokens has."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(source, folder)
    words = list(
        dict(
            sorted(
                AutoTokenizer.from_pretrained(source).get_vocab().items(), key=lambda item: item[1]
            )
        )
    )
    save_words(folder, words, added)
    rows = len(words) + len(added)
    tensors = load_model(folder)
    generator = torch.Generator().manual_seed(seed)
    for name in VOCAB_TENSORS:
        tensor = tensors[name]
        extra = torch.randn(rows - tensor.shape[0], tensor.shape[1], generator=generator) * 0.02
        tensors[name] = torch.cat([tensor, extra]).contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
    return folder
