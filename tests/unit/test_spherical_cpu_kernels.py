"""The CPU backend's slerp, nuslerp, multislerp, karcher and model_stock (``backends.cpu.
catalog``) against the torch backend's (``methods.streamed``): the same output bytes and the
same non-finite flags, on random and adversarial blocks, bfloat16 and float32, read in several
blocks; and the sums of products bit for bit (``methods.row_sums``)."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
import torch

from della_cli.backends.cpu import coefficients, spherical, spherical_methods
from della_cli.io.dtypes import from_torch, to_torch
from della_cli.methods import ExpertParams
from della_cli.methods import streamed as reference
from della_cli.methods.row_sums import fold_rows, row_dots

pytest.importorskip("numba")

DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "f32": np.dtype(np.float32)}
# (method, settings, experts, whether the merge has a base)
CASES = [
    ("slerp", {"t": 0.3}, 1, True),
    ("nuslerp", {"nuslerp_flatten": True, "nuslerp_row_wise": False}, 2, True),
    ("nuslerp", {"nuslerp_flatten": True, "nuslerp_row_wise": False}, 2, False),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": False}, 2, True),
    ("multislerp", {"normalize_weights": True, "eps": 1e-8}, 3, True),
    ("multislerp", {"normalize_weights": False, "eps": 1e-8}, 3, False),
    ("multislerp", {"normalize_weights": True, "eps": 1e-8}, 1, True),
    ("karcher", {"max_iter": 10, "tol": 1e-5, "base_input": True}, 2, True),
    ("karcher", {"max_iter": 10, "tol": 1e-5, "base_input": False}, 3, False),
    ("model_stock", {"filter_wise": False}, 3, True),
    ("model_stock", {"filter_wise": True}, 2, True),
]
WEIGHTS = [0.7, 1.3, 0.4]


def cpu_merge(method, settings, blocks, has_base, out_dtype):
    """The CPU backend over ``blocks`` [(reference, experts)]: its output and flags."""
    weights = WEIGHTS[: len(blocks[0][1])]
    state = None
    if reference.passes(method, settings, len(blocks[0][1])) > 1:
        state = spherical_methods.prepare(method, settings, weights, lambda: iter(blocks), has_base)
    merged = [
        spherical_methods.apply(method, settings, weights, state, r, e, has_base, out_dtype)
        for r, e in blocks
    ]
    flags = np.any([f for _, f in merged], axis=0)
    return np.concatenate([m for m, _ in merged]), flags


def torch_merge(method, settings, blocks, has_base, out_dtype):
    """The torch reference over the same blocks, as the engine's torch backend runs it."""
    params = [ExpertParams(weight=w) for w in WEIGHTS[: len(blocks[0][1])]]

    def on_torch():
        for r, e in blocks:
            yield (to_torch(r).float() if has_base else None), [to_torch(x).float() for x in e]

    state = None
    if reference.passes(method, settings, len(params)) > 1:
        state = reference.prepare(method, settings, params, on_torch, 0)
    out = []
    for base, models in on_torch():
        merged = reference.apply(method, settings, params, state, base, models)
        out.append(from_torch(merged.to(to_torch(np.zeros(1, out_dtype)).dtype)))
    return np.concatenate(out)


def inputs(kind, dtype, shape, count, seed=0):
    """(reference, experts) of one of the adversarial kinds, as stored in ``dtype``."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    deltas = [0.05 * rng.standard_normal(shape) for _ in range(count)]
    if kind == "parallel":  # task vectors along one direction (and the models too)
        deltas = [(i + 1) * deltas[0] for i in range(count)]
    elif kind == "antiparallel":
        deltas = [(-1) ** i * deltas[0] for i in range(count)]
    elif kind == "zero":  # experts equal to the base: task vectors of zero norm
        deltas = [np.zeros(shape) for _ in range(count)]
    experts = [(base + d).astype(dtype) for d in deltas]
    if kind == "nan":
        experts[-1].reshape(-1)[3] = np.nan
        base.reshape(-1)[5] = np.inf
    return base.astype(dtype), experts


def as_blocks(reference_array, experts, bounds):
    return [(reference_array[a:b], [e[a:b] for e in experts]) for a, b in bounds]


# every kind in bfloat16 (the common case); float32 random and with NaN (its own widening)
KINDS = [("bf16", kind) for kind in ("random", "parallel", "antiparallel", "zero", "nan")]
KINDS += [("f32", "random"), ("f32", "nan")]


@pytest.mark.parametrize(("method", "settings", "count", "has_base"), CASES)
@pytest.mark.parametrize(("dtype", "kind"), KINDS)
def test_the_cpu_kernels_give_the_torch_backends_bytes(
    method, settings, count, has_base, kind, dtype
):
    # rows of an odd length (the halving's odd levels), in three blocks of uneven rows
    base, experts = inputs(kind, DTYPES[dtype], (9, 37), count)
    blocks = as_blocks(base, experts, [(0, 4), (4, 5), (5, 9)])
    for out_dtype in {DTYPES[dtype], DTYPES["bf16"]}:
        ours, flags = cpu_merge(method, settings, blocks, has_base, out_dtype)
        theirs = torch_merge(method, settings, blocks, has_base, out_dtype)
        assert ours.dtype == out_dtype
        np.testing.assert_array_equal(ours.view(np.uint8), theirs.view(np.uint8))
    expected = kind == "nan"
    assert bool(flags[-1]) == expected  # the last expert held the NaN
    # the base held an Inf; without a base, the first expert's flag stands for the reference
    assert bool(flags[0]) == (expected and (has_base or count == 1))


def test_a_one_dimensional_tensor_is_one_row():
    base, experts = inputs("random", DTYPES["bf16"], (1, 101), 3)
    settings = {"filter_wise": True}
    ours, _ = cpu_merge("model_stock", settings, [(base, experts)], True, DTYPES["bf16"])
    theirs = torch_merge("model_stock", settings, [(base, experts)], True, DTYPES["bf16"])
    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16))


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 6, 7, 9, 13, 1001, 1024])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_the_sums_of_products_are_the_torch_backends_bits(length, count):
    """Every pair's sum, whether made with the other pairs (two or three vectors) or on its
    own (one, four), as the torch backend adds it."""
    rng = np.random.default_rng(length)
    rows = [rng.standard_normal((5, length)).astype(np.float32) for _ in range(count)]
    gram = spherical.gram_rows(rows[0], rows, subtract=False)
    for a, b in itertools.product(range(count), repeat=2):
        expected = row_dots(torch.from_numpy(rows[a]), torch.from_numpy(rows[b])).numpy()
        np.testing.assert_array_equal(gram[:, a, b], expected, err_msg=f"{a}, {b}")
    expected = row_dots(torch.from_numpy(rows[0]), torch.from_numpy(rows[-1])).numpy()
    folded = spherical.fold_rows(None, gram[:, 0, -1])
    assert folded == fold_rows(torch.zeros(()), torch.from_numpy(expected)).item()
    # folding in two blocks is folding whole
    assert (
        spherical.fold_rows(spherical.fold_rows(None, gram[:2, 0, -1]), gram[2:, 0, -1]) == folded
    )


@pytest.mark.parametrize(
    ("method", "parameters"),
    # two passes and one (multislerp and karcher: as nuslerp, in the block tests above)
    [("nuslerp", {"weight": 0.6}), ("model_stock", {"filter_wise": True})],
)
def test_the_engine_runs_the_cpu_kernels_with_the_torch_backends_bytes(
    method, parameters, bf16_recipe
):
    """Whole merges of a tiny bf16 Llama in blocks of a few rows: the plan gives every merged
    tensor ``cpu/<method>``, and each tensor's bytes are the torch backend's."""
    from kernel_check import on_backend

    from della_cli.api import MergeOptions, prepare
    from della_cli.engine import MergeEngine

    recipe, inputs, plan = prepare(bf16_recipe(method, parameters), MergeOptions())
    cpu_plan = on_backend(plan, recipe, inputs, "cpu")
    merged = [job for job in cpu_plan.jobs if job.kernel]
    assert merged and all(job.kernel.label.startswith(f"cpu/{method}") for job in merged)
    passes = {job.kernel.passes for job in merged}
    assert passes == ({1} if method == "model_stock" else {2})
    cpu = MergeEngine(recipe, cpu_plan, inputs, "cpu", block_elements=200)
    torch_plan = on_backend(plan, recipe, inputs, "torch")
    assert all(job.kernel.backend == "torch" for job in torch_plan.jobs if job.kernel)
    reference_engine = MergeEngine(recipe, torch_plan, inputs, "cpu", block_elements=200)
    for job, torch_job in zip(cpu_plan.jobs, torch_plan.jobs, strict=True):
        ours, theirs = cpu.compute(job), reference_engine.compute(torch_job)
        assert ours.dtype == theirs.dtype, job.name
        assert ours.tobytes() == theirs.tobytes(), job.name


@pytest.mark.parametrize("compiling", [True, False])
def test_jobs_begun_while_the_kernels_compile_run_on_torch_to_the_same_bytes(
    compiling, bf16_recipe, tmp_path, monkeypatch
):
    """While the catalog kernels compile in a child process, each job begun meanwhile runs
    wholly on torch (its statistics too), and the shards are the CPU backend's bytes; once
    compiled, the CPU kernels write them, their statistics read into recycled buffers."""
    from safetensors.numpy import load_file

    from della_cli.api import MergeOptions, prepare
    from della_cli.backends.cpu import warm
    from della_cli.engine import MergeEngine
    from della_cli.engine.catalog_jobs import CatalogJobs
    from della_cli.io.writer import ShardWriter

    recipe, inputs, plan = prepare(bf16_recipe("nuslerp", {"weight": 0.6}), MergeOptions())
    expected = MergeEngine(recipe, plan, inputs, "cpu")
    expected_bytes = {job.name: expected.compute(job).tobytes() for job in plan.jobs}

    class Compiling:
        def poll(self):
            return None  # compiling throughout

    started, cpu_blocks = [], []
    real = CatalogJobs.streamed_block
    monkeypatch.delenv("DELLA_COMPILE_INLINE")
    monkeypatch.setattr(warm, "missing", lambda pairs, selects, sums=(), catalog=(): compiling)
    monkeypatch.setattr(warm, "start", lambda *words: started.append(words) or Compiling())
    monkeypatch.setattr(
        CatalogJobs,
        "streamed_block",
        lambda self, task, *args: cpu_blocks.append(task) or real(self, task, *args),
    )
    engine = MergeEngine(recipe, plan, inputs, "cpu", block_elements=256)
    writer = ShardWriter(tmp_path, plan.shards)
    engine.run(writer)
    written = {}
    for file_name in writer.close():
        written.update(load_file(tmp_path / file_name))
    assert started == ([(set(), set(), set(), {("BF16", "BF16")})] if compiling else [])
    assert (cpu_blocks == []) == compiling
    assert compiling or any(task.start > 0 for task in cpu_blocks)  # tensors of several blocks
    for job in plan.jobs:
        assert written[job.name].tobytes() == expected_bytes[job.name], job.name


@pytest.mark.parametrize("case", [CASES[3], CASES[9], CASES[10]], ids=lambda c: str(c[1]))
def test_gram_matrices_in_row_chunks_give_the_same_bytes(case, monkeypatch):
    """A block's Gram matrices are computed a few rows at a time (``GRAM_ROWS``), for blocks
    of many short rows: the folds and per-row coefficients do not change."""
    method, settings, count, has_base = case
    base, experts = inputs("random", DTYPES["bf16"], (9, 37), count)
    blocks = as_blocks(base, experts, [(0, 5), (5, 9)])
    theirs = torch_merge(method, settings, blocks, has_base, DTYPES["bf16"])
    monkeypatch.setattr(spherical_methods, "GRAM_ROWS", 2)
    ours, _ = cpu_merge(method, settings, blocks, has_base, DTYPES["bf16"])
    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16))


def test_arccos_passes_a_nan_on_with_its_sign_on_both_backends():
    """The angle of a NaN cosine is that NaN, bit for bit, on both backends (numpy's and, on
    some CPUs, torch's vectorized acos flip its sign, and the merged NaNs' bits with it), and
    the angle of any other cosine is acos's."""
    from della_cli.methods.block_sums import angle_of

    values = np.array([np.nan, -np.nan, 0.5, -1.0, 1.0, 0.0] * 4)
    ours = coefficients.arccos(values)
    reference = angle_of(torch.from_numpy(values)).numpy()
    np.testing.assert_array_equal(ours.view(np.uint64), reference.view(np.uint64))
    nans = np.isnan(values)
    np.testing.assert_array_equal(ours.view(np.uint64)[nans], values.view(np.uint64)[nans])
    np.testing.assert_array_equal(ours[~nans], np.arccos(values[~nans]))
    np.testing.assert_array_equal(reference[~nans], torch.acos(torch.from_numpy(values[~nans])))
