"""A merge in parts on a Ray cluster (``della merge RECIPE OUT --ray [ADDRESS] --parts N``).

Each part (``della_cli.parts``) is one Ray task, given the CPUs and memory it needs; Ray
schedules the tasks, reruns a task whose worker or node died (``max_retries``) or that failed
for a reason that may pass (``retry_exceptions``), and a rerun keeps the shards its killed
attempt finished (parts resume). Progress comes back through a Ray queue. A task writes its
shards into the parts folder beside OUT when its node sees the same folder as the driver (a
shared file system, found out by a probe file the driver writes there); otherwise it writes
into a scratch folder on its own node, and the driver pulls each shard from there as a stream
of chunks in Ray's object store (a generator task pinned to that node), checks its digest and
records it. The driver then assembles (``della_cli.assemble``): the same bytes as a merge on
one machine, whatever the number of nodes.

The recipe and any local model folders must be at the same paths on every node (a shared file
system); Hub models need nothing shared, each part downloads only the files it reads.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from della_cli.errors import HubError, MergeFailure, UsageError
from della_cli.io.journal import shard_digest
from della_cli.io.parts_folder import Manifest, manifest_name, open_parts_folder, parts_path
from della_cli.session import MergeOptions

PROBE_NAME = ".della-ray-probe"
CHUNK_BYTES = 64 << 20
TASK_RETRIES = 3


@dataclass(frozen=True)
class RayEvent:
    """What the driver hears: a part ``started`` (on a node, in a process; again when Ray
    retries it), ``merged`` some bytes, gave a ``warning``, ``finished``, or was ``pulled``
    to the driver."""

    kind: str
    part: str
    node: str = ""
    pid: int = 0
    bytes: int = 0
    message: str = ""


def run_on_ray(
    recipe,
    out: Path,
    options: MergeOptions,
    address: str | None = "auto",
    count: int | None = None,
    on_event: Callable[[RayEvent], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    gather: str = "auto",
    progress_slots: int = 1024,
):
    """Merge in ``count`` parts (default: one per alive node) as Ray tasks, then assemble.
    ``address``: the cluster (``auto``: the one this machine belongs to; None: keep the
    connection this process already has). ``gather``: ``auto`` (shared file system when the
    workers see the driver's parts folder, else pull) or ``pull`` (always through Ray).
    ``progress_slots``: how many progress messages may wait for the driver before a part
    waits for it to read them."""
    from della_cli.assemble import assemble

    started = time.perf_counter()
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        _connect(ray, address)
    try:
        alive = [node for node in ray.nodes() if node.get("Alive")]
        _check_cpus(alive, options.threads or 1)
        count = count or len(alive)
        memory = _part_memory(recipe, out, options, count)
        folder = open_parts_folder(out, create=True)
        nonce = secrets.token_hex(8)
        (folder / PROBE_NAME).write_text(nonce)
        tasks = _Tasks(recipe, out, options, count, memory, nonce, gather, progress_slots)
        _run_tasks(ray, tasks, on_event)
        (folder / PROBE_NAME).unlink(missing_ok=True)
    finally:
        if started_here:
            ray.shutdown()
    report = assemble(recipe, out, options, on_warning=on_warning)
    report.seconds = round(time.perf_counter() - started, 3)  # the parts and the assembly
    return report


def _check_cpus(alive: list[dict], cpus: int) -> None:
    """Refuse a part no node can hold: Ray would wait for such a node for ever."""
    largest = max((node.get("Resources", {}).get("CPU", 0) for node in alive), default=0)
    if cpus > largest:
        raise UsageError(
            f"--threads {cpus}: each part asks Ray for {cpus} CPUs, and the cluster's largest "
            f"node has {largest:g}; give at most --threads {int(largest)}"
        )


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--ray needs Ray, which is not installed: pip install 'della-cli[ray]'"
        ) from None
    return ray


def _connect(ray, address: str | None) -> None:
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as error:
        raise UsageError(
            f"no Ray cluster at '{address}' ({error}); start one with `ray start --head`, or "
            "give its address: --ray HOST:6379"
        ) from None


def _part_memory(recipe, out: Path, options: MergeOptions, count: int) -> list[int]:
    """Each part's working memory (the plan, made on the driver before anything runs, also
    refuses a recipe that cannot be merged)."""
    from della_cli.errors import PlanError
    from della_cli.part_merge import plan_parts_report

    report, parts = plan_parts_report(recipe, out, options, count)
    if not parts:
        raise PlanError(report.problems)
    return [part.working_memory_bytes for part in parts]


@dataclass(frozen=True)
class _Tasks:
    """What the tasks of one merge share."""

    recipe: Path
    out: Path
    options: MergeOptions
    count: int
    memory: list[int]
    nonce: str
    gather: str
    progress_slots: int


def _run_tasks(ray, tasks: _Tasks, on_event) -> None:
    """One task per part; wait for all, relaying progress; pull what was not shared."""
    from ray.util.queue import Queue

    emit = on_event or (lambda event: None)
    queue = Queue(maxsize=tasks.progress_slots)
    task = ray.remote(_part_task)
    retry = {"max_retries": TASK_RETRIES, "retry_exceptions": [MergeFailure, HubError, OSError]}
    options = replace(tasks.options, resume=True, progress=False)
    recipe, out = Path(tasks.recipe).resolve(), tasks.out.resolve()
    pending = {}
    for number in range(1, tasks.count + 1):
        needs = {"num_cpus": options.threads or 1, "memory": max(tasks.memory[number - 1], 1)}
        ref = task.options(**retry, **needs).remote(
            recipe, out, options, number, tasks.count, queue, tasks.nonce, tasks.gather
        )
        pending[ref] = number
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.1)
            _relay(queue, emit)
            for ref in ready:
                pending.pop(ref)
                result = _result(ray, ref)
                if not result["shared"]:  # while the other parts run
                    _pull(ray, result, tasks.out)
                    emit(RayEvent("pulled", result["part"], result["node"], bytes=result["bytes"]))
        _relay(queue, emit)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _result(ray, ref) -> dict:
    """A finished task's result; a della error it raised (a user's mistake, or a failure
    that outlived the retries) is raised again here as itself."""
    from della_cli.errors import DellaError

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, DellaError):
            raise cause from None
        raise MergeFailure(f"a part failed on the Ray cluster: {cause or error}") from None
    except ray.exceptions.RayError as error:
        raise MergeFailure(
            f"a part failed on the Ray cluster after {TASK_RETRIES} retries: "
            f"{str(error).splitlines()[0]}"
        ) from None


def _relay(queue, emit) -> None:
    while not queue.empty():
        for item in queue.get_nowait_batch(queue.qsize()):
            emit(RayEvent(**item))


def _part_task(recipe, out, options, number, count, queue, nonce, gather) -> dict:
    """A part, run by a Ray worker: into the shared parts folder, or a scratch one here."""
    import ray

    from della_cli.io.dtypes import itemsize
    from della_cli.part_merge import run_part

    node = ray.get_runtime_context().get_node_id()
    label = f"{number}/{count}"
    queue.put({"kind": "started", "part": label, "node": node, "pid": os.getpid()})
    target = Path(out)
    probe = parts_path(target) / PROBE_NAME
    shared = gather == "auto" and probe.is_file() and probe.read_text() == nonce
    if not shared:
        target = Path(tempfile.gettempdir()) / "della-ray" / nonce / str(number) / target.name

    def progress(job) -> None:
        size = job.numel * itemsize(job.out_dtype)
        queue.put({"kind": "merged", "part": label, "node": node, "bytes": size})

    def warn(message: str) -> None:
        queue.put({"kind": "warning", "part": label, "node": node, "message": message})

    report = run_part(recipe, target, options, number, count, progress, warn)
    done = f"{report.computed_shards} shard(s) computed, {report.kept_shards} kept"
    queue.put({"kind": "finished", "part": label, "node": node, "message": done})
    manifest = Manifest.load(parts_path(target) / manifest_name(number, count))
    return {
        "part": label,
        "node": node,
        "shared": shared,
        "folder": str(parts_path(target)),
        "manifest": manifest.__dict__ if manifest else None,
        "name": manifest_name(number, count),
        "bytes": report.bytes,
    }


def _read_chunks(path: str):
    """The bytes of a shard on this node, in chunks (a Ray generator task)."""
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def _remove_scratch(folder: str) -> None:
    """Remove a part's scratch folder, and the merge's once no part's is left in it."""
    part = Path(folder).parent
    shutil.rmtree(part, ignore_errors=True)
    with contextlib.suppress(OSError):
        part.parent.rmdir()


def _pull(ray, result: dict, out: Path) -> None:
    """Copy a part's shards from its node into the driver's parts folder, each checked
    against the digest its part recorded, then the part's manifest; then clear the scratch."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    on_node = NodeAffinitySchedulingStrategy(result["node"], soft=False)
    folder = open_parts_folder(out, create=True)
    manifest = Manifest(**result["manifest"])
    reader = ray.remote(_read_chunks).options(scheduling_strategy=on_node, num_returns="streaming")
    for name, recorded in manifest.shards.items():
        digest = shard_digest()
        temporary = folder / f".{name}.pull"
        with temporary.open("wb") as handle:
            for ref in reader.remote(f"{result['folder']}/{name}"):
                chunk = ray.get(ref)
                handle.write(chunk)
                digest.update(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if digest.hexdigest() != recorded:
            temporary.unlink()
            raise MergeFailure(f"shard {name} of part {result['part']} changed on its way here")
        os.replace(temporary, folder / name)
    manifest.save(folder, result["name"])
    ray.get(
        ray.remote(_remove_scratch).options(scheduling_strategy=on_node).remote(result["folder"])
    )
