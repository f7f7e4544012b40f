"""A merge whose numba kernels are not compiled yet goes on with the torch reference while a
child process compiles them (``backends.cpu.warm``), and writes the same bytes (issue 15)."""

from __future__ import annotations

import pytest
from safetensors.numpy import load_file

from della_cli.api import MergeOptions, prepare
from della_cli.backends.cpu import rules, warm
from della_cli.engine import MergeEngine, cpu_jobs
from della_cli.engine.catalog_jobs import CatalogJobs
from della_cli.io.writer import ShardWriter

pytestmark = pytest.mark.skipif(not rules.available(), reason="needs numba")


class Compiling:
    """A stand-in for the compiling child: still running for its first ``polls`` polls."""

    def __init__(self, polls: int):
        self.polls = polls

    def poll(self) -> int | None:
        self.polls -= 1
        return None if self.polls >= 0 else 0


PARAMETERS = {
    "ties": {"density": 0.3},
    "della": {"density": 0.6, "epsilon": 0.1},
    "sce": {"select_topk": 0.5},
}


@pytest.mark.parametrize(
    ("method", "polls"), [("ties", 10**9), ("ties", 5), ("della", 7), ("sce", 9)]
)
def test_jobs_begun_while_compiling_are_merged_by_torch_to_the_same_bytes(
    method, polls, bf16_recipe, tmp_path, monkeypatch
):
    recipe, inputs, plan = prepare(bf16_recipe(method, PARAMETERS[method], seed=3), MergeOptions())
    assert sum(job.kernel is not None and job.kernel.compiled for job in plan.jobs) > 10
    expected = MergeEngine(recipe, plan, inputs, "cpu")  # numba, in this process
    expected_bytes = {job.name: expected.compute(job).tobytes() for job in plan.jobs}

    started, numba_jobs = [], []
    real_block = cpu_jobs.CpuJobs.block
    real_streamed = CatalogJobs.streamed_block

    def block(self, task, *args):
        numba_jobs.append(task.job.name)
        return real_block(self, task, *args)

    def streamed_block(self, task, *args):
        numba_jobs.append(task.job.name)
        return real_streamed(self, task, *args)

    def start(pairs, selects, sums=frozenset(), catalog=frozenset()):
        started.append((pairs, selects, sums, catalog))
        return Compiling(polls)

    monkeypatch.delenv("DELLA_COMPILE_INLINE")
    monkeypatch.setattr(warm, "missing", lambda pairs, selects, sums=(), catalog=(): True)
    monkeypatch.setattr(warm, "start", start)
    monkeypatch.setattr(cpu_jobs.CpuJobs, "block", block)
    monkeypatch.setattr(CatalogJobs, "streamed_block", streamed_block)
    engine = MergeEngine(recipe, plan, inputs, "cpu", block_elements=256)
    writer = ShardWriter(tmp_path, plan.shards)
    engine.run(writer)
    written = {}
    for file_name in writer.close():
        written.update(load_file(tmp_path / file_name))

    selects = {"BF16"} if method == "ties" else set()
    pairs = {("BF16", "BF16")}
    if method == "sce":
        assert started == [(set(), set(), set(), pairs)]
    else:
        assert started == [(pairs, selects, set(), set())]
    if polls > 10**6:
        assert numba_jobs == []  # nothing waited for a compilation
    else:
        assert numba_jobs  # the jobs begun after the child finished load its kernels
        assert numba_jobs[0] != plan.jobs[0].name
    for job in plan.jobs:
        assert written[job.name].tobytes() == expected_bytes[job.name], job.name


@pytest.mark.parametrize(("method", "polls"), [("task_arithmetic", 10**9), ("linear", 9)])
def test_weighted_sums_begun_while_compiling_are_merged_by_torch_to_the_same_bytes(
    method, polls, bf16_recipe, tmp_path, monkeypatch
):
    """The chunks of a weighted sum go to the torch reference while the weighted-sum kernel
    compiles, each on its own (no chunk waits for the compilation), then to the kernel."""
    from della_cli.backends.cpu import weighted_sum

    recipe, inputs, plan = prepare(bf16_recipe(method, {}, seed=3), MergeOptions())
    assert all(job.kernel.in_chunks for job in plan.jobs if job.action == "merge")
    expected = MergeEngine(recipe, plan, inputs, "cpu")  # numba, in this process
    expected_bytes = {job.name: expected.compute(job).tobytes() for job in plan.jobs}
    started, summed = [], []
    real_merge = weighted_sum.merge_streamed

    def merge_streamed(out, *args):
        summed.append(out.size)
        return real_merge(out, *args)

    def start(pairs, selects, sums, catalog=frozenset()):
        started.append((pairs, selects, sums))
        return Compiling(polls)

    monkeypatch.delenv("DELLA_COMPILE_INLINE")
    monkeypatch.setattr(warm, "missing", lambda pairs, selects, sums, catalog=(): True)
    monkeypatch.setattr(warm, "start", start)
    monkeypatch.setattr(weighted_sum, "merge_streamed", merge_streamed)
    engine = MergeEngine(recipe, plan, inputs, "cpu", block_elements=256, threads=1)
    writer = ShardWriter(tmp_path, plan.shards)
    engine.run(writer)
    written = {}
    for file_name in writer.close():
        written.update(load_file(tmp_path / file_name))

    assert started == [(set(), set(), {"BF16"})]
    chunks = sum(len(engine.block_tasks(job)) for job in plan.jobs if job.action == "merge")
    # one poll per chunk: the first ``polls`` chunks on torch, the rest by the kernel
    assert len(summed) == (0 if polls > 10**6 else chunks - polls)
    for job in plan.jobs:
        assert written[job.name].tobytes() == expected_bytes[job.name], job.name


def test_kernels_the_child_compiled_are_found_in_the_cache():
    warm.main(["BF16:BF16", "select:BF16", "sum:BF16", "catalog:BF16:BF16"])  # once, else loaded
    assert not warm.missing({("BF16", "BF16")}, {"BF16"}, {"BF16"}, {("BF16", "BF16")})


def test_a_merge_waits_for_another_merges_compilation_instead_of_repeating_it(
    tmp_path, monkeypatch
):
    fcntl = pytest.importorskip("fcntl")
    lock = tmp_path / "compiling.lock"
    monkeypatch.setattr(warm, "LOCK", lock)
    monkeypatch.setattr(warm.subprocess, "Popen", lambda *a, **k: pytest.fail("spawned"))
    with open(lock, "a") as held:  # as the other merge's child holds it while compiling
        fcntl.flock(held, fcntl.LOCK_EX)
        other = warm.start({("BF16", "BF16")}, set())
        assert other.poll() is None
        fcntl.flock(held, fcntl.LOCK_UN)
    assert other.poll() == 0  # finished: the kernels load from the cache
