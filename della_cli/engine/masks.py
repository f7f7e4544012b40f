"""Whole-tensor selections made before a job is merged in blocks: the TIES trim and the
breadcrumbs window, whose ranks span the whole tensor, so that every later step is row-wise."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from della_cli.engine.cpu_jobs import CpuJobs
from della_cli.engine.shared import rows_shape
from della_cli.kernels import WINDOW
from della_cli.methods import Sparsifier
from della_cli.plan import TensorJob

if TYPE_CHECKING:
    from della_cli.engine import MergeEngine


def global_keep_masks(
    engine: MergeEngine, job: TensorJob, on_torch: bool, whole: list[np.ndarray] | None
) -> list | None:
    """The job's keep masks, (rows, n) each, by the CPU backend or, ``on_torch``, the torch
    one; made one expert at a time so only one full task vector is alive. ``whole``: the
    tensor's rows already loaded (reference first), when it is one block: a small tensor's
    inputs are then read once, not twice."""
    steps = job.kernel.experts
    if not any(step.sparsify == WINDOW for step in steps):
        return None
    if whole is not None and not on_torch and _one_call(job, whole):
        return _small_tensor_masks(engine, job, whole)
    total_rows, _ = rows_shape(job.shape)
    rows = engine.rows
    # as stored: smaller than widened
    reference = rows.read_reference_rows(job, 0, total_rows) if whole is None else whole[0]
    masks = []
    for index, (source, step) in enumerate(zip(job.experts, steps, strict=True)):
        if whole is None:
            expert = rows.read_expert_rows(job, source, 0, total_rows)
        else:
            expert = whole[1 + index]
        if step.sparsify != WINDOW:
            masks.append(np.ones(expert.shape, dtype=np.bool_))
        elif not on_torch:
            masks.append(engine.cpu.keep_mask(expert, reference, step.window))
        else:
            magnitude = engine.recipe.method.sparsifier is Sparsifier.MAGNITUDE
            gamma = None if magnitude else (step.params.gamma or 0.0)
            masks.append(engine.workers.keep_mask(job, expert, reference, step, gamma))
        del expert
    return masks


def _one_call(job: TensorJob, whole: list[np.ndarray]) -> bool:
    """Whether the CPU backend selects this tensor's masks in one call: a small one (its
    keys and candidates, 8 bytes an entry, are held), its inputs all of the reference's
    dtype (an expert's vocabulary-fitted rows are float32)."""
    dtype = whole[0].dtype
    return job.numel < CpuJobs.SMALL_SELECTION_BELOW and all(a.dtype == dtype for a in whole)


def _small_tensor_masks(engine: MergeEngine, job: TensorJob, whole: list[np.ndarray]) -> list:
    """A small tensor's masks, every expert's in one call of the CPU backend: its inputs are
    loaded already and a call per expert cost more than the selection. An expert kept whole
    gets the window of every rank."""
    every_rank = (0, job.numel)
    steps = job.kernel.experts
    windows = [step.window if step.sparsify == WINDOW else every_rank for step in steps]
    return list(engine.cpu.keep_masks(whole[1:], whole[0], windows))
