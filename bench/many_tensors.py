"""Per-tensor cost on a DeepSeek-V3-like checkpoint of many small tensors (issue 19).

A mixture-of-experts checkpoint holds 30,000-45,000 tensors, most of them small expert
matrices; whatever della spends per tensor (planning, scheduling, a threshold selection, a
kernel call, a write) is multiplied by that count. This benchmark writes a synthetic MoE base
and experts of that shape (bf16, several shards, a DeepSeek-like config.json), merges them with
every method asked for, and prints per method the wall time, milliseconds per tensor, CPU time
(every thread's, user and system: on a shared machine the wall time also holds waits for the
disk and for other processes) and peak RSS of ``della merge`` (its own process, through
``timed.py``).

    python bench/many_tensors.py --methods ties,dare_ties --runs 3

Folders go to ``--work`` (default /tmp/della-many-tensors; about 0.4 GB a model) and are reused
while their definition is the same. A quick check: ``--layers 2 --runs 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HIDDEN = 64
EXPERT_WIDTH = 96  # moe_intermediate_size: expert gate/up are (96, 64), down (64, 96)
EXPERTS_PER_LAYER = 256
SHARD_BYTES = 64 * 2**20
METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)
PARAMETERS = {  # top-level, as bench/tools.py writes them
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "breadcrumbs": {"density": 0.5, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.01},
    "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.1},
}


def tensor_shapes(layers: int):
    """Names and shapes in a DeepSeek-V3-like order: per layer attention, a router, the
    routed experts' three matrices, two norms."""
    yield "model.embed_tokens.weight", (1024, HIDDEN)
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{prefix}.self_attn.{name}.weight", (HIDDEN, HIDDEN)
        yield f"{prefix}.mlp.gate.weight", (EXPERTS_PER_LAYER, HIDDEN)
        for expert in range(EXPERTS_PER_LAYER):
            mlp = f"{prefix}.mlp.experts.{expert}"
            yield f"{mlp}.gate_proj.weight", (EXPERT_WIDTH, HIDDEN)
            yield f"{mlp}.up_proj.weight", (EXPERT_WIDTH, HIDDEN)
            yield f"{mlp}.down_proj.weight", (HIDDEN, EXPERT_WIDTH)
        yield f"{prefix}.input_layernorm.weight", (HIDDEN,)
        yield f"{prefix}.post_attention_layernorm.weight", (HIDDEN,)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (1024, HIDDEN)


def write_model(folder: Path, layers: int, expert: int | None) -> None:
    """The base (``expert=None``) or an expert: the base plus a delta whose shared part flips
    sign between experts (so sign election has conflicts) and a part of its own."""
    import ml_dtypes
    from safetensors.numpy import save_file

    stamp = json.dumps({"layers": layers, "expert": expert, "version": 1})
    marker = folder / ".complete"
    if marker.exists() and marker.read_text() == stamp:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    base_rng = np.random.default_rng(0)
    shared_rng = np.random.default_rng(1)
    own_rng = np.random.default_rng(100 + (expert or 0))
    sign = 1.0 if (expert or 0) % 2 else -0.8
    pending: dict[str, np.ndarray] = {}
    shards: list[list[str]] = []
    size = total = 0

    def flush() -> None:
        nonlocal pending, size
        shards.append(list(pending))
        save_file(pending, str(folder / f"part-{len(shards)}"), metadata={"format": "pt"})
        pending, size = {}, 0

    for name, shape in tensor_shapes(layers):
        values = base_rng.standard_normal(shape, dtype=np.float32) * 0.02
        if len(shape) == 1:
            values += 1.0
        shared = shared_rng.standard_normal(shape, dtype=np.float32)
        if expert is not None:
            own = own_rng.standard_normal(shape, dtype=np.float32)
            values = values + 0.002 * sign * shared + 0.001 * own
        array = values.astype(ml_dtypes.bfloat16)
        if pending and size + array.nbytes > SHARD_BYTES:
            flush()
        pending[name] = array
        size += array.nbytes
        total += array.nbytes
    flush()
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"part-{number}").rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": HIDDEN,
        "moe_intermediate_size": EXPERT_WIDTH,
        "n_routed_experts": EXPERTS_PER_LAYER,
        "num_hidden_layers": layers,
        "vocab_size": 1024,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    marker.write_text(stamp)


# The catalog's methods (``della methods``) with bench.py's recipes; these take one expert.
ONE_EXPERT = {"slerp", "nearswap", "arcee_fusion", "passthrough"}
TWO_EXPERTS = {"nuslerp"}


def write_recipe(path: Path, method: str, base: Path, experts: list[Path]) -> Path:
    import yaml

    if method not in METHODS:  # a catalog method: bench.py's recipe
        import tools

        count = 1 if method in ONE_EXPERT else 2 if method in TWO_EXPERTS else len(experts)
        chosen = experts[:count]
        return tools.write_recipe(path, method, base, chosen)
    recipe: dict = {"merge_method": method}
    if method != "linear":
        recipe["base_model"] = str(base)
    recipe["models"] = [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts]
    if method in PARAMETERS:
        recipe["parameters"] = dict(PARAMETERS[method])
    recipe["dtype"] = "bfloat16"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def timed_merge(recipe: Path, out: Path, log: Path, threads: int | None) -> dict:
    """One ``della merge`` in its own process: wall time and peak RSS (``timed.py``)."""
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    command = [sys.executable, "-m", "della_cli", "merge", str(recipe), str(out), "--quiet"]
    if threads:
        command += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(BENCH / "timed.py"), str(log), "--", *command],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    run = json.loads(result.stdout)
    if run["returncode"] != 0:
        raise SystemExit(f"della merge failed; see {log}")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--layers", type=int, default=40, help="MoE layers (default 40)")
    parser.add_argument("--experts", type=int, default=3, help="expert models (default 3)")
    parser.add_argument("--runs", type=int, default=1, help="timed runs per method")
    parser.add_argument("--threads", type=int, default=None, help="della merge --threads")
    parser.add_argument("--work", type=Path, default=Path("/tmp/della-many-tensors"))
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    tensors = sum(1 for _ in tensor_shapes(args.layers))
    base = args.work / f"base-{args.layers}"
    experts = [args.work / f"expert-{args.layers}-{i}" for i in range(1, args.experts + 1)]
    for index, folder in enumerate([base, *experts]):
        write_model(folder, args.layers, None if index == 0 else index)
    print(f"{tensors} tensors per model, {len(experts)} experts, {args.runs} runs", flush=True)
    print(
        "| method | median s | ms per tensor | CPU s | CPU ms per tensor | peak RSS GB | runs s |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in methods:
        recipe = write_recipe(args.work / f"{method}.yaml", method, base, experts)
        runs = [
            timed_merge(recipe, args.work / "out", args.work / f"{method}.log", args.threads)
            for _ in range(args.runs)
        ]
        seconds = [run["wall_s"] for run in runs]
        median = statistics.median(seconds)
        cpu = statistics.median(run["cpu_s"] for run in runs)
        rss = max(run["peak_rss_bytes"] for run in runs) / 1e9
        listed = ", ".join(f"{s:.2f}" for s in seconds)
        per_tensor = f"{1000 * median / tensors:.2f} | {cpu:.2f} | {1000 * cpu / tensors:.2f}"
        print(f"| {method} | {median:.2f} | {per_tensor} | {rss:.3f} | {listed} |")
        sys.stdout.flush()
    shutil.rmtree(args.work / "out", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
