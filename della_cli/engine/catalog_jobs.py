"""The CPU backend's catalog kernels applied to a job's blocks: ``cpu/sce``, ``cpu/ram``,
``cpu/ramplus_tl`` and ``cpu/arcee_fusion`` (``backends.cpu.catalog``), and
``cpu/passthrough``, a copy of the rows as stored.

The counterpart of ``TorchJobs.prepare`` and ``TorchJobs.streamed_block`` for these kernels:
blocks stay numpy arrays as stored; the output block is written into a buffer of the engine's
(``output_buffer``). arcee_fusion's merge pass is the torch backend's (its importance is a
softmax, torch's; its selection was made here), except on a small tensor, whose importances'
keys were kept from its selection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np

from della_cli.engine.shared import BlockTask
from della_cli.plan import TensorJob

if TYPE_CHECKING:
    from della_cli.engine.reporting import Reporter
    from della_cli.engine.torch_jobs import TorchJobs


class CatalogJobs:
    """Runs a ``cpu/<method>`` job's passes; ``torch`` for arcee_fusion's merge pass."""

    def __init__(self, torch: TorchJobs, output_buffer: Callable[[BlockTask, tuple], np.ndarray]):
        self.torch = torch
        self.output_buffer = output_buffer

    def prepare(self, job: TensorJob, blocks: Callable[[], Iterable[list[np.ndarray]]]):
        """What the job's method needs of the whole tensor, from passes over its blocks."""
        from della_cli.backends.cpu import catalog

        values = job.kernel.settings
        name = job.kernel.name
        if name == "sce":
            return catalog.sce_prepare(values["select_topk"], blocks, job.numel, job.shape)
        if name == "ramplus_tl":
            return catalog.ramplus_tl_prepare(values, blocks, len(job.experts))
        if name == "arcee_fusion":
            return catalog.arcee_fusion_prepare(blocks, job.numel, job.shape)
        raise ValueError(f"cpu/{name} makes no pass before its merge")

    def streamed_block(
        self, task: BlockTask, loaded: list[np.ndarray], state, reporter: Reporter
    ) -> np.ndarray:
        """One output block of the job, in the output dtype, as (rows, row length)."""
        job = task.job
        name = job.kernel.name
        if name == "arcee_fusion" and (state is None or state["keys"] is None):
            threshold = None if state is None else state["threshold"]  # None: an empty tensor
            return self.torch.streamed_block(task, loaded, threshold, reporter)
        out = self.output_buffer(task, loaded[0].shape)
        if name == "passthrough":  # the one model's rows as stored (loaded[0] is them too)
            np.copyto(out, loaded[-1])
            reporter.copied_values(job, out, "the merged tensor may hold them too")
            return out
        from della_cli.backends.cpu import catalog

        if name == "sce":
            flags = catalog.sce_apply(state, loaded, out)
        elif name == "arcee_fusion":
            first = task.start * (loaded[0].size // max(loaded[0].shape[0], 1))
            flags = catalog.arcee_fusion_apply(state, loaded, first, out)
        else:
            lambdas = state if name == "ramplus_tl" else None
            flags = catalog.ram_apply(lambdas, job.kernel.settings["epsilon"], loaded, out)
        if flags.any():
            reporter.nonfinite(job, [bool(flag) for flag in flags])
        return out
