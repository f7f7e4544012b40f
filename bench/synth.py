"""Synthetic Llama-shaped base and expert folders for the benchmarks.

Weights are written straight to safetensors shards, tensor by tensor, so that generating a
1.1B-parameter model needs about one shard of memory, never a whole model. Each expert is
``base + delta`` with a structured delta that looks like a fine-tune: a low-rank update shared by
all experts but with an alternating sign (so TIES-style sign election has real conflicts to
resolve), a low-rank update of its own, and sparse large-magnitude noise (so magnitude-based
pruning has outliers to rank). Every tensor draws from a generator seeded by (model, tensor name),
so the folders are reproducible and expert ``i`` is the same whatever the number of experts.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MARKER = ".bench-complete"
RANK = 8  # rank of the shared and own low-rank parts of each delta
SPARSE_FRACTION = 0.01  # fraction of entries with an outlier in each delta


@dataclass(frozen=True)
class ModelShape:
    """The Llama dimensions of one benchmark size and how its files are sharded."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    shard_bytes: int

    def tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Names and shapes in the order transformers saves a LlamaForCausalLM."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        yield "model.embed_tokens.weight", (self.vocab, self.hidden)
        for i in range(self.layers):
            prefix = f"model.layers.{i}"
            yield f"{prefix}.self_attn.q_proj.weight", (self.hidden, self.hidden)
            yield f"{prefix}.self_attn.k_proj.weight", (kv, self.hidden)
            yield f"{prefix}.self_attn.v_proj.weight", (kv, self.hidden)
            yield f"{prefix}.self_attn.o_proj.weight", (self.hidden, self.hidden)
            yield f"{prefix}.mlp.gate_proj.weight", (self.intermediate, self.hidden)
            yield f"{prefix}.mlp.up_proj.weight", (self.intermediate, self.hidden)
            yield f"{prefix}.mlp.down_proj.weight", (self.hidden, self.intermediate)
            yield f"{prefix}.input_layernorm.weight", (self.hidden,)
            yield f"{prefix}.post_attention_layernorm.weight", (self.hidden,)
        yield "model.norm.weight", (self.hidden,)
        yield "lm_head.weight", (self.vocab, self.hidden)

    @property
    def parameters(self) -> int:
        return sum(_numel(shape) for _, shape in self.tensor_shapes())


SIZES: dict[str, ModelShape] = {
    # Shards are sized so that every size has several, as real checkpoints do.
    "tiny": ModelShape(128, 4, 352, 4096, 4, 4, shard_bytes=2 * 10**6),
    "250m": ModelShape(1024, 16, 2816, 32000, 16, 16, shard_bytes=250 * 10**6),
    "1b": ModelShape(2048, 22, 5632, 32000, 32, 4, shard_bytes=10**9),  # TinyLlama
    # Llama-2-7B: 13.5 GB per model in bf16; for bench/gpu_bench.py on a GPU machine's disk
    "7b": ModelShape(4096, 32, 11008, 32000, 32, 32, shard_bytes=5 * 10**9),
}


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _generator(model: str, name: str, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(f"{model}/{name}".encode()))


def base_tensor(name: str, shape: tuple[int, ...], device: str = "cpu") -> torch.Tensor:
    """Norm weights near one, everything else N(0, 0.02²) as in Llama's init."""
    noise = torch.randn(shape, generator=_generator("base", name, device), device=device)
    if len(shape) == 1:
        return 1.0 + 0.05 * noise
    return 0.02 * noise


def _low_rank(model: str, name: str, shape: tuple[int, ...], device: str) -> torch.Tensor:
    generator = _generator(model, name, device)
    if len(shape) == 1:
        return torch.randn(shape, generator=generator, device=device)
    left = torch.randn(shape[0], RANK, generator=generator, device=device)
    right = torch.randn(RANK, shape[1], generator=generator, device=device)
    # Scaled so each entry has unit variance whatever the rank.
    return (left @ right) / RANK**0.5


def expert_delta(
    index: int, name: str, shape: tuple[int, ...], device: str = "cpu"
) -> torch.Tensor:
    """Delta of expert ``index`` (1-based) on tensor ``name``, in float32.

    The shared part flips sign between odd and even experts and dominates the own part, so about
    half the entries of every pair of experts disagree in sign.
    """
    shared_sign = 1.0 if index % 2 else -0.8
    delta = 0.002 * shared_sign * _low_rank("shared", name, shape, device)
    delta += 0.001 * _low_rank(f"expert-{index}", name, shape, device)
    # Outliers at random positions: drawing only their positions and values keeps generation
    # cheap next to a full-size Bernoulli mask.
    generator = _generator(f"sparse-{index}", name, device)
    count = max(1, int(SPARSE_FRACTION * delta.numel()))
    positions = torch.randint(delta.numel(), (count,), generator=generator, device=device)
    values = 0.01 * torch.randn(count, generator=generator, device=device)
    delta.view(-1).index_add_(0, positions, values)
    return delta


class ShardedSaver:
    """Collects tensors and writes a shard whenever ``shard_bytes`` would be exceeded."""

    def __init__(self, folder: Path, shard_bytes: int) -> None:
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        self.shards.append(list(self.pending))
        save_file(self.pending, self.folder / f"part-{len(self.shards)}", metadata={"format": "pt"})
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last shard, give the shards their final names, write the index."""
        if self.pending:
            self._flush()
        count = len(self.shards)
        weight_map = {}
        for number, names in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            (self.folder / f"part-{number}").rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_metadata(folder: Path, shape: ModelShape) -> None:
    """config.json from transformers' LlamaConfig, and a fast tokenizer of the right vocab."""
    from della_cli.tiny import save_tokenizer
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        architectures=["LlamaForCausalLM"],
    )
    config.dtype = "bfloat16"
    config.to_json_file(folder / "config.json")
    save_tokenizer(folder, shape.vocab)


def _stamp(shape: ModelShape, expert: int | None, device: str, base: Path | None) -> str:
    """What a folder was generated from; an expert's includes its base's, so that a new base
    regenerates its experts."""
    base_stamp = (base / MARKER).read_text() if base is not None else None
    fields = {"shape": asdict(shape), "expert": expert, "device": device, "base": base_stamp}
    return json.dumps({**fields, "version": 2})


def write_model(
    folder: Path, shape: ModelShape, expert: int | None, base: Path | None, device: str, log
) -> None:
    """The base (``expert=None``) or expert ``expert`` (its base's weights plus a delta),
    unless already complete. Random draws happen on ``device``; a GPU makes them much faster."""
    marker = folder / MARKER
    stamp = _stamp(shape, expert, device, base)
    if marker.exists() and marker.read_text() == stamp:
        return
    log(f"generating {folder} ({shape.parameters / 1e6:.0f}M parameters, bf16)")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    saver = ShardedSaver(folder, shape.shard_bytes)
    base_weights = BaseReader(base) if base is not None else None
    for name, dims in shape.tensor_shapes():
        if base_weights is None:
            tensor = base_tensor(name, dims, device)
        else:
            tensor = base_weights.get(name).to(device, torch.float32)
            tensor += expert_delta(expert or 0, name, dims, device)
        saver.add(name, tensor.to(torch.bfloat16).cpu())
    saver.close()
    write_metadata(folder, shape)
    marker.write_text(stamp)


class BaseReader:
    """The base's tensors by name, one shard handle each."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = json.loads((folder / "model.safetensors.index.json").read_text())
        self.where = index["weight_map"]
        self.handles = {f: safe_open(folder / f, "pt") for f in set(self.where.values())}

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_tensor(name)


def ensure_models(
    root: Path, size: str, experts: int, log=print, device: str = "cpu"
) -> tuple[Path, list[Path]]:
    """``root/size/base`` and ``root/size/expert-1..experts``, generating what is missing."""
    shape = SIZES[size]
    base = root / size / "base"
    write_model(base, shape, None, None, device, log)
    expert_folders = [root / size / f"expert-{i}" for i in range(1, experts + 1)]
    for index, folder in enumerate(expert_folders, start=1):
        write_model(folder, shape, index, base, device, log)
    return base, expert_folders


def model_files(folder: Path) -> list[Path]:
    """Every file of a model folder that a merge reads (weights, index, config, tokenizer)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != MARKER)
