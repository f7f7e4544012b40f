"""Merging in blocks of rows must give exactly the bytes of merging whole tensors."""

from __future__ import annotations

import pytest
import torch
from kernel_check import on_backend, require_streamed_reads, without_cpu_backend

from della_cli.api import MergeOptions, prepare
from della_cli.engine import MergeEngine

METHOD_PARAMETERS = {
    "della": {"density": 0.7, "epsilon": 0.07, "lambda": 1.1},
    "della_linear": {"density": 0.6, "epsilon": 0.1},
    "ties": {"density": 0.3},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.8},
    "task_arithmetic": {"lambda": 0.5},
    "linear": {},
}


def same_bytes(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("method", sorted(METHOD_PARAMETERS))
def test_blocked_merge_equals_whole_tensor_merge(method, model_zoo, write_recipe):
    recipe_path = write_recipe(
        {
            "merge_method": method,
            "base_model": str(model_zoo("llama")),
            "models": [
                {"model": str(model_zoo("llama", expert=1))},
                {"model": str(model_zoo("llama", expert=2)), "parameters": {"weight": 0.5}},
            ],
            "parameters": METHOD_PARAMETERS[method],
            "seed": 7,
        }
    )
    recipe, inputs, plan = prepare(recipe_path, MergeOptions())
    cpu = torch.device("cpu")
    whole = MergeEngine(recipe, plan, inputs, cpu, block_elements=1 << 30)
    # 100 elements: most tensors (rows of 32 or 64) split into many blocks, some of one row.
    blocked = MergeEngine(recipe, plan, inputs, cpu, block_elements=100)
    assert any(len(blocked.row_blocks(job)) > 1 for job in plan.jobs)
    for job in plan.jobs:
        assert same_bytes(whole.compute(job), blocked.compute(job)), job.name


@pytest.mark.parametrize("method", sorted(METHOD_PARAMETERS))
@pytest.mark.parametrize(
    ("dtype", "out_dtype"),
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "float32")],
)
def test_the_cpu_and_torch_backends_write_the_same_bytes(
    method, dtype, out_dtype, model_zoo, write_recipe, tmp_path, monkeypatch
):
    """The CPU backend (the weighted sum of task arithmetic and linear, read by the streamed
    reader or into buffers, the numba block kernel of the others) against the torch backend,
    byte for byte, on inputs as stored."""
    from della_cli.api import run_merge
    from della_cli.backends.cpu import block as fused_merge
    from della_cli.backends.cpu import weighted_sum

    recipe = {
        "merge_method": method,
        "base_model": str(model_zoo("llama", dtype=dtype)),
        "models": [
            {"model": str(model_zoo("llama", expert=1, dtype=dtype))},
            {
                "model": str(model_zoo("llama", expert=2, dtype=dtype)),
                "parameters": {"weight": 0.5},
            },
        ],
        "parameters": METHOD_PARAMETERS[method],
        **({"out_dtype": out_dtype} if out_dtype else {}),
    }
    recipe_path = write_recipe(recipe)
    fast = weighted_sum if method in ("task_arithmetic", "linear") else fused_merge
    fast_blocks = []
    merge_block = fast.merge_block

    def counted(*args, **kwargs):
        fast_blocks.append(args[0].shape)
        return merge_block(*args, **kwargs)

    monkeypatch.setattr(fast, "merge_block", counted)
    streamed, streamed_merge = [], weighted_sum.merge_streamed

    def counted_streams(*args, **kwargs):
        streamed.append(args[0].shape)
        return streamed_merge(*args, **kwargs)

    monkeypatch.setattr(weighted_sum, "merge_streamed", counted_streams)
    run_merge(recipe_path, tmp_path / "fused", MergeOptions(device="cpu"))
    assert fast_blocks or streamed, f"{fast.__name__} never ran"
    if fast is fused_merge:
        assert not streamed
    without_cpu_backend(monkeypatch)
    run_merge(recipe_path, tmp_path / "torch", MergeOptions(device="cpu"))
    fused = (tmp_path / "fused" / "model.safetensors").read_bytes()
    assert fused == (tmp_path / "torch" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["della", "dare_ties", "ties", "task_arithmetic"])
def test_the_backends_agree_on_every_tensor_in_blocks_of_a_few_rows(method, bf16_recipe):
    """In blocks of a few rows, so that draw offsets and mask slices are exercised."""
    recipe_path = bf16_recipe(method, {**METHOD_PARAMETERS[method], "lambda": 0.9}, seed=11)
    recipe, inputs, plan = prepare(recipe_path, MergeOptions())
    cpu_plan = on_backend(plan, recipe, inputs, "cpu")
    assert all(job.kernel.backend == "cpu" for job in cpu_plan.jobs if job.kernel)
    cpu = MergeEngine(recipe, cpu_plan, inputs, "cpu", block_elements=200)
    torch_plan = on_backend(plan, recipe, inputs, "torch")
    reference = MergeEngine(recipe, torch_plan, inputs, "cpu", block_elements=200)
    for job, torch_job in zip(cpu_plan.jobs, torch_plan.jobs, strict=True):
        assert same_bytes(cpu.compute(job), reference.compute(torch_job)), job.name


def test_lean_ties_selection_writes_the_bytes_of_the_torch_path(bf16_recipe, tmp_path, monkeypatch):
    """On the CPU, TIES selects from the inputs as stored, on every tensor: the plain torch
    path's bytes."""
    from della_cli.api import run_merge
    from della_cli.backends.cpu import select as trim_select
    from della_cli.backends.cpu import select_small

    recipe_path = bf16_recipe("ties", {"density": 0.3})
    selections = []
    window_keep_mask = trim_select.window_keep_mask
    window_keep_masks = select_small.window_keep_masks

    def counted(*args):
        selections.append(args[0].shape)
        return window_keep_mask(*args)

    def counted_together(experts, *args):  # a small tensor: every expert's in one call
        selections.extend(expert.shape for expert in experts)
        return window_keep_masks(experts, *args)

    monkeypatch.setattr(trim_select, "window_keep_mask", counted)
    monkeypatch.setattr(select_small, "window_keep_masks", counted_together)
    run_merge(recipe_path, tmp_path / "lean", MergeOptions(device="cpu"))
    _, inputs, plan = prepare(recipe_path, MergeOptions())
    for reader in [inputs.base, *inputs.experts]:
        reader.close()
    merged_tensors = sum(job.action == "merge" for job in plan.jobs)
    assert merged_tensors > 5 and len(selections) == 2 * merged_tensors  # two experts each
    without_cpu_backend(monkeypatch)
    run_merge(recipe_path, tmp_path / "torch", MergeOptions(device="cpu"))
    lean = (tmp_path / "lean" / "model.safetensors").read_bytes()
    assert lean == (tmp_path / "torch" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", sorted(METHOD_PARAMETERS))
def test_empty_and_single_entry_tensors_merge_like_the_torch_path(
    method, tensor_models, write_recipe, tmp_path, monkeypatch
):
    """Degenerate shapes real checkpoints carry (an empty buffer, a scalar, rows of one)."""
    from della_cli.api import run_merge

    shapes = {"empty": (0, 8), "scalar": (), "column": (16, 1), "one": (1,), "rows": (4, 32)}
    if method.startswith(("ties", "breadcrumbs")):  # a trim of one entry keeps none: refused
        del shapes["scalar"], shapes["one"]
    folders = tensor_models(shapes, dtype=torch.bfloat16)
    recipe_path = write_recipe(
        {
            "merge_method": method,
            "base_model": str(folders[0]),
            "models": [{"model": str(f)} for f in folders[1:]],
            "parameters": METHOD_PARAMETERS[method],
        }
    )
    run_merge(recipe_path, tmp_path / "fused", MergeOptions(device="cpu"))
    without_cpu_backend(monkeypatch)
    run_merge(recipe_path, tmp_path / "torch", MergeOptions(device="cpu"))
    fused = (tmp_path / "fused" / "model.safetensors").read_bytes()
    assert fused == (tmp_path / "torch" / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("method", "backend"),
    [
        ("task_arithmetic", "cpu"),
        ("linear", "cpu"),
        ("della", "cpu"),
        ("ties", "cpu"),
        ("dare_linear", "torch"),
    ],
)
def test_the_run_loop_recycles_block_buffers_without_changing_a_byte(
    method, backend, bf16_recipe, tmp_path
):
    """``run`` reads into recycled buffers and writes from recycled output buffers while the
    reader and writer threads work ahead; in blocks of a few rows that recycling happens
    hundreds of times, and every tensor must still be what merging it alone gives."""
    from safetensors.numpy import load_file

    from della_cli.io.writer import ShardWriter

    recipe_path = bf16_recipe(method, METHOD_PARAMETERS[method], seed=3)
    recipe, inputs, plan = prepare(recipe_path, MergeOptions())
    plan = on_backend(plan, recipe, inputs, backend)
    streaming = MergeEngine(recipe, plan, inputs, "cpu", block_elements=96)
    assert sum(len(streaming.block_tasks(job)) for job in plan.jobs) > 200
    writer = ShardWriter(tmp_path, plan.shards)
    streaming.run(writer)
    written = {}
    for file_name in writer.close():
        written.update(load_file(tmp_path / file_name))
    alone = MergeEngine(recipe, plan, inputs, "cpu", block_elements=1 << 30)
    for job in plan.jobs:
        expected = alone.compute(job)
        assert written[job.name].tobytes() == expected.tobytes(), job.name


@pytest.mark.parametrize("stream_reads", [False, True], ids=["buffers", "streamed"])
def test_a_linear_merge_without_a_base_reads_its_first_model_once(
    stream_reads, model_zoo, write_recipe, tmp_path, monkeypatch
):
    """Without ``base_model``, linear's reference is its first model: its rows serve as both,
    read once (into a buffer, or by the streamed reader told that the base is expert 0), and
    the result is still the torch path's."""
    from collections import Counter

    from safetensors.numpy import load_file

    from della_cli.backends.cpu import weighted_sum
    from della_cli.io.reader import ModelReader
    from della_cli.io.writer import ShardWriter

    if stream_reads:
        require_streamed_reads()
    models = [model_zoo("llama", expert=e, dtype=torch.bfloat16) for e in (1, 2)]
    recipe_path = write_recipe(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(models[0])},
                {"model": str(models[1]), "parameters": {"weight": 0.5}},
            ],
        }
    )
    recipe, inputs, plan = prepare(recipe_path, MergeOptions())
    reads, bases = Counter(), []
    read_rows, streamed_merge = ModelReader.read_rows, weighted_sum.merge_streamed

    def counted(self, name, start, stop, pool=None):
        reads[(self.folder, name, start)] += 1
        return read_rows(self, name, start, stop, pool)

    def streamed(out, base, experts, *args):
        bases.append(base)
        for span in experts:
            reads[(span.path.parent, span.tensor, span.offset)] += 1
        return streamed_merge(out, base, experts, *args)

    monkeypatch.setattr(ModelReader, "read_rows", counted)
    monkeypatch.setattr(weighted_sum, "merge_streamed", streamed)
    writer = ShardWriter(tmp_path, plan.shards)
    chunked = on_backend(plan, recipe, inputs, "cpu", stream_reads=stream_reads)
    engine = MergeEngine(recipe, chunked, inputs, "cpu", block_elements=96)
    engine.run(writer)
    written = {}
    for file_name in writer.close():
        written.update(load_file(tmp_path / file_name))
    assert {folder for folder, _, _ in reads} == {m.resolve() for m in models}
    assert set(reads.values()) == {1}
    assert set(bases) == ({0} if stream_reads else set())
    torch_plan = on_backend(plan, recipe, inputs, "torch")
    reference = MergeEngine(recipe, torch_plan, inputs, "cpu")
    for job in torch_plan.jobs:
        assert written[job.name].tobytes() == reference.compute(job).tobytes(), job.name
