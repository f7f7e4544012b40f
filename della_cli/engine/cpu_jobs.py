"""The CPU backend's kernels applied to blocks: what the plan's ``cpu/*`` kernels run.

Blocks are numpy arrays of the stored dtypes; nothing here imports torch, and numba only
where the job's kernel is ``cpu/block`` (``backends.cpu.block`` and ``select``).
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import Executor

import numpy as np

from della_cli.backends.cpu import weighted_sum
from della_cli.engine.shared import BlockTask, Merged, reference_expert
from della_cli.engine.threads import ThreadBudget
from della_cli.io import streamed_sum
from della_cli.io.dtypes import NUMPY_DTYPES
from della_cli.kernels import MAGPRUNE, RANDOM, WINDOW
from della_cli.methods import MethodSpec, Rescale
from della_cli.methods.randomness import Draws
from della_cli.plan import TensorJob


class CpuJobs:
    """Runs the CPU kernels of a merge's jobs (``method`` is the recipe's; the merge-wide
    parameters are each job's, settled in its kernel)."""

    def __init__(self, method: MethodSpec, threads: ThreadBudget):
        self.method = method
        self.threads = threads
        self._stream_scratch = streamed_sum.Scratch()
        self._sums: dict[str, weighted_sum.WeightedSum] = {}
        self._compiler: subprocess.Popen | None = None  # compiling the kernels, if it is
        self._stand_ins: set[str] = set()  # cpu/block jobs on torch while they compile

    def start_compiling(self, jobs: list[TensorJob], inputs) -> None:
        """Where the ``cpu/block`` and ``cpu/<method>`` jobs' kernels are not in numba's
        cache, compile them in a child process (``backends.cpu.warm``) rather than make the
        merge wait for them."""
        pairs, selects, catalogs = set(), set(), set()
        for job in jobs:
            if job.kernel is not None and job.kernel.compiled and job.kernel.streamed:
                catalogs.add((self.stored_dtype(job, inputs), job.out_dtype))
            if job.kernel is None or job.kernel.name != "block":
                continue
            dtype = self.stored_dtype(job, inputs)
            pairs.add((dtype, job.out_dtype))
            if any(step.sparsify == WINDOW for step in job.kernel.experts):
                selects.add(dtype)
        if not (pairs or catalogs) or os.environ.get("DELLA_COMPILE_INLINE"):
            return
        from della_cli.backends.cpu import warm  # numba: imported only when needed

        if warm.missing(pairs, selects, frozenset(catalogs)):
            self._compiler = warm.start(pairs, selects, frozenset(catalogs))

    @staticmethod
    def stored_dtype(job: TensorJob, inputs) -> str:
        """The dtype of a job's first expert as its rows arrive: fitted rows in the compute
        dtype, float32."""
        first = job.experts[0]
        if first.rows is not None:
            return "F32"
        return inputs.reader(first.model).tensors[first.tensor].dtype

    def compiling(self) -> bool:
        """Whether the kernels are still being compiled beside the merge."""
        return self._compiler is not None and self._compiler.poll() is None

    def stands_in(self, task: BlockTask) -> bool:
        """Whether the torch reference merges this block of a ``cpu/block`` or ``cpu/<method>``
        job: one begun while its kernels compile, to its last block (the same bytes)."""
        name = task.job.name
        if task.start == 0 and task.job.kernel.compiled and self.compiling():
            self._stand_ins.add(name)
        standing_in = name in self._stand_ins
        if task.last:
            self._stand_ins.discard(name)
        return standing_in

    def sum_spec(self, job: TensorJob) -> weighted_sum.WeightedSum:
        """What a weighted-sum job sums (made once per job: its chunks ask again and again)."""
        spec = self._sums.get(job.name)
        if spec is None:
            spec = self._sums[job.name] = weighted_sum.WeightedSum(
                weights=tuple(step.params.weight for step in job.kernel.experts),
                on_deltas=self.method.on_deltas,
                normalize=job.kernel.shared.normalize,
                lambda_=job.kernel.shared.lambda_,
            )
        return spec

    def weighted_sum(
        self,
        job: TensorJob,
        loaded: list[np.ndarray],
        out: np.ndarray,
        helpers: Executor | None = None,
        helper_count: int = 0,
    ) -> Merged:
        """A block of a weighted sum (``cpu/weighted_sum``, ``cpu/chunked_sum``), its spans
        split among ``helpers`` where given."""
        return weighted_sum.merge_block(
            loaded[0],
            loaded[1:],
            self.sum_spec(job),
            NUMPY_DTYPES[job.out_dtype],
            helpers,
            helper_count,
            out=out,
        )

    def streamed_sum(self, task: BlockTask, inputs, out: np.ndarray) -> Merged:
        """A chunk of a ``cpu/streamed_sum`` job, whose rows the kernel reads from the files."""
        job = task.job
        spec = self.sum_spec(job)
        experts = [
            inputs.reader(source.model).row_span(source.tensor, task.start)
            for source in job.experts
        ]
        base = reference_expert(job)
        if base is None:
            base = inputs.reader(job.reference.model).row_span(job.reference.tensor, task.start)
        flags = streamed_sum.merge(
            out,
            base,
            experts,
            spec.weights,
            spec.on_deltas,
            None if spec.divisor is None else float(spec.divisor),
            spec.lambda_,
            self._stream_scratch,
        )
        return out, flags

    def block(
        self,
        task: BlockTask,
        loaded: list[np.ndarray],
        masks: list[np.ndarray] | None,
        out: np.ndarray,
    ) -> Merged:
        """A block of a ``cpu/block`` job, straight from the inputs as stored."""
        from della_cli.backends.cpu import block  # numba: imported only when needed

        modes = {RANDOM: block.RANDOM, MAGPRUNE: block.MAGPRUNE, WINDOW: block.MASK}
        plans = []
        for step in task.job.kernel.experts:
            mode = modes.get(step.sparsify, block.KEEP_ALL)
            params = step.params
            density = params.density if mode in (block.RANDOM, block.MAGPRUNE) else 1.0
            epsilon = (params.epsilon or 0.0) if mode == block.MAGPRUNE else 0.0
            random = mode in (block.RANDOM, block.MAGPRUNE)
            key_words = Draws(step.key).key_words if random else (0, 0, 0)
            plans.append(block.ExpertPlan(mode, density, epsilon, params.weight, key_words))
        n = loaded[0].shape[1]
        self.threads.limit_numba()
        return block.merge_block(
            loaded[0],
            loaded[1:],
            plans,
            masks,
            start=task.start * n,
            rescale=task.job.kernel.shared.rescale is Rescale.KEEP_PROB,
            on_deltas=self.method.on_deltas,
            consensus=self.method.sign_consensus,
            normalize=task.job.kernel.shared.normalize,
            lambda_=task.job.kernel.shared.lambda_,
            out_dtype=NUMPY_DTYPES[task.job.out_dtype],
            out=out,
        )

    def keep_mask(self, expert: np.ndarray, reference: np.ndarray, window: tuple[int, int]):
        """A whole-tensor selection (TIES, breadcrumbs) from the two inputs as stored."""
        from della_cli.backends.cpu import select  # numba: imported only when needed

        self.threads.limit_numba()
        low, high = window
        return select.window_keep_mask(expert, reference, low, high)
