"""The torch backend applied to blocks: what the plan's ``torch/merge`` kernel runs.

``backends.torch_backend`` (and torch with it) is imported the first time a job needs it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np

from della_cli.engine.shared import BlockTask
from della_cli.engine.threads import ThreadBudget
from della_cli.methods import MethodSpec
from della_cli.methods.randomness import Draws
from della_cli.plan import TensorJob

if TYPE_CHECKING:
    from della_cli.backends.torch_backend import Mask, TorchBackend
    from della_cli.engine.reporting import Reporter


class TorchJobs:
    """Blocks on ``device`` in the compute dtype, through the reference functions.
    ``fallback``: the CPU worker that takes blocks a device had no memory for."""

    def __init__(
        self,
        device: str,
        compute_dtype: str,
        method: MethodSpec,
        threads: ThreadBudget,
        fallback: bool = False,
    ):
        self.threads = threads
        self.device = device
        self.compute_dtype = compute_dtype
        self.method = method
        self.fallback = fallback
        self._backend: TorchBackend | None = None
        self._making = threading.Lock()

    @property
    def backend(self) -> TorchBackend:
        """Made on first use, by whichever thread (the reader stages blocks on CUDA)."""
        with self._making:
            if self._backend is None:
                from della_cli.backends.torch_backend import TorchBackend

                self._backend = TorchBackend(self.device, self.compute_dtype, self.fallback)
                if self.device == "cpu":
                    self.threads.limit_torch()
        return self._backend

    def block(
        self,
        task: BlockTask,
        loaded: list[np.ndarray],
        masks: list[Mask] | None,
        reporter: Reporter,
    ) -> np.ndarray:
        """The output rows of one block of a ``torch/merge`` job, in the output dtype."""
        job = task.job
        backend = self.backend
        base, *models = backend.inputs(loaded)
        nonfinite = backend.nonfinite_later([base, *models])
        steps = job.kernel.experts
        uniform = None
        if self.method.is_random:
            start = task.start * base.shape[1]
            uniform = lambda position: Draws(steps[position].key, start)  # noqa: E731
        merged = backend.merge(
            self.method,
            base,
            models,
            [step.params for step in steps],
            job.kernel.shared,
            uniform,
            masks,
            job.out_dtype,
        )
        flagged = nonfinite()
        if flagged is not None:
            reporter.nonfinite(job, flagged)
        return merged

    def stage(self, loaded: list[np.ndarray]) -> None:
        """Start a block's copy to the device ahead of its merge (CUDA only)."""
        self.backend.stage(loaded)

    def keep_mask(self, expert: np.ndarray, reference: np.ndarray, params, gamma):
        """A whole-tensor selection (TIES, breadcrumbs), as a tensor on the device."""
        return self.backend.keep_mask(expert, reference, params.density, gamma)

    def prepare(self, job: TensorJob, blocks: Callable[[], Iterable[list[np.ndarray]]]):
        """What a catalog method needs of a whole tensor before merging it, from passes over
        its row blocks: ``blocks()`` reads them afresh (the raw rows of the reference and the
        experts, as ``RowLoader.load`` gives them), one at a time."""

        def on_device():
            return (self.method_inputs(job, loaded) for loaded in blocks())

        params = [step.params for step in job.kernel.experts]
        return self.backend.prepare(job.kernel, params, on_device, job.numel)

    def streamed_block(
        self, task: BlockTask, loaded: list[np.ndarray], statistics, reporter: Reporter
    ) -> np.ndarray:
        """One output block of a catalog method's job, in the output dtype."""
        job = task.job
        base, models = self.method_inputs(job, loaded)
        inputs = [models[0] if base is None else base, *models]
        nonfinite = self.backend.nonfinite_later(inputs)
        params = [step.params for step in job.kernel.experts]
        merged = self.backend.streamed(job.kernel, params, statistics, base, models, job.out_dtype)
        flagged = nonfinite()
        if flagged is not None:
            reporter.nonfinite(job, flagged)
        return merged

    def method_inputs(self, job: TensorJob, loaded: list[np.ndarray]):
        """(base or None, models) of a block on the device, each in its tensor's shape and
        its stored dtype (the backend widens them in row chunks): the base is None where the
        job's reference is one of the models (no base_model)."""
        rows = loaded[0].shape[0]
        shape = (rows, *job.shape[1:]) if len(job.shape) > 1 else job.shape
        reference, *experts = (t.reshape(shape) for t in self.backend.stored_inputs(loaded))
        return (reference if job.has_base else None), experts
