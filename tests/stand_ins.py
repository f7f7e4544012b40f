"""Header-only stand-ins of full-size models, for plans of real-model recipes.

A stand-in has the real model's config.json and a safetensors file with its real header (names,
dtypes, shapes, offsets) whose data reads as zeros (``hub_server.StandIn``): enough for
``della plan``, which reads headers only, and nothing to download or hold in memory.
"""

from __future__ import annotations

import json
import struct

from hub_server import StandIn

# Qwen2.5-0.5B and its instruction-tuned releases share this architecture (config.json of
# each repository on the Hub); the release only changes what generation_config.json says.
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "torch_dtype": "bfloat16",
}


def tensor_shapes(config: dict) -> dict[str, list[int]]:
    """Every tensor the transformers model of ``config`` saves, with its shape (built on the
    meta device: no memory)."""
    import torch
    import transformers

    model_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(model_config)
    state = model.state_dict()
    if model_config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # saved once, as the embedding
    return {name: list(tensor.shape) for name, tensor in state.items()}


def safetensors_stand_in(shapes: dict[str, list[int]], dtype: str = "BF16") -> StandIn:
    """A safetensors file of ``shapes`` whose header is real and whose data reads as zeros."""
    itemsize = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        count = 1
        for size in shapes[name]:
            count *= size
        header[name] = {
            "dtype": dtype,
            "shape": shapes[name],
            "data_offsets": [offset, offset + count * itemsize],
        }
        offset += count * itemsize
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = struct.pack("<Q", len(encoded)) + encoded
    return StandIn(prefix, len(prefix) + offset)


def model_files(config: dict) -> dict[str, bytes]:
    """The files of a single-shard model repository, weights as a stand-in."""
    return {
        "config.json": json.dumps(config, indent=2).encode(),
        "model.safetensors": safetensors_stand_in(tensor_shapes(config)),
    }
