"""The non-weight files of the output: config, generation config and tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from della_cli.io.reader import ensure_inside

# Every file a Hugging Face tokenizer or processor may be made of, by name or pattern.
TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


GENERATION_PATTERNS = ("generation_config.json",)


def metadata_files(
    folder: Path,
    root: Path | None = None,
    patterns: tuple[str, ...] = (*GENERATION_PATTERNS, *TOKENIZER_PATTERNS),
) -> list[Path]:
    """The generation config and tokenizer files of a model folder (or those ``patterns``
    match); a file that resolves outside ``root`` (default: the folder) is refused rather
    than copied."""
    found: set[Path] = set()
    for pattern in patterns:
        found.update(p for p in folder.glob(pattern) if p.is_file())
    for path in found:
        ensure_inside(path, root or folder)
    return sorted(found)


def copy_metadata(
    source: Path,
    destination: Path,
    root: Path | None = None,
    patterns: tuple[str, ...] = (*GENERATION_PATTERNS, *TOKENIZER_PATTERNS),
) -> list[str]:
    """Copy generation config and tokenizer files (or those ``patterns`` match) from
    ``source``; return what was copied."""
    copied = []
    for path in metadata_files(source, root, patterns):
        if path.is_file():
            target = destination / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied.append(str(path.relative_to(source)))
    return copied


def write_config(
    config: dict | None,
    destination: Path,
    dtype_name: str | None,
    tie_word_embeddings: bool | None,
    vocab_size: int | None = None,
) -> None:
    """config.json from the base, with the dtype, embedding tying and (when the tokenizer
    comes from another model) vocabulary size of what was written."""
    if config is None:
        return
    config = dict(config)
    if vocab_size is not None:
        text_config = config.get("text_config")
        if isinstance(text_config, dict) and "vocab_size" in text_config:
            config["text_config"] = {**text_config, "vocab_size": vocab_size}
        if "vocab_size" in config or not isinstance(text_config, dict):
            config["vocab_size"] = vocab_size
    if dtype_name is not None:
        config["dtype"] = dtype_name  # transformers >= 4.56 reads "dtype"
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name
    if tie_word_embeddings is not None:
        config["tie_word_embeddings"] = tie_word_embeddings
        text_config = config.get("text_config")
        if isinstance(text_config, dict) and "tie_word_embeddings" in text_config:
            config["text_config"] = {**text_config, "tie_word_embeddings": tie_word_embeddings}
    (destination / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
