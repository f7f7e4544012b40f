"""The CPU backend's kernels applied to blocks: what the plan's ``cpu/*`` kernels run.

Blocks are numpy arrays of the stored dtypes; nothing here imports torch, and numba only
where a job runs a CPU kernel (``backends.cpu.block``, ``select`` and ``weighted_sum``).
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import numpy as np

from della_cli.engine.shared import BlockTask, Merged, reference_expert
from della_cli.engine.threads import ThreadBudget
from della_cli.io import streamed_sum
from della_cli.io.dtypes import NUMPY_DTYPES
from della_cli.kernels import MAGPRUNE, RANDOM, WINDOW
from della_cli.methods import MethodSpec, Rescale
from della_cli.methods.randomness import Draws
from della_cli.plan import TensorJob

if TYPE_CHECKING:
    from della_cli.backends.cpu.weighted_sum import WeightedSum


class CpuJobs:
    """Runs the CPU kernels of a merge's jobs (``method`` is the recipe's; the merge-wide
    parameters are each job's, settled in its kernel)."""

    # Whole-tensor selections of tensors under this many entries are made every expert's in
    # one call (``keep_masks``), on the calling thread, over keys held in memory (8 bytes an
    # entry: 2 MiB at most). A 256x256 bf16 tensor of 3 experts took 0.6 ms of CPU there
    # against 2.4 ms in the streamed selection, whose parallel counting and 16-bit digits are
    # for the tensors larger than a block.
    SMALL_SELECTION_BELOW = 1 << 18

    def __init__(self, method: MethodSpec, threads: ThreadBudget):
        self.method = method
        self.threads = threads
        self._stream_scratch = streamed_sum.Scratch()
        self._sums: dict[str, WeightedSum] = {}
        self._compiler: subprocess.Popen | None = None  # compiling the kernels, if it is
        self._to_load: tuple | None = None  # cached kernels the merge will call (``warm.load``)
        self._stand_ins: set[str] = set()  # cpu/block jobs on torch while they compile

    def start_compiling(self, jobs: list[TensorJob], inputs) -> None:
        """Where the kernels of the jobs on the CPU backend are not in numba's cache, compile
        them in a child process (``backends.cpu.warm``) rather than make the merge wait."""
        pairs, selects, sums, methods = set(), set(), set(), set()
        for job in jobs:
            if job.kernel is None or not job.kernel.compiled:
                continue
            if job.kernel.streamed:  # a catalog method: compiled per (input, output) dtypes
                methods.add((job.kernel.name, self.stored_dtype(job, inputs), job.out_dtype))
                continue
            if job.kernel.name != "block":
                sums.add(job.out_dtype)  # a weighted sum: compiled per output dtype
                continue
            dtype = self.stored_dtype(job, inputs)
            pairs.add((dtype, job.out_dtype))
            if any(step.sparsify == WINDOW for step in job.kernel.experts):
                selects.add(dtype)
        catalog = {(dtype, out_dtype) for _, dtype, out_dtype in methods}
        if not (pairs or sums or catalog) or os.environ.get("DELLA_COMPILE_INLINE"):
            return
        from della_cli.backends.cpu import warm  # numba: imported only when needed

        if warm.missing(pairs, selects, sums, catalog):
            self._compiler = warm.start(pairs, selects, sums, catalog)
        else:
            self._to_load = (pairs, selects, sums, methods)

    def load_kernels(self) -> None:
        """Load from numba's cache the kernels the merge will call, where they are all there
        (``start_compiling``): called while the first block is read, so that importing numba
        and reading its cache (0.5 s for model_stock) overlap that read instead of following
        it."""
        wanted, self._to_load = self._to_load, None
        if wanted is not None:
            from della_cli.backends.cpu import warm  # numba: imported only when needed

            self.threads.limit_numba()
            warm.load(*wanted)

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
        """Whether the torch reference merges this block (the same bytes) while the kernels
        compile: any block of a weighted sum, each on its own; a ``cpu/block`` or catalog job
        begun meanwhile, to its last block (its whole-tensor selection, or its statistics,
        were made for it)."""
        kernel = task.job.kernel
        if not kernel.compiled:
            return False
        if kernel.name != "block" and not kernel.streamed:
            return self.compiling()
        name = task.job.name
        if task.start == 0 and self.compiling():
            self._stand_ins.add(name)
        standing_in = name in self._stand_ins
        if task.last:
            self._stand_ins.discard(name)
        return standing_in

    def sum_spec(self, job: TensorJob) -> WeightedSum:
        """What a weighted-sum job sums (made once per job: its chunks ask again and again)."""
        spec = self._sums.get(job.name)
        if spec is None:
            from della_cli.backends.cpu.weighted_sum import WeightedSum

            spec = self._sums[job.name] = WeightedSum(
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
        from della_cli.backends.cpu import weighted_sum  # numba: imported only when needed

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
        """A chunk of a ``cpu/streamed_sum`` job, whose rows are read from the files a piece at
        a time (``io.streamed_sum``) and merged as they come."""
        job = task.job
        spec = self.sum_spec(job)
        experts = [
            inputs.reader(source.model).row_span(source.tensor, task.start)
            for source in job.experts
        ]
        base = reference_expert(job)
        if base is None:
            base = inputs.reader(job.reference.model).row_span(job.reference.tensor, task.start)
        from della_cli.backends.cpu import weighted_sum  # numba: imported only when needed

        flags = weighted_sum.merge_streamed(out, base, experts, spec, self._stream_scratch)
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

    def keep_masks(
        self, experts: list[np.ndarray], reference: np.ndarray, windows: list[tuple[int, int]]
    ) -> np.ndarray:
        """Every expert's whole-tensor selection of a small tensor in one call, (experts,
        *shape)."""
        from della_cli.backends.cpu import select_small  # numba: imported only when needed

        self.threads.limit_numba()
        return select_small.window_keep_masks(experts, reference, windows)
