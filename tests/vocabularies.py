"""Models whose vocabulary differs from the tiny base's, as fine-tunes that add tokens are."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from della_cli.tiny import save_tokenizer

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
