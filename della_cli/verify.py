"""Health checks of a model folder (merged by della or not): `della verify`.

Cheap checks read headers and JSON only: the index and the shards agree, every header is valid,
and the tensor shapes agree with config.json. The full check also reads every tensor (in blocks
of rows, so memory stays small) looking for NaN or Inf, loads the tokenizer to check that its
ids fit the embedding matrix and, with ``generate``, loads the model with transformers and
produces a few tokens.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from della_cli.errors import ModelError
from della_cli.io.reader import ModelReader
from della_cli.plan import find_embedding

_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ROWS_PER_READ_ELEMENTS = 1 << 22
_MAX_NAMED = 5


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    folder: str
    checks: list[Check] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return all(check.ok for check in self.checks)

    def add(self, name: str, problems: list[str], fine: str) -> None:
        self.checks.append(Check(name, not problems, "; ".join(problems) if problems else fine))

    def to_dict(self) -> dict:
        return {"folder": self.folder, "healthy": self.healthy, **asdict(self)}


def verify_model(
    folder: Path, read_tensors: bool = True, tokenizer: bool = True, generate: bool = False
) -> VerifyReport:
    """Run the checks on ``folder``; a check that cannot run (no readable weights) fails."""
    report = VerifyReport(str(folder))
    try:
        reader = ModelReader(folder, folder.name)
    except ModelError as error:
        report.add("files", [str(error)], "")
        return report
    try:
        report.add(
            "files",
            [*reader.shadowed, *unnamed_weight_files(folder, reader)],
            f"{len(reader.tensors)} tensors, headers and index agree",
        )
        report.add("config", config_problems(reader), "tensor shapes agree with config.json")
        if read_tensors:
            report.add("tensors", non_finite_tensors(reader), "every tensor reads, all finite")
    finally:
        reader.close()
    if tokenizer and (folder / "tokenizer_config.json").is_file():
        report.add("tokenizer", tokenizer_problems(folder, reader), "tokenizer fits the embeddings")
    if generate:
        problems, shown = generation_problems(folder)
        report.add("generate", problems, f"loads and generates: {shown}")
    return report


_SHARD_NAME = re.compile(r"model(-\d+-of-\d+)?\.safetensors")


def unnamed_weight_files(folder: Path, reader: ModelReader) -> list[str]:
    """Weight files named as a model's own (``model.safetensors``, ``model-0000k-of-0000n``)
    that the model does not use (the index names others): the leftovers of another merge,
    which transformers ignores but a reader of files may not."""
    used = {info.path.name for info in reader.tensors.values()}
    used |= set((reader.weight_map or {}).values())
    # Only names of the Hugging Face layout: a release may ship other files on purpose
    # (Mistral's consolidated.safetensors, for its own loader).
    unused = sorted(
        p.name
        for p in folder.glob("model*.safetensors")
        if p.name not in used and _SHARD_NAME.fullmatch(p.name)
    )
    if not unused:
        return []
    return [
        f"{len(unused)} safetensors file(s) the model does not use, first '{unused[0]}' "
        "(left over from another merge?); remove them"
    ]


def _config_value(config: dict, key: str) -> object:
    text_config = config.get("text_config") or {}
    return config.get(key, text_config.get(key) if isinstance(text_config, dict) else None)


def config_problems(reader: ModelReader) -> list[str]:
    """Embedding shape against vocab_size and hidden_size; layer count against the config."""
    config = reader.config
    if config is None:
        return ["no config.json"]
    problems = []
    embedding = find_embedding(reader)
    vocab, hidden = _config_value(config, "vocab_size"), _config_value(config, "hidden_size")
    hidden = hidden or _config_value(config, "n_embd")
    if embedding is not None:
        rows, width = reader.tensors[embedding].shape
        if isinstance(vocab, int) and rows != vocab:
            problems.append(f"'{embedding}' has {rows} rows but config.json vocab_size is {vocab}")
        if isinstance(hidden, int) and width != hidden:
            problems.append(
                f"'{embedding}' is {width} wide but config.json hidden size is {hidden}"
            )
    layers = _config_value(config, "num_hidden_layers") or _config_value(config, "n_layer")
    found = {int(m.group(1)) for name in reader.tensors if (m := _LAYER_INDEX.search(name))}
    if isinstance(layers, int) and found and len(found) != layers:
        problems.append(f"weights hold {len(found)} layers but config.json says {layers}")
    return problems


def non_finite_tensors(reader: ModelReader) -> list[str]:
    """Read every tensor block by block; name those holding NaN or Inf (or unreadable)."""
    bad = []
    for name, info in reader.tensors.items():
        try:
            if info.is_floating and not _all_finite(reader, name):
                bad.append(name)
        except ModelError as error:
            return [str(error)]
    if not bad:
        return []
    named = ", ".join(f"'{n}'" for n in bad[:_MAX_NAMED])
    more = f" and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
    return [f"NaN or Inf in {named}{more}"]


def _all_finite(reader: ModelReader, name: str) -> bool:
    info = reader.tensors[name]
    if info.nbytes == 0:  # nothing to read, however many rows of nothing the shape promises
        return True
    rows = info.shape[0] if len(info.shape) > 1 else 1
    step = max(1, _ROWS_PER_READ_ELEMENTS // max(info.numel // max(rows, 1), 1))
    for start in range(0, rows, step):
        block = reader.read_rows(name, start, min(start + step, rows))
        if not bool(np.isfinite(block).all()):
            return False
    return True


def tokenizer_problems(folder: Path, reader: ModelReader) -> list[str]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # transformers raises many types; any means "does not load"
        return [f"the tokenizer does not load ({type(error).__name__}: {error})"]
    embedding = find_embedding(reader)
    if embedding is None:
        return []
    rows = reader.tensors[embedding].shape[0]
    if len(tokenizer) > rows:
        return [f"the tokenizer has {len(tokenizer)} tokens but '{embedding}' has {rows} rows"]
    return []


def generation_problems(folder: Path, new_tokens: int = 8) -> tuple[list[str], str]:
    """Load the model with transformers and generate greedily from its first token; the
    problems, and what it generated (decoded when the folder has a tokenizer), to show."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
        start = model.generation_config.bos_token_id or 0
        prompt = torch.tensor([[start if isinstance(start, int) else start[0]]])
        with torch.no_grad():
            logits = model(prompt).logits
            output = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    except Exception as error:  # any failure to load or run is the finding
        return [f"transformers could not run it ({type(error).__name__}: {error})"], ""
    if not bool(torch.isfinite(logits).all()):
        return ["the model's logits hold NaN or Inf"], ""
    if output.shape[1] <= prompt.shape[1]:
        return ["generation produced no token"], ""
    return [], _decoded(folder, output[0].tolist())


def _decoded(folder: Path, ids: list[int]) -> str:
    """The generated ids as text (``[ids]`` where no tokenizer loads)."""
    try:
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(folder).decode(ids)
    except Exception:  # no tokenizer, or one transformers cannot load: show the ids
        return f"token ids {ids}"
    return repr(text)
