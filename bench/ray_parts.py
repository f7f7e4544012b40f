"""della merge --ray on a local Ray cluster of 1, 2 and 4 nodes: time, and bytes per node.

The synthetic ~1.1B Llama (TinyLlama's shape, bf16; ``synth``) with three experts is merged
once on this machine without Ray (the reference), then on local clusters made with Ray's test
utilities (``ray.cluster_utils.Cluster``: every node a set of processes on this machine, one
CPU each), in as many parts as nodes. Each run's shards are checked byte for byte against the
reference. Per node: the parts it ran, the input bytes it read, the output bytes it wrote, and
what went through Ray's object store (nothing when the nodes share the parts folder, as here;
every output byte with ``--gather pull``). The cluster's start is timed apart from the merge.

    python bench/ray_parts.py [--nodes 1,2,4] [--method della] [--size 1b] [--experts 3]
        [--out-shard-size 250MB] [--gather auto|pull] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(REPO_DIR))

import report  # noqa: E402
import synth  # noqa: E402
import tools  # noqa: E402

GB = 10**9


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob("*.safetensors*"))
    }


def reference(recipe: Path, out: Path, options) -> float:
    from della_cli.api import run_merge

    shutil.rmtree(out.parent, ignore_errors=True)
    started = time.perf_counter()
    run_merge(recipe, out, options)
    return time.perf_counter() - started


def on_cluster(recipe: Path, out: Path, options, nodes: int, gather: str) -> dict:
    """One merge on a fresh local cluster of ``nodes`` nodes, in as many parts."""
    import ray
    from della_cli.part_merge import plan_parts_report
    from della_cli.ray_runner import run_on_ray
    from ray.cluster_utils import Cluster

    shutil.rmtree(out.parent, ignore_errors=True)
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    start_s = time.perf_counter() - started
    events = []
    try:
        started = time.perf_counter()
        run_on_ray(recipe, out, options, None, nodes, on_event=events.append, gather=gather)
        merge_s = time.perf_counter() - started
    finally:
        ray.shutdown()
        cluster.shutdown()
    _, parts = plan_parts_report(recipe, None, options, nodes)
    node_of = {e.part: e.node for e in events if e.kind == "started"}  # the last attempt
    per_node: dict[str, dict] = defaultdict(lambda: {"parts": [], "read": 0, "written": 0})
    for part in parts:
        entry = per_node[node_of[part.label]]
        entry["parts"].append(part.label)
        entry["read"] += part.read_bytes
        entry["written"] += part.output_bytes
    pulled = defaultdict(int)
    for event in events:
        if event.kind == "pulled":
            pulled[event.node] += event.bytes
    for node, entry in per_node.items():
        entry["ray"] = pulled[node]
    return {"start_s": start_s, "merge_s": merge_s, "per_node": dict(per_node)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1,2,4")
    parser.add_argument("--method", default="della")
    parser.add_argument("--size", default="1b", choices=sorted(synth.SIZES))
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--out-shard-size", default="250MB")
    parser.add_argument("--gather", default="auto", choices=("auto", "pull"))
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "work")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)

    from della_cli.api import MergeOptions
    from della_cli.sizes import parse_size

    base, experts = synth.ensure_models(args.work / "models", args.size, args.experts, log=say)
    recipe = tools.write_recipe(
        args.work / "recipes" / f"ray-{args.size}-{args.method}.yaml", args.method, base, experts
    )
    shard_bytes = parse_size(args.out_shard_size)
    options = MergeOptions(device="cpu", out_shard_bytes=shard_bytes, progress=False, threads=1)
    say("reference: the merge on this machine, one thread, no Ray")
    reference_s = reference(recipe, args.work / "ray-out" / "reference" / "out", options)
    expected = digests(args.work / "ray-out" / "reference" / "out")
    say(f"reference: {reference_s:.1f} s")
    rows = []
    for nodes in [int(n) for n in args.nodes.split(",")]:
        out = args.work / "ray-out" / f"nodes{nodes}" / "out"
        result = on_cluster(recipe, out, options, nodes, args.gather)
        same = digests(out) == expected
        say(f"{nodes} node(s): {result['merge_s']:.1f} s (cluster start {result['start_s']:.1f} s)")
        if not same:
            say("the output differs from the reference")
            return 1
        rows.append((nodes, result))
        shutil.rmtree(out.parent, ignore_errors=True)
    lines = [
        f"Command: `{report.command_line()}`",
        "",
        *[f"- {fact}" for fact in report.machine(None)],
        f"- {args.method}, {args.size} base + {args.experts} experts, shards of "
        f"{args.out_shard_size}, one thread a part; on this machine without Ray: "
        f"{reference_s:.1f} s",
        "",
        "| nodes | merge (s) | cluster start (s) | node | parts | read (GB) | written (GB) | "
        "through Ray (GB) | same bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for nodes, result in rows:
        for k, (node, entry) in enumerate(sorted(result["per_node"].items())):
            head = (
                f"| {nodes} | {result['merge_s']:.1f} | {result['start_s']:.1f} |"
                if k == 0
                else "| | | |"
            )
            lines.append(
                f"{head} {node[:8]} | {', '.join(entry['parts'])} | {entry['read'] / GB:.2f} | "
                f"{entry['written'] / GB:.2f} | {entry['ray'] / GB:.2f} | yes |"
            )
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    shutil.rmtree(args.work / "ray-out", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
