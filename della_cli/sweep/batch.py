"""A sweep's candidates merged in batches: every block of the inputs read once per batch.

A batch is as many candidates as a memory budget holds (``batches``: their working memories,
``Plan.working_memory_bytes``, summed, which over-counts the block of inputs they share). Its
merges run in one pass over the inputs (``engine.batch``): each candidate writes into its own
staging folder with its own journal, and each is published atomically as ``della merge``
publishes, once the pass has ended. A batch killed midway leaves each candidate's verified
shards, and the rerun resumes each from them; an interrupted one (Ctrl-C) removes its staging
folders, as ``della merge`` does, and the batch is merged again.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from della_cli.api import checked_plan, finish_output, open_writer
from della_cli.engine import WHOLE_TENSOR_SPARSIFIERS, MergeEngine, block_elements_for
from della_cli.engine.batch import BatchEngine
from della_cli.io.output import staged_folder
from della_cli.plan import Plan
from della_cli.preflight import available_memory
from della_cli.session import MergeSession

# The share of the available memory a sweep's batch may use by default: the rest is left to the
# page cache, which keeps the inputs' bytes between batches, and to the rest of the machine.
DEFAULT_MEMORY_SHARE = 0.5
FALLBACK_MEMORY = 4 << 30  # where the available memory cannot be read


def default_memory_budget(device: str) -> int:
    """Half the memory available now on ``device`` (4 GiB where that is unknown)."""
    available = available_memory(device)
    return int(available * DEFAULT_MEMORY_SHARE) if available else FALLBACK_MEMORY


def working_memory(session: MergeSession, plan: Plan) -> int:
    """What a candidate's merge holds at once (as ``della merge --dry-run`` reports it)."""
    whole = session.recipe.method.sparsifier in WHOLE_TENSOR_SPARSIFIERS
    return plan.working_memory_bytes(block_elements_for(session.device), whole)


def batches(costs: list[int], budget: int) -> list[list[int]]:
    """The candidates (indices into ``costs``) in order, cut into runs whose summed cost fits
    ``budget``; a candidate that alone exceeds it is a batch of its own."""
    cut: list[list[int]] = []
    total = 0
    for index, cost in enumerate(costs):
        if cut and total + cost <= budget:
            cut[-1].append(index)
            total += cost
        else:
            cut.append([index])
            total = cost
    return cut


def merge_batch(sessions: list[MergeSession], outs: list[Path], warn) -> None:
    """Merge every session (a candidate over the sweep's opened models) into its ``outs``
    folder, in one pass over the inputs; each output appears only once complete."""
    plans = [checked_plan(session, out) for session, out in zip(sessions, outs, strict=True)]
    for plan in plans:
        for message in plan.warnings:
            warn(message)
    with contextlib.ExitStack() as stack:
        stagings, writers, starts, engines = [], [], [], []
        for session, plan, out in zip(sessions, plans, outs, strict=True):
            staging = stack.enter_context(staged_folder(out, True, False, warn))
            writer, done = open_writer(session.recipe, plan, session.inputs, staging, True, warn)
            stack.callback(writer.abort)  # a half-written shard closed on any failure
            stagings.append(staging)
            writers.append(writer)
            starts.append((writer.next_index, done))
            engines.append(_engine(session, plan, warn))
        BatchEngine(engines).run(writers, [start for start, _ in starts])
        for session, plan, out, staging, writer, engine, (_, done) in zip(
            sessions, plans, outs, stagings, writers, engines, starts, strict=True
        ):
            writer.close()
            checked = engine.report.saw_nonfinite or done > 0
            finish_output(session, plan, staging, out.name, warn, checked)


def _engine(session: MergeSession, plan: Plan, warn) -> MergeEngine:
    options = session.options
    return MergeEngine(
        session.recipe,
        plan,
        session.inputs,
        session.device,
        on_warning=warn,
        strict=options.strict,
        threads=options.threads,
    )
