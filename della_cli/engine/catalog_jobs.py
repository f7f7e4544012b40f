"""The CPU backend's catalog kernels applied to a job's blocks (``cpu/<method>``): the
spherical and stock methods (slerp, nuslerp, multislerp, karcher, model_stock;
``backends.cpu.spherical_methods``), the selecting ones (sce, ram, ramplus_tl, arcee_fusion;
``backends.cpu.catalog``), ``cpu/nearswap`` (``backends.cpu.nearswap``, one pass entry by
entry), and ``cpu/passthrough``, the rows as stored, handed on to the writer.

The counterpart of ``TorchJobs.prepare`` and ``TorchJobs.streamed_block`` for these kernels:
blocks stay numpy arrays as stored; the output block is written into a buffer of the engine's
(``output_buffer``). arcee_fusion's merge pass is the torch backend's (its importance is a
softmax, torch's; its selection was made here), except on a small tensor, whose importances'
keys were kept from its selection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import numpy as np

from della_cli.engine.shared import BlockTask
from della_cli.engine.threads import ThreadBudget
from della_cli.io.dtypes import NUMPY_DTYPES
from della_cli.kernels import CPU_SPHERICAL_METHODS
from della_cli.methods import streamed
from della_cli.plan import TensorJob

if TYPE_CHECKING:
    from della_cli.engine.reporting import Reporter
    from della_cli.engine.torch_jobs import TorchJobs

Blocks = Callable[[], Iterable[list[np.ndarray]]]


class CatalogJobs:
    """Runs a ``cpu/<method>`` job's passes; ``torch`` for arcee_fusion's merge pass."""

    def __init__(
        self,
        torch: TorchJobs,
        output_buffer: Callable[[BlockTask, tuple], np.ndarray],
        threads: ThreadBudget,
        helpers: Callable[[], Executor | None] = lambda: None,
    ):
        self.torch = torch
        self.output_buffer = output_buffer
        self.threads = threads
        self.helpers = helpers  # the engine's helper threads while it runs
        # arcee_fusion's kept importance keys, reused by each tensor (one is merged at a time)
        self._keys = np.empty(0, dtype=np.uint32)

    def _helper_threads(self) -> tuple[Executor | None, int]:
        """The engine's helper threads while it runs, and how many of them to use."""
        helpers = self.helpers()
        return helpers, self.threads.chunk_helpers if helpers is not None else 0

    def prepare(self, job: TensorJob, blocks: Blocks):
        """What the job's method needs of the whole tensor, from passes over its blocks
        (``blocks()``: each block's raw rows, reference first, as ``RowLoader.load`` gives
        them)."""
        self.threads.limit_numba()
        name = job.kernel.name
        if name in CPU_SPHERICAL_METHODS:
            return _spherical_prepare(job, blocks)
        from della_cli.backends.cpu import arcee, catalog  # numba: imported only when needed

        values = job.kernel.settings
        if name == "sce":
            return catalog.sce_prepare(values["select_topk"], blocks, job.numel, job.shape)
        if name == "ramplus_tl":
            return catalog.ramplus_tl_prepare(values, blocks, len(job.experts))
        if name == "arcee_fusion":
            helpers, count = self._helper_threads()
            self.threads.limit_torch_per_caller()
            if self._keys.size < job.numel and streamed.keys_kept(name, job.numel):
                self._keys = np.empty(job.numel, dtype=np.uint32)  # the largest kept so far
            return arcee.arcee_fusion_prepare(
                blocks, job.numel, job.shape, None, helpers, count, self._keys
            )
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
        if name == "passthrough":  # the one model's rows as stored (loaded[0] is them too)
            return self._passed_on(task, loaded[-1], reporter)
        out = self.output_buffer(task, loaded[0].shape)
        self.threads.limit_numba()
        if name in CPU_SPHERICAL_METHODS:
            out, flags = _spherical_apply(job, loaded, state, out)
        elif name == "nearswap":
            out, flags = _nearswap_apply(job, loaded, out)
        else:
            flags = self._selecting_apply(task, loaded, state, out)
        if flags.any():
            reporter.nonfinite(job, [bool(flag) for flag in flags])
        return out

    def _selecting_apply(self, task: BlockTask, loaded: list[np.ndarray], state, out):
        """One block of sce, ram, ramplus_tl or arcee_fusion into ``out``; the non-finite
        flags. arcee_fusion's shares its rows with the engine's helper threads."""
        from della_cli.backends.cpu import arcee, catalog

        job = task.job
        name = job.kernel.name
        if name == "sce":
            return catalog.sce_apply(state, loaded, out)
        if name == "arcee_fusion":
            first = task.start * (loaded[0].size // max(loaded[0].shape[0], 1))
            helpers, count = self._helper_threads()
            return arcee.arcee_fusion_apply(state, loaded, first, out, helpers, count)
        lambdas = state if name == "ramplus_tl" else None
        return catalog.ram_apply(lambdas, job.kernel.settings["epsilon"], loaded, out)

    def _passed_on(self, task: BlockTask, rows: np.ndarray, reporter: Reporter) -> np.ndarray:
        """A passthrough block: its rows themselves, handed to the writer (the reader placed
        them for the write, ``relays_rows``; at ~1.1B the copy took a third of the merging
        thread's time), or copied where the output's dtype differs."""
        job = task.job
        reporter.copied_values(job, rows, "the merged tensor may hold them too")
        if rows.dtype == NUMPY_DTYPES[job.out_dtype]:
            return rows
        out = self.output_buffer(task, rows.shape)
        np.copyto(out, rows)
        return out


def relays_rows(job: TensorJob) -> bool:
    """Whether a job's blocks are written as they were read (``CatalogJobs._passed_on``):
    passthrough on the CPU backend. The engine gives their input buffers back only once
    written (``MergeEngine.release``)."""
    kernel = job.kernel
    return job.action == "merge" and kernel.backend == "cpu" and kernel.name == "passthrough"


def _nearswap_apply(job: TensorJob, loaded: list[np.ndarray], out: np.ndarray):
    """One block of nearswap (the base first, then the one model) into ``out``; the flags."""
    from della_cli.backends.cpu import nearswap

    base, other = loaded
    return nearswap.nearswap_block(base, other, job.kernel.settings["t"], out.dtype, out)


def _spherical_prepare(job: TensorJob, blocks: Blocks) -> np.ndarray | None:
    """The coefficients of the whole tensor, from a pass over its blocks."""
    from della_cli.backends.cpu import spherical_methods

    kernel = job.kernel
    weights = [step.params.weight for step in kernel.experts]

    def split():
        for loaded in blocks():
            reference, *experts = _as_rows(loaded)
            yield reference, experts

    return spherical_methods.prepare(kernel.name, kernel.settings, weights, split, job.has_base)


def _spherical_apply(job: TensorJob, loaded: list[np.ndarray], state, out: np.ndarray):
    """One output block and its inputs' non-finite flags."""
    from della_cli.backends.cpu import spherical_methods

    kernel = job.kernel
    weights = [step.params.weight for step in kernel.experts]
    reference, *experts = _as_rows(loaded)
    return spherical_methods.apply(
        kernel.name,
        kernel.settings,
        weights,
        state,
        reference,
        experts,
        job.has_base,
        NUMPY_DTYPES[job.out_dtype],
        out,
    )


def _as_rows(loaded: list[np.ndarray]) -> list[np.ndarray]:
    """A block's arrays as (rows, row length): a 1-D tensor's block is one row."""
    return [
        array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
        for array in loaded
    ]
