"""Whole-tensor selections made before a job is merged in blocks: the TIES trim and the
breadcrumbs window, whose ranks span the whole tensor, so that every later step is row-wise."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

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
