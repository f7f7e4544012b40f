"""Task arithmetic and linear on the CPU: several threads each read, merge and write chunks.

The writer must still get every chunk in order, whatever order the threads finish in, and an
error in one thread must reach the caller without leaving the others waiting for their turn.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from kernel_check import on_backend, require_kernel, require_streamed_reads

from della_cli.api import MergeOptions, prepare
from della_cli.backends.cpu import weighted_sum
from della_cli.engine import InOrder, MergeEngine
from della_cli.engine import threads as engine_threads
from della_cli.errors import ModelError
from della_cli.io.writer import ShardWriter


def written_tensors(writer: ShardWriter, folder) -> dict:
    from safetensors.numpy import load_file

    tensors = {}
    for file_name in writer.close():
        tensors.update(load_file(folder / file_name))
    return tensors


def run_in_thread(target, seconds: float = 60.0):
    """Run ``target`` in a thread and fail the test if it is still running after ``seconds``
    (a thread left waiting for its turn would hang the merge forever); its error, if any."""
    errors: list[BaseException] = []

    def body():
        try:
            target()
        except BaseException as error:  # handed to the test
            errors.append(error)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the merge hung"
    return errors[0] if errors else None


@pytest.mark.parametrize("reads", ["streamed", "kernel"])
@pytest.mark.parametrize(
    ("method", "parameters"), [("task_arithmetic", {"lambda": 0.7}), ("linear", {})]
)
def test_chunks_finished_out_of_order_are_written_in_order(
    method, parameters, reads, bf16_recipe, tmp_path, monkeypatch
):
    """Four threads, each delayed at random before it merges a chunk: the file holds every
    tensor as the torch path computes it alone, whether the chunks are read by the streamed
    reader or into buffers merged by the kernel."""
    if reads == "streamed":
        require_streamed_reads()
    if reads == "kernel":
        require_kernel()
    merge_block, blocks, streamed = weighted_sum.merge_block, [], []

    def counted(*args, **kwargs):
        blocks.append(kwargs.get("helper_count", args[5] if len(args) > 5 else 0))
        return merge_block(*args, **kwargs)

    def counted_streams(*args, **kwargs):
        streamed.append(args[0].size)
        return streamed_merge(*args, **kwargs)

    streamed_merge = weighted_sum.merge_streamed
    monkeypatch.setattr(weighted_sum, "merge_block", counted)
    monkeypatch.setattr(weighted_sum, "merge_streamed", counted_streams)
    monkeypatch.setattr(engine_threads, "usable_cores", lambda: 8)
    recipe_path = bf16_recipe(method, parameters)
    recipe, inputs, plan = prepare(recipe_path, MergeOptions())
    plan = on_backend(plan, recipe, inputs, "cpu", stream_reads=reads == "streamed")
    chunked = MergeEngine(recipe, plan, inputs, "cpu", block_elements=96, threads=4)
    assert all(job.kernel.in_chunks for job in plan.jobs if job.action == "merge")
    assert sum(len(chunked.block_tasks(job)) for job in plan.jobs) > 200
    merge_chunk, threads, shuffle = MergeEngine.merge_chunk, set(), random.Random(5)

    def delayed(self, task):
        threads.add(threading.current_thread().name)
        time.sleep(shuffle.random() * 0.002)
        return merge_chunk(self, task)

    monkeypatch.setattr(MergeEngine, "merge_chunk", delayed)
    writer = ShardWriter(tmp_path, plan.shards)
    assert run_in_thread(lambda: chunked.run(writer)) is None
    assert len(threads) == 4
    if reads == "streamed":
        assert len(streamed) > 200 and not blocks
    else:
        assert len(blocks) > 200 and set(blocks) == {0} and not streamed  # one thread a chunk
    written = written_tensors(writer, tmp_path)
    torch_plan = on_backend(plan, recipe, inputs, "torch")
    reference = MergeEngine(recipe, torch_plan, inputs, "cpu")
    for job in torch_plan.jobs:
        assert written[job.name].tobytes() == reference.compute(job).tobytes(), job.name


def test_an_error_in_one_chunk_stops_every_thread_and_reaches_the_caller(
    bf16_recipe, tmp_path, monkeypatch
):
    monkeypatch.setattr(engine_threads, "usable_cores", lambda: 8)
    recipe, inputs, plan = prepare(bf16_recipe("task_arithmetic", {}), MergeOptions())
    chunked = MergeEngine(recipe, plan, inputs, "cpu", block_elements=96, threads=3)
    merge_chunk, calls, lock = MergeEngine.merge_chunk, [], threading.Lock()

    def failing(self, task):
        with lock:
            calls.append(task)
            count = len(calls)
        if count == 20:
            raise ModelError("disk on fire")
        time.sleep(0.001)
        return merge_chunk(self, task)

    monkeypatch.setattr(MergeEngine, "merge_chunk", failing)
    writer = ShardWriter(tmp_path, plan.shards)
    error = run_in_thread(lambda: chunked.run(writer))
    writer.abort()
    assert isinstance(error, ModelError) and "disk on fire" in str(error)
    # the other threads stopped claiming chunks: far fewer than the merge has were read
    assert len(calls) < 30 < sum(len(chunked.block_tasks(job)) for job in plan.jobs)


@pytest.mark.parametrize("stream_reads", [True, False], ids=["streamed", "buffers"])
def test_strict_refuses_a_nan_in_a_chunk_whichever_thread_merges_it(
    stream_reads, model_zoo, write_recipe, tmp_path, monkeypatch
):
    """--strict fails on an input's NaN whichever thread merges the chunk that holds it."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(engine_threads, "usable_cores", lambda: 8)
    source = model_zoo("llama", expert=1, dtype=torch.bfloat16)
    poisoned = tmp_path / "poisoned"
    poisoned.mkdir()
    for path in source.iterdir():
        (poisoned / path.name).write_bytes(path.read_bytes())
    weights = next(poisoned.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(n for n, t in tensors.items() if t.ndim == 2 and t.shape[0] >= 8)
    tensors[name][-1, -1] = float("nan")  # in the tensor's last chunk
    save_file(tensors, weights, metadata={"format": "pt"})
    recipe_path = write_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(model_zoo("llama", dtype=torch.bfloat16)),
            "models": [{"model": str(poisoned)}],
        }
    )
    recipe, inputs, plan = prepare(recipe_path, MergeOptions())
    plan = on_backend(plan, recipe, inputs, "cpu", stream_reads=stream_reads)
    chunked = MergeEngine(recipe, plan, inputs, "cpu", block_elements=32, strict=True, threads=2)
    assert len(chunked.block_tasks(next(j for j in plan.jobs if j.name == name))) > 1
    (tmp_path / "out").mkdir()
    writer = ShardWriter(tmp_path / "out", plan.shards)
    error = run_in_thread(lambda: chunked.run(writer))
    writer.abort()
    assert isinstance(error, ModelError)
    assert "NaN or Inf" in str(error) and name in str(error)


@pytest.mark.parametrize(
    ("method", "parameters", "dtype"),
    [
        ("ties", {"density": 1.0}, torch.bfloat16),  # elects signs
        ("dare_linear", {"density": 0.5}, torch.bfloat16),  # drops deltas
        ("task_arithmetic", {}, torch.float16),  # a dtype the weighted sum does not take
    ],
)
def test_merges_that_are_not_a_plain_weighted_sum_keep_the_pipeline(
    method, parameters, dtype, model_zoo, write_recipe
):
    recipe_path = write_recipe(
        {
            "merge_method": method,
            "base_model": str(model_zoo("llama", dtype=dtype)),
            "models": [{"model": str(model_zoo("llama", expert=1, dtype=dtype))}],
            "parameters": parameters,
        }
    )
    recipe, inputs, plan = prepare(recipe_path, MergeOptions())
    assert not any(job.kernel.in_chunks for job in plan.jobs if job.kernel)
    weighted = write_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(model_zoo("llama", dtype=torch.bfloat16)),
            "models": [{"model": str(model_zoo("llama", expert=1, dtype=torch.bfloat16))}],
        },
        name="weighted.yaml",
    )
    recipe, inputs, plan = prepare(weighted, MergeOptions())
    assert any(job.kernel.in_chunks for job in plan.jobs if job.kernel)
    torch_plan = on_backend(plan, recipe, inputs, "torch")
    assert not any(job.kernel.in_chunks for job in torch_plan.jobs if job.kernel)


def test_results_are_written_in_task_order_whoever_finishes_first():
    order = InOrder(12, ahead=4)
    written: list[int] = []
    delays = [0.002 * ((7 * k) % 5) for k in range(12)]  # later tasks often finish first

    def worker():
        with order.failing_all_on_error():
            while (index := order.claim()) is not None:
                time.sleep(delays[index])
                order.deliver(index, lambda index=index: written.append(index))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert written == list(range(12))
    assert order.claim() is None


def test_a_result_delivered_out_of_turn_waits_in_the_queue_not_in_its_thread():
    order = InOrder(3, ahead=3)
    written: list[int] = []
    assert [order.claim(), order.claim(), order.claim()] == [0, 1, 2]
    order.deliver(2, lambda: written.append(2))  # returns at once: 0 and 1 are not written
    order.deliver(1, lambda: written.append(1))
    assert written == []
    order.deliver(0, lambda: written.append(0))  # fills the gap: writes all three
    assert written == [0, 1, 2]


def test_a_failure_releases_the_threads_waiting_to_deliver():
    order = InOrder(3, ahead=1)
    assert order.claim() == 0 and order.claim() == 1
    released = threading.Event()

    def too_far_ahead():
        with order.failing_all_on_error():
            order.deliver(1, lambda: pytest.fail("task 1 must not be written"))
        released.set()  # returned quietly: the failing thread reports the error

    waiter = threading.Thread(target=too_far_ahead)
    waiter.start()
    with pytest.raises(OSError, match="full"), order.failing_all_on_error():
        raise OSError("disk full")  # task 0 never gets written
    waiter.join(10)
    assert released.is_set()
    assert order.claim() is None  # nothing more is handed out
