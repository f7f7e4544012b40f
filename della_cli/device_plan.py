"""Which device merges each tensor, and whether a block fits each device's free memory.

A merge on several devices (``della merge --devices cuda:0,cuda:1``) gives every job (merge or
copy) to one device at plan time: each job in plan order goes to the device with the fewest
bytes so far (ties to the lowest index), where a job's bytes are those it reads and writes.
That balances the devices' reads, copies and writes (a merge on a GPU is bound by them, not by
its arithmetic) and interleaves the devices along the plan, so that the writer, which writes in
plan order, always has work from each of them. The same plan gives the same devices every
time; each job is merged by the same code on whichever device, so the output does not depend
on how many there are (``tests/unit/test_gpupath_devices.py``).

On CUDA the plan also sizes the blocks to the memory each device has free: a block of the
engine's size is halved until the largest job's working set on that device fits, and a device
that cannot hold even the smallest block refuses the plan in one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from della_cli.io.dtypes import itemsize
from della_cli.methods.streamed import statistics_bytes
from della_cli.plan_types import Plan, TensorJob
from della_cli.sizes import human_size

# The smallest block the plan lowers a CUDA block to (1M entries: a few MiB per input).
MIN_DEVICE_BLOCK_ELEMENTS = 1 << 20


def job_bytes(job: TensorJob) -> int:
    """Bytes a job reads and writes: each input (reference and experts) and its output, at
    the output's item size (the inputs' own are not in the plan; they match in practice)."""
    inputs = 1 + len(job.experts) if job.action == "merge" else 1
    return job.numel * itemsize(job.out_dtype) * (inputs + 1)


def spread_jobs(plan: Plan, devices: list[str]) -> Plan:
    """``plan`` with each job given to one of ``devices`` (``TensorJob.device``, an index
    into ``Plan.devices``), balanced by bytes and deterministic (see the module's note)."""
    if len(devices) == 1:
        return dataclasses.replace(plan, devices=tuple(devices))
    loads = [0] * len(devices)
    jobs = []
    for job in plan.jobs:
        target = min(range(len(devices)), key=lambda index: (loads[index], index))
        loads[target] += job_bytes(job)
        jobs.append(dataclasses.replace(job, device=target))
    return dataclasses.replace(plan, jobs=jobs, devices=tuple(devices))


def device_loads(plan: Plan) -> list[dict]:
    """Per device of the plan: its name, the tensors it merges or copies and their bytes."""
    loads = [{"device": name, "tensors": 0, "bytes": 0} for name in plan.devices]
    for job in plan.jobs:
        loads[job.device]["tensors"] += 1
        loads[job.device]["bytes"] += job_bytes(job)
    return loads


def device_memory_bytes(plan: Plan, device: int, block_elements: int, whole: bool) -> int:
    """The most device memory one of the device's jobs holds at once: a block of each input
    as stored (and the next block's, copied ahead) and widened to the compute dtype, the task
    vectors and a few temporaries, a catalog method's statistics, and for trim methods
    (``whole``) the whole tensor's magnitudes and keep masks (made on the device before its
    blocks). Copies stay on the host."""
    compute = itemsize(plan.compute_dtype)
    worst = 0
    for job in plan.jobs:
        if job.device != device or job.action != "merge":
            continue
        stored, experts = itemsize(job.out_dtype), len(job.experts)
        row = job.numel // max(job.shape[0], 1) if len(job.shape) > 1 else job.numel
        block = min(job.numel, max(row, block_elements // max(row, 1) * row))
        # this block's inputs as stored, and the next block's, staged while it merges
        need = block * (2 * (experts + 1) * stored + (2 * experts + 5) * compute)
        kernel = job.kernel
        if kernel is not None and kernel.passes > 1:
            need += statistics_bytes(kernel.name, kernel.settings, job.shape, experts + 1)
        if whole:
            need += job.numel * (2 * compute + experts)
        worst = max(worst, need)
    return worst


def fit_device_blocks(
    plan: Plan, block_elements: int, whole: bool, free_bytes: Callable[[str], int | None]
) -> tuple[int, list[dict], list[str]]:
    """The block size every CUDA device of the plan can hold (``block_elements`` halved as
    needed, down to ``MIN_DEVICE_BLOCK_ELEMENTS``), each device's figures at that size
    (name, needed and free bytes), and a problem line per device that cannot hold even the
    smallest block. ``free_bytes``: a device's free memory now (``torch.cuda.mem_get_info``;
    tests give a figure)."""
    cuda = [i for i, name in enumerate(plan.devices) if name.startswith("cuda")]
    free = {index: free_bytes(plan.devices[index]) for index in cuda}
    block = block_elements

    def fits(size: int) -> bool:
        return all(
            free[i] is None or device_memory_bytes(plan, i, size, whole) <= free[i] for i in cuda
        )

    while not fits(block) and block // 2 >= MIN_DEVICE_BLOCK_ELEMENTS:
        block //= 2
    figures, problems = [], []
    for index in cuda:
        need = device_memory_bytes(plan, index, block, whole)
        name = plan.devices[index]
        figures.append({"device": name, "needed_bytes": need, "free_bytes": free[index]})
        if free[index] is not None and need > free[index]:
            problems.append(
                f"{name} has {human_size(free[index])} free but the merge needs about "
                f"{human_size(need)} there even in blocks of {block:,} entries; free the "
                "device, use another one or more of them (--devices), or --device cpu"
            )
    return block, figures, problems
