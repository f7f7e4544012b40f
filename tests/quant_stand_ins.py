"""Header-only stand-ins of the published quantized checkpoints, at full size.

The layouts are those of the Hub releases, built from transformers' own configs
(``DeepseekV3Config()`` and ``GptOssConfig()`` default to DeepSeek-V3 and gpt-oss-120b):
DeepSeek-V3/R1 in fine-grained FP8 (every linear weight of attention and MLP in e4m3 with a
float32 ``weight_scale_inv`` per 128x128 block; embeddings, output head, norms and router in
bfloat16, the router's ``e_score_correction_bias`` in float32), with its multi-token prediction
layer (``model.layers.61``: a full MoE layer plus its own embedding, head, ``enorm``, ``hnorm``
and ``eh_proj``); gpt-oss with MXFP4 experts (``*_blocks`` and ``*_scales``) and everything
else in bfloat16. Data reads as zeros (``hub_server.StandIn``).
"""

from __future__ import annotations

import json
import math
import struct

from hub_server import StandIn

ITEMSIZE = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "U8": 1}
Layout = dict[str, tuple[str, tuple[int, ...]]]


def deepseek_v3_config() -> dict:
    import transformers

    config = transformers.DeepseekV3Config().to_dict()
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    config["num_nextn_predict_layers"] = 1
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    return config


def deepseek_v3_layout(config: dict) -> Layout:
    """Every tensor of the FP8 release, with the MTP layer."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads, lora_q, lora_kv = (
        config["num_attention_heads"],
        config["q_lora_rank"],
        config["kv_lora_rank"],
    )
    nope, rope, value = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    layout: Layout = {}

    def fp8(name: str, rows: int, columns: int) -> None:
        layout[f"{name}.weight"] = ("F8_E4M3", (rows, columns))
        layout[f"{name}.weight_scale_inv"] = (
            "F32",
            (math.ceil(rows / 128), math.ceil(columns / 128)),
        )

    def mlp(prefix: str, width: int) -> None:
        fp8(f"{prefix}.gate_proj", width, hidden)
        fp8(f"{prefix}.up_proj", width, hidden)
        fp8(f"{prefix}.down_proj", hidden, width)

    layout["model.embed_tokens.weight"] = ("BF16", (vocab, hidden))
    for index in range(config["num_hidden_layers"] + config["num_nextn_predict_layers"]):
        layer = f"model.layers.{index}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            layout[f"{layer}.{norm}.weight"] = ("BF16", (hidden,))
        attention = f"{layer}.self_attn"
        fp8(f"{attention}.q_a_proj", lora_q, hidden)
        layout[f"{attention}.q_a_layernorm.weight"] = ("BF16", (lora_q,))
        fp8(f"{attention}.q_b_proj", heads * (nope + rope), lora_q)
        fp8(f"{attention}.kv_a_proj_with_mqa", lora_kv + rope, hidden)
        layout[f"{attention}.kv_a_layernorm.weight"] = ("BF16", (lora_kv,))
        fp8(f"{attention}.kv_b_proj", heads * (nope + value), lora_kv)
        fp8(f"{attention}.o_proj", hidden, heads * value)
        if index < config["first_k_dense_replace"]:
            mlp(f"{layer}.mlp", config["intermediate_size"])
            continue
        experts = config["n_routed_experts"]
        layout[f"{layer}.mlp.gate.weight"] = ("BF16", (experts, hidden))
        layout[f"{layer}.mlp.gate.e_score_correction_bias"] = ("F32", (experts,))
        for expert in range(experts):
            mlp(f"{layer}.mlp.experts.{expert}", config["moe_intermediate_size"])
        mlp(
            f"{layer}.mlp.shared_experts",
            config["moe_intermediate_size"] * config["n_shared_experts"],
        )
        if index >= config["num_hidden_layers"]:  # the multi-token prediction module
            layout[f"{layer}.embed_tokens.weight"] = ("BF16", (vocab, hidden))
            for norm in ("enorm", "hnorm", "shared_head.norm"):
                layout[f"{layer}.{norm}.weight"] = ("BF16", (hidden,))
            layout[f"{layer}.eh_proj.weight"] = ("BF16", (hidden, 2 * hidden))
            layout[f"{layer}.shared_head.head.weight"] = ("BF16", (vocab, hidden))
    layout["model.norm.weight"] = ("BF16", (hidden,))
    layout["lm_head.weight"] = ("BF16", (vocab, hidden))
    return layout


def gpt_oss_config(layers: int = 36, experts: int = 128) -> dict:
    """gpt-oss-120b by default; gpt-oss-20b has 24 layers of 32 experts."""
    import transformers

    config = transformers.GptOssConfig(num_hidden_layers=layers, num_local_experts=experts)
    config = config.to_dict()
    config["architectures"] = ["GptOssForCausalLM"]
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    return config


def gpt_oss_layout(config: dict) -> Layout:
    hidden, vocab, experts = (
        config["hidden_size"],
        config["vocab_size"],
        config["num_local_experts"],
    )
    heads, kv_heads, head = (
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    width = config["intermediate_size"]
    layout: Layout = {"model.embed_tokens.weight": ("BF16", (vocab, hidden))}
    for index in range(config["num_hidden_layers"]):
        layer = f"model.layers.{index}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            layout[f"{layer}.{norm}.weight"] = ("BF16", (hidden,))
        for name, rows, columns in (
            ("q_proj", heads * head, hidden),
            ("k_proj", kv_heads * head, hidden),
            ("v_proj", kv_heads * head, hidden),
            ("o_proj", hidden, heads * head),
        ):
            layout[f"{layer}.self_attn.{name}.weight"] = ("BF16", (rows, columns))
            layout[f"{layer}.self_attn.{name}.bias"] = ("BF16", (rows,))
        layout[f"{layer}.self_attn.sinks"] = ("BF16", (heads,))
        layout[f"{layer}.mlp.router.weight"] = ("BF16", (experts, hidden))
        layout[f"{layer}.mlp.router.bias"] = ("BF16", (experts,))
        for name, rows, columns in (
            ("gate_up_proj", 2 * width, hidden),
            ("down_proj", hidden, width),
        ):
            layout[f"{layer}.mlp.experts.{name}_blocks"] = (
                "U8",
                (experts, rows, columns // 32, 16),
            )
            layout[f"{layer}.mlp.experts.{name}_scales"] = ("U8", (experts, rows, columns // 32))
            layout[f"{layer}.mlp.experts.{name}_bias"] = ("BF16", (experts, rows))
    layout["model.norm.weight"] = ("BF16", (hidden,))
    layout["lm_head.weight"] = ("BF16", (vocab, hidden))
    return layout


def layout_bytes(layout: Layout) -> int:
    return sum(math.prod(shape) * ITEMSIZE[dtype] for dtype, shape in layout.values())


def stand_in(layout: Layout) -> StandIn:
    """One safetensors file of ``layout`` whose header is real and whose data reads as zeros."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in layout.items():
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = struct.pack("<Q", len(encoded)) + encoded
    return StandIn(prefix, len(prefix) + offset)


def repository(config: dict, layout: Layout) -> dict[str, bytes]:
    return {"config.json": json.dumps(config).encode(), "model.safetensors": stand_in(layout)}
