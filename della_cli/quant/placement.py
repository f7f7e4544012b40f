"""Where a quantized input is dequantized: by the reader on the CPU, or on the CUDA device.

Decided in the plan, once, from the device and each job's backend: on CUDA, a torch job's
quantized inputs travel to the device as stored (FP8 bytes or MXFP4 blocks with their
scales) and the torch rules dequantize them there (``quant.torch_rules``); everywhere else the
reader dequantizes rows with numpy as it reads them. Both give the same float32 bits, so the
choice changes what is copied, never the output. Rows the plan crops, pads or re-indexes to a
vocabulary (``Source.rows``, ``Source.aligned``) stay with the reader.
"""

from __future__ import annotations

import dataclasses

from della_cli.io.reader import ModelReader
from della_cli.plan_types import BASE, Plan, Source, TensorJob


def place_dequantization(
    plan: Plan, base: ModelReader | None, experts: list[ModelReader], on_device: bool
) -> Plan:
    """``plan`` with the quantized inputs of its torch jobs marked to be dequantized on the
    device when ``on_device`` (a CUDA merge); ``plan`` itself otherwise."""
    if not on_device:
        return plan
    readers = {BASE: base, **dict(enumerate(experts))}

    def placed(source: Source) -> Source:
        scheme = getattr(readers.get(source.model), "scheme", None)
        stored = scheme is not None and source.tensor in scheme.weights
        movable = stored and source.rows is None and not source.aligned
        return dataclasses.replace(source, on_device=True) if movable else source

    def job_placed(job: TensorJob) -> TensorJob:
        if job.action != "merge" or job.kernel is None or job.kernel.backend != "torch":
            return job
        experts_placed = tuple(placed(source) for source in job.experts)
        return dataclasses.replace(job, reference=placed(job.reference), experts=experts_placed)

    return dataclasses.replace(plan, jobs=[job_placed(job) for job in plan.jobs])
