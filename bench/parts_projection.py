"""What a merge of Llama-3.1-405B or DeepSeek-V3 in N parts needs per machine, from della's plan.

Nothing is downloaded and no weight exists: each model is a folder holding its config.json and
index, read through safetensors headers built from the config (every tensor the checkpoint
holds, with its shape and dtype, grouped into weight files of about the size the Hub
repositories use). della plans the recipe over them (``build_plan``) and splits the plan into
N parts (``della_cli.parts.split_parts``, what ``della plan --parts N`` prints); every input
counts as a Hub model, so a part's download is the weight files its shards read. The time per
machine is a projection from given speeds: the download at the link's speed, then the merge,
which streams reads, arithmetic and writes at once and so goes at the slowest of the three
(disk read, the measured arithmetic rate times the cores, disk write).

    python bench/parts_projection.py [--link-gbit 10] [--disk-read-gbs 2] [--disk-write-gbs 1.5]
        [--cores 32] [--merge-mbs-per-core 27] [--markdown OUT.md]

DeepSeek-V3 is planned in bfloat16 (the checkpoint's FP8 weights dequantized, as mergers use
it; della refuses FP8 with block scales), multi-token-prediction layer included.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR))

GB = 10**9
FILE_BYTES = 4_300_000_000  # weight files of at most this size, about the repositories' own

LLAMA_31_405B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16384,
    "intermediate_size": 53248,
    "num_hidden_layers": 126,
    "num_attention_heads": 128,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "first_k_dense_replace": 3,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "vocab_size": 129280,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def llama_tensors(c: dict) -> list[tuple[str, list[int], str]]:
    """(name, shape, dtype) of every tensor of a Llama checkpoint, in its file order."""
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim, inter = h // heads, c["intermediate_size"]
    out = [("model.embed_tokens.weight", [c["vocab_size"], h], "BF16")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.self_attn.q_proj.weight", [h, h], "BF16"),
            (f"{p}.self_attn.k_proj.weight", [kv * head_dim, h], "BF16"),
            (f"{p}.self_attn.v_proj.weight", [kv * head_dim, h], "BF16"),
            (f"{p}.self_attn.o_proj.weight", [h, h], "BF16"),
            (f"{p}.mlp.gate_proj.weight", [inter, h], "BF16"),
            (f"{p}.mlp.up_proj.weight", [inter, h], "BF16"),
            (f"{p}.mlp.down_proj.weight", [h, inter], "BF16"),
            (f"{p}.input_layernorm.weight", [h], "BF16"),
            (f"{p}.post_attention_layernorm.weight", [h], "BF16"),
        ]
    out += [("model.norm.weight", [h], "BF16"), ("lm_head.weight", [c["vocab_size"], h], "BF16")]
    return out


def deepseek_tensors(c: dict) -> list[tuple[str, list[int], str]]:
    """(name, shape, dtype) of every tensor of a DeepSeek-V3 checkpoint (MLA attention, a
    shared expert and routed experts past the first dense layers, the MTP layer last)."""
    h, heads, vocab = c["hidden_size"], c["num_attention_heads"], c["vocab_size"]
    q_rank, kv_rank = c["q_lora_rank"], c["kv_lora_rank"]
    nope, rope, v_dim = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    moe, experts = c["moe_intermediate_size"], c["n_routed_experts"]

    def mlp(prefix: str, inter: int) -> list:
        return [
            (f"{prefix}.gate_proj.weight", [inter, h], "BF16"),
            (f"{prefix}.up_proj.weight", [inter, h], "BF16"),
            (f"{prefix}.down_proj.weight", [h, inter], "BF16"),
        ]

    def layer(i: int) -> list:
        p = f"model.layers.{i}"
        out = [
            (f"{p}.self_attn.q_a_proj.weight", [q_rank, h], "BF16"),
            (f"{p}.self_attn.q_a_layernorm.weight", [q_rank], "BF16"),
            (f"{p}.self_attn.q_b_proj.weight", [heads * (nope + rope), q_rank], "BF16"),
            (f"{p}.self_attn.kv_a_proj_with_mqa.weight", [kv_rank + rope, h], "BF16"),
            (f"{p}.self_attn.kv_a_layernorm.weight", [kv_rank], "BF16"),
            (f"{p}.self_attn.kv_b_proj.weight", [heads * (nope + v_dim), kv_rank], "BF16"),
            (f"{p}.self_attn.o_proj.weight", [h, heads * v_dim], "BF16"),
            (f"{p}.input_layernorm.weight", [h], "BF16"),
            (f"{p}.post_attention_layernorm.weight", [h], "BF16"),
        ]
        if i < c["first_k_dense_replace"]:
            return out + mlp(f"{p}.mlp", c["intermediate_size"])
        out += [
            (f"{p}.mlp.gate.weight", [experts, h], "BF16"),
            (f"{p}.mlp.gate.e_score_correction_bias", [experts], "F32"),
        ]
        for e in range(experts):
            out += mlp(f"{p}.mlp.experts.{e}", moe)
        return out + mlp(f"{p}.mlp.shared_experts", moe * c["n_shared_experts"])

    out = [("model.embed_tokens.weight", [vocab, h], "BF16")]
    for i in range(c["num_hidden_layers"]):
        out += layer(i)
    out += [("model.norm.weight", [h], "BF16"), ("lm_head.weight", [vocab, h], "BF16")]
    mtp = c["num_hidden_layers"]  # the multi-token-prediction layer: a layer and its heads
    p = f"model.layers.{mtp}"
    out += [
        *layer(mtp),
        (f"{p}.embed_tokens.weight", [vocab, h], "BF16"),
        (f"{p}.enorm.weight", [h], "BF16"),
        (f"{p}.hnorm.weight", [h], "BF16"),
        (f"{p}.eh_proj.weight", [h, 2 * h], "BF16"),
        (f"{p}.shared_head.norm.weight", [h], "BF16"),
        (f"{p}.shared_head.head.weight", [vocab, h], "BF16"),
    ]
    return out


def headers(tensors: list) -> tuple[dict[str, tuple[bytes, int]], dict[str, str]]:
    """The weight files' raw headers and sizes, and the index's weight map."""
    itemsize = {"BF16": 2, "F32": 4}
    files: list[list] = [[]]
    size = 0
    for name, shape, dtype in tensors:
        nbytes = itemsize[dtype]
        for dim in shape:
            nbytes *= dim
        if files[-1] and size + nbytes > FILE_BYTES:
            files.append([])
            size = 0
        files[-1].append((name, shape, dtype, nbytes))
        size += nbytes
    count = len(files)
    raw, weight_map = {}, {}
    for number, entries in enumerate(files, start=1):
        file_name = f"model-{number:05d}-of-{count:05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in entries:
            header[name] = {
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, offset + nbytes],
            }
            weight_map[name] = file_name
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        raw[file_name] = (encoded, 8 + len(encoded) + offset)
    return raw, weight_map


def plan_parts(config: dict, tensors: list, counts: list[int], root: Path) -> dict:
    """The plan of a DELLA merge of a base and three experts of this shape, and its parts."""
    from della_cli.engine import block_elements_for
    from della_cli.io.reader import ModelReader
    from della_cli.parts import model_readers, split_parts
    from della_cli.plan import build_plan
    from della_cli.recipe import load_recipe

    raw, weight_map = headers(tensors)
    folders = []
    for role in ("base", "expert1", "expert2", "expert3"):
        folder = root / role
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        folders.append(folder)
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(
        json.dumps(
            {
                "merge_method": "della",
                "base_model": str(folders[0]),
                "models": [
                    {"model": str(f), "parameters": {"weight": 0.4, "density": 0.5, "epsilon": 0.1}}
                    for f in folders[1:]
                ],
            }
        )
    )
    recipe = load_recipe(recipe_path)
    readers = [ModelReader(f, f.name, headers=raw) for f in folders]
    plan = build_plan(recipe, readers[0], readers[1:], 5 * GB, device="cpu")
    by_index = model_readers(readers[0], readers[1:])
    return {
        "files": len(raw),
        "input_bytes": sum(size for _, size in raw.values()),
        "output_bytes": plan.output_bytes,
        "shards": len(plan.shards),
        "parts": {
            n: split_parts(plan, by_index, n, set(by_index), block_elements_for("cpu"), False)
            for n in counts
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link-gbit", type=float, default=10.0, help="download link, Gbit/s")
    parser.add_argument("--disk-read-gbs", type=float, default=2.0, help="disk reads, GB/s")
    parser.add_argument("--disk-write-gbs", type=float, default=1.5, help="disk writes, GB/s")
    parser.add_argument("--cores", type=int, default=32, help="cores per machine")
    parser.add_argument(
        "--merge-mbs-per-core",
        type=float,
        default=27.0,
        help="output MB/s one core merges (della, base + 3; measured, see RESULTS.md)",
    )
    parser.add_argument("--counts", default="1,8,32")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.counts.split(",")]
    link = args.link_gbit * 1e9 / 8
    merge_rate = args.merge_mbs_per_core * 1e6 * args.cores
    lines = [
        "| model | N | shards per part | download per machine | disk per machine | "
        "peak memory | download | merge | time per machine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, config, build in (
            ("Llama-3.1-405B", LLAMA_31_405B, llama_tensors),
            ("DeepSeek-V3 (bf16)", DEEPSEEK_V3, deepseek_tensors),
        ):
            found = plan_parts(config, build(config), counts, Path(scratch) / label.split()[0])
            notes.append(
                f"{label}: {found['files']} weight files per model, "
                f"{found['input_bytes'] / GB:,.0f} GB a model (the base and 3 experts to merge), "
                f"{found['output_bytes'] / GB:,.0f} GB out in {found['shards']} shards of 5 GB"
            )
            for n, parts in found["parts"].items():
                worst = max(parts, key=lambda p: p.download_bytes + p.read_bytes)
                download_s = worst.download_bytes / link
                merge_s = max(
                    worst.read_bytes / (args.disk_read_gbs * GB),
                    worst.output_bytes / merge_rate,
                    worst.output_bytes / (args.disk_write_gbs * GB),
                )
                shards = sorted(p.stop_shard - p.first_shard for p in parts)
                lines.append(
                    f"| {label} | {n} | {shards[0]}-{shards[-1]} | "
                    f"{worst.download_bytes / GB:,.0f} GB | {worst.disk_bytes / GB:,.0f} GB | "
                    f"{worst.working_memory_bytes / GB:.1f} GB | {download_s / 60:,.1f} min | "
                    f"{merge_s / 60:,.1f} min | {(download_s + merge_s) / 60:,.1f} min |"
                )
    text = "\n".join(
        [
            f"Speeds: link {args.link_gbit:g} Gbit/s, disk {args.disk_read_gbs:g} GB/s read and "
            f"{args.disk_write_gbs:g} GB/s write, {args.cores} cores merging "
            f"{args.merge_mbs_per_core:g} MB/s of output each. The figures are those of the "
            "busiest part (the most bytes to download and read).",
            "",
            *lines,
            "",
            *[f"- {note}" for note in notes],
        ]
    )
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
