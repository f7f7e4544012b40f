"""arcee_fusion's importance keys kept within a budget (issue 17): a tensor whose keys fit in
``streamed.ARCEE_KEYS_KEPT_BYTES`` makes its importance once, and the selection and the merge
read the kept keys; one over the budget makes it afresh in each pass and merges on torch. Both
give the torch reference's bytes; the in-place importance gives the out-of-place chain's."""

from __future__ import annotations

import itertools
import threading

import ml_dtypes
import numpy as np
import pytest
import torch

pytest.importorskip("numba")

BF16 = np.dtype(ml_dtypes.bfloat16)


def two_models(shape, dtype, seed):
    """[base, expert] as (rows, row length) arrays: normal changes on a third of the entries,
    some rows unchanged (their KL is 0, so many importances tie at 0)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    change = rng.standard_normal(shape) * (rng.random(shape) < 0.33) * 0.05
    if len(shape) > 1:
        change[::3] = 0
    rows = shape[0] if len(shape) > 1 else 1
    return [np.ascontiguousarray(a.astype(dtype).reshape(rows, -1)) for a in (base, base + change)]


def blocks_of(loaded, bounds):
    """The row blocks between ``bounds`` (ragged where they are uneven)."""
    return [[a[s:e] for a in loaded] for s, e in itertools.pairwise(bounds)]


def reference_merge(loaded, shape):
    """``selection.arcee_fusion`` of the whole tensor in the output dtype (the golden bytes)."""
    from della_cli.methods import selection

    tensors = [
        torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
        if a.dtype == BF16
        else torch.from_numpy(a)
        for a in loaded
    ]
    base, other = (t.reshape(shape) for t in tensors)
    merged = selection.arcee_fusion(base, other)
    if loaded[0].dtype == BF16:
        return merged.to(torch.bfloat16).view(torch.uint16).numpy().reshape(loaded[0].shape)
    return merged.numpy().reshape(loaded[0].shape)


def kept_merge(loaded, shape, pieces):
    """The CPU kernels with the keys kept: the threshold, the state and the merged rows."""
    from della_cli.backends.cpu import arcee

    numel = int(np.prod(shape))
    state = arcee.arcee_fusion_prepare(lambda: iter(pieces), numel, shape, keep=True)
    out = np.empty_like(loaded[0])
    start = 0
    for piece in pieces:
        rows = piece[0].shape[0]
        arcee.arcee_fusion_apply(state, piece, start * piece[0].shape[1], out[start : start + rows])
        start += rows
    return state, out


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)], ids=["bf16", "f32"])
@pytest.mark.parametrize(
    "shape, bounds",
    [((37, 41), (0, 16, 32, 37)), ((300, 7), (0, 128, 256, 300)), ((5, 3, 8), (0, 2, 4, 5))],
    ids=["ragged-2d", "ragged-narrow", "3d"],
)
def test_kept_and_recomputed_keys_give_the_same_threshold_and_the_references_bytes(
    shape, bounds, dtype
):
    from della_cli.backends.cpu import arcee

    loaded = two_models(shape, dtype, seed=sum(shape))
    pieces = blocks_of(loaded, bounds)
    numel = int(np.prod(shape))
    kept_state, merged = kept_merge(loaded, shape, pieces)
    fresh = arcee.arcee_fusion_prepare(lambda: iter(pieces), numel, shape, keep=False)
    assert kept_state["keys"] is not None and kept_state["keys"].size == numel
    assert fresh["keys"] is None
    assert kept_state["threshold"].dtype == fresh["threshold"].dtype == torch.float32
    assert float(kept_state["threshold"]) == float(fresh["threshold"])
    view = np.uint16 if dtype == BF16 else np.float32
    assert np.array_equal(merged.view(view), reference_merge(loaded, shape))


def test_the_budget_decides_which_tensors_keep_their_keys(monkeypatch):
    """Below ``KEYS_KEPT_BELOW`` every selection keeps its keys; above it only arcee_fusion's
    within the budget (4 bytes an entry), and the plan counts one radix pass fewer."""
    from della_cli.methods import streamed

    monkeypatch.setattr(streamed, "KEYS_KEPT_BELOW", 100)
    monkeypatch.setattr(streamed, "ARCEE_KEYS_KEPT_BYTES", 4 * 1000)
    assert streamed.keys_kept("sce", 99) and streamed.keys_kept("arcee_fusion", 99)
    assert not streamed.keys_kept("sce", 1000)
    assert streamed.keys_kept("arcee_fusion", 1000)
    assert not streamed.keys_kept("arcee_fusion", 1001)
    assert streamed.passes("arcee_fusion", {}, 1, "F32", keys_kept=True) == 2
    assert streamed.passes("arcee_fusion", {}, 1, "F32", keys_kept=False) == 3
    assert streamed.statistics_bytes("arcee_fusion", {}, (10, 100), 2) == 8 * (1 << 16) + 4000
    assert streamed.statistics_bytes("arcee_fusion", {}, (11, 100), 2) == 8 * (1 << 16)


def test_the_in_place_importance_gives_the_out_of_place_chains_bytes():
    """The reference's importance on its fresh temporaries in place: the bytes of the chain it
    replaced, |θ − θ₀| × Σ p·log(p/q), for float32 and float64 rows, 1-D to 3-D."""
    from della_cli.methods import selection

    generator = torch.Generator().manual_seed(17)
    for shape, dtype in [
        ((64, 300), torch.float32),
        ((513,), torch.float32),
        ((3, 5, 7), torch.float64),
    ]:
        base = torch.randn(shape, generator=generator, dtype=dtype)
        other = base + 0.1 * torch.randn(shape, generator=generator, dtype=dtype)
        p = torch.softmax(other, dim=-1) + 1e-8
        q = torch.softmax(base, dim=-1) + 1e-8
        chain = (other - base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
        ours = selection.arcee_fusion_importance(base, other)
        assert ours.dtype == chain.dtype and torch.equal(ours, chain)


@pytest.fixture
def arcee_recipe(model_zoo, write_recipe):
    return write_recipe(
        {
            "merge_method": "arcee_fusion",
            "base_model": str(model_zoo("llama", dtype=torch.bfloat16)),
            "models": [{"model": str(model_zoo("llama", expert=1, dtype=torch.bfloat16))}],
        }
    )


def engine_merge(recipe_path, folder, budget):
    """The merge's shard bytes through the engine in 256-entry blocks (every tiny matrix in
    several, ragged at its end), tensors of 64 entries or more over ``KEYS_KEPT_BELOW``, with
    ``budget`` bytes of arcee_fusion keys; and whether each prepared tensor kept its keys."""
    from della_cli.api import MergeOptions, prepare
    from della_cli.backends.cpu import arcee
    from della_cli.engine import MergeEngine
    from della_cli.io.writer import ShardWriter
    from della_cli.methods import streamed

    kept: list[bool] = []  # per prepared tensor of 64 entries or more
    original = arcee.arcee_fusion_prepare

    def recorded(blocks, numel, shape, *options):
        state = original(blocks, numel, shape, *options)
        if numel >= 64:
            kept.append(state["keys"] is not None)
        return state

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(streamed, "KEYS_KEPT_BELOW", 64)
        patch.setattr(streamed, "ARCEE_KEYS_KEPT_BYTES", budget)
        patch.setattr(arcee, "arcee_fusion_prepare", recorded)
        recipe, inputs, plan = prepare(recipe_path, MergeOptions())
        engine = MergeEngine(recipe, plan, inputs, "cpu", block_elements=256)
        folder.mkdir()
        writer = ShardWriter(folder, plan.shards)
        engine.run(writer)
        shards = {name: (folder / name).read_bytes() for name in writer.close()}
    passes = {job.kernel.passes for job in plan.jobs if job.numel >= 64}
    return shards, kept, passes


def test_a_merge_with_kept_keys_has_the_bytes_of_one_that_makes_them_again(arcee_recipe, tmp_path):
    """A budget of 0 forces the old path (importance made in each pass, merged on torch);
    a large one keeps every tensor's keys: the same shards."""
    fresh, fresh_kept, fresh_passes = engine_merge(arcee_recipe, tmp_path / "a", 0)
    kept, kept_kept, kept_passes = engine_merge(arcee_recipe, tmp_path / "b", 1 << 30)
    assert fresh_kept and not any(fresh_kept)
    assert kept_kept and all(kept_kept)
    assert fresh_passes == {3} and kept_passes == {2}
    assert kept == fresh


@pytest.mark.parametrize("helper_count", [1, 2])
@pytest.mark.parametrize(
    "shape, bounds",
    [((37, 41), (0, 16, 32, 37)), ((300, 7), (0, 128, 256, 300)), ((5, 3, 8), (0, 2, 4, 5))],
    ids=["ragged-2d", "ragged-narrow", "3d"],
)
def test_keys_made_on_several_threads_are_those_made_on_one(
    shape, bounds, helper_count, monkeypatch
):
    """A block's rows split in whole chunks among the calling thread and the helpers give
    every key of the one-thread run, in its place; a NaN found by a helper is an error."""
    from concurrent.futures import ThreadPoolExecutor

    from della_cli.backends.cpu import arcee

    monkeypatch.setattr(arcee, "IMPORTANCE_ELEMENTS", 40)  # blocks of several chunks
    loaded = two_models(shape, BF16, seed=7)
    pieces = blocks_of(loaded, bounds)
    numel = int(np.prod(shape))
    alone = arcee.arcee_fusion_prepare(lambda: iter(pieces), numel, shape, keep=True)
    split = []
    real = arcee._importance_keys

    def watched(base, model, start, stop, shape, keys):
        split.append(threading.current_thread().name)
        return real(base, model, start, stop, shape, keys)

    monkeypatch.setattr(arcee, "_importance_keys", watched)
    with ThreadPoolExecutor(helper_count, thread_name_prefix="helper") as helpers:
        shared = arcee.arcee_fusion_prepare(
            lambda: iter(pieces), numel, shape, True, helpers, helper_count
        )
        assert np.array_equal(shared["keys"], alone["keys"])
        assert float(shared["threshold"]) == float(alone["threshold"])
        assert any(name.startswith("helper") for name in split)
        assert "MainThread" in split
        poisoned = [[a.copy() for a in piece] for piece in pieces]
        poisoned[0][1].reshape(-1)[-1] = np.nan  # in the last rows of the first block
        with pytest.raises(ValueError):
            arcee.arcee_fusion_prepare(
                lambda: iter(poisoned), numel, shape, True, helpers, helper_count
            )


def test_kept_keys_go_into_the_buffer_given_where_it_is_large_enough():
    """The engine hands each tensor the buffer of the largest kept so far: the keys land in
    it (no fresh memory), the same keys; a buffer too small is left alone."""
    from della_cli.backends.cpu import arcee

    shape = (37, 41)
    loaded = two_models(shape, BF16, seed=3)
    pieces = blocks_of(loaded, (0, 16, 32, 37))
    numel = int(np.prod(shape))
    fresh = arcee.arcee_fusion_prepare(lambda: iter(pieces), numel, shape, keep=True)
    large = np.zeros(numel + 100, dtype=np.uint32)
    reused = arcee.arcee_fusion_prepare(lambda: iter(pieces), numel, shape, True, None, 0, large)
    assert np.shares_memory(reused["keys"], large) and reused["keys"].size == numel
    assert np.array_equal(reused["keys"], fresh["keys"])
    assert float(reused["threshold"]) == float(fresh["threshold"])
    small = np.zeros(numel - 1, dtype=np.uint32)
    alone = arcee.arcee_fusion_prepare(lambda: iter(pieces), numel, shape, True, None, 0, small)
    assert not np.shares_memory(alone["keys"], small)
    assert np.array_equal(alone["keys"], fresh["keys"]) and not small.any()


@pytest.mark.parametrize("helper_count", [1, 2])
def test_radix_digits_counted_on_every_thread_select_what_one_thread_selects(
    helper_count, monkeypatch
):
    """A tensor selected by radix digits: each thread counts the top digits of the keys it
    makes (no pass of their own over the kept keys), the helpers count part of the low
    digits, and the quartiles, the threshold and the keys are those of one thread."""
    from concurrent.futures import ThreadPoolExecutor

    from della_cli.backends.cpu import arcee, catalog_kernels, catalog_select

    monkeypatch.setattr(arcee, "IMPORTANCE_ELEMENTS", 40)
    monkeypatch.setattr(catalog_select, "PARTITION_BELOW", 64)  # radix from 64 keys
    shape, bounds = (300, 7), (0, 128, 256, 300)
    loaded = two_models(shape, BF16, seed=11)
    pieces = blocks_of(loaded, bounds)
    numel = int(np.prod(shape))
    alone = arcee.arcee_fusion_prepare(lambda: iter(pieces), numel, shape, keep=True)
    counted = {"top": [], "low": []}
    top, low = catalog_kernels.top_digits, catalog_kernels.low_digits

    def watched_top(keys, counts):
        counted["top"].append((threading.current_thread().name, keys.size))
        return top(keys, counts)

    def watched_low(keys, slots, counts):
        counted["low"].append((threading.current_thread().name, keys.size))
        return low(keys, slots, counts)

    monkeypatch.setattr(catalog_kernels, "top_digits", watched_top)
    monkeypatch.setattr(catalog_kernels, "low_digits", watched_low)
    with ThreadPoolExecutor(helper_count, thread_name_prefix="helper") as helpers:
        shared = arcee.arcee_fusion_prepare(
            lambda: iter(pieces), numel, shape, True, helpers, helper_count
        )
    assert np.array_equal(shared["keys"], alone["keys"])
    assert float(shared["threshold"]) == float(alone["threshold"])
    assert max(size for _, size in counted["top"]) < numel  # chunks only
    assert sum(size for _, size in counted["top"]) == numel
    assert {name.split("_")[0] for name, _ in counted["top"]} == {"MainThread", "helper"}
    assert sum(size for _, size in counted["low"]) == numel
    assert len(counted["low"]) == helper_count + 1  # a share each
    assert {name.split("_")[0] for name, _ in counted["low"]} == {"MainThread", "helper"}


def test_a_selection_given_the_top_digits_and_helpers_finds_the_partitions_ranks():
    from concurrent.futures import ThreadPoolExecutor

    from della_cli.backends.cpu import catalog_kernels, catalog_select

    rng = np.random.default_rng(5)
    keys = rng.integers(0, 1 << 20, catalog_select.PARTITION_BELOW + 1001, dtype=np.uint32)
    keys[::7] = keys[3]  # ties at a rank
    ranks = [0, 17, keys.size // 2, keys.size - 1]
    ordered = np.sort(keys)
    top = catalog_select.digit_counts()
    catalog_kernels.top_digits(keys, top)
    with ThreadPoolExecutor(2) as helpers:
        found = catalog_select.select_kept(keys, ranks, top, helpers, 2)
    assert found == catalog_select.select_kept(keys, ranks)
    for (key, ties), rank in zip(found, ranks, strict=True):
        assert key == ordered[rank]
        assert ties == rank - int(np.searchsorted(ordered, key))


def test_arcee_fusion_runs_torch_on_one_thread_per_caller(monkeypatch):
    """The importances are made by the merging thread and its helpers at once: torch gets
    one thread each, whatever it had (its default is every core)."""
    from della_cli.engine.catalog_jobs import CatalogJobs
    from della_cli.engine.threads import ThreadBudget

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        jobs = CatalogJobs(None, None, ThreadBudget(2))
        job = type("Job", (), {})()
        job.kernel = type("Kernel", (), {"name": "arcee_fusion", "settings": {}})()
        job.numel, job.shape = 6, (2, 3)
        loaded = two_models((2, 3), BF16, seed=1)
        state = jobs.prepare(job, lambda: iter([loaded]))
        assert torch.get_num_threads() == 1
        assert state["keys"].size == 6
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("helper_count", [1, 2])
def test_a_block_merged_on_several_threads_is_the_one_threads(helper_count, monkeypatch):
    """The merge pass splits a block's rows in whole chunks among the calling thread and the
    helpers: the same bytes and input flags as one thread, a NaN flagged whichever thread
    meets it."""
    from concurrent.futures import ThreadPoolExecutor

    from della_cli.backends.cpu import arcee, catalog_kernels
    from della_cli.methods import streamed

    monkeypatch.setattr(streamed, "CPU_CHUNK_ELEMENTS", 41 * 3)  # chunks of 3 rows
    shape = (37, 41)
    loaded = two_models(shape, BF16, seed=9)
    loaded[1][-1, -1] = np.nan  # in the last chunk, a helper's
    state = arcee.arcee_fusion_prepare(lambda: iter([[loaded[0], loaded[0]]]), 37 * 41, shape)
    alone = np.empty_like(loaded[0])
    flags_alone = arcee.arcee_fusion_apply(state, loaded, 0, alone)
    threads = []
    fuse = catalog_kernels.arcee_fuse

    def watched(*args):
        threads.append(threading.current_thread().name)
        return fuse(*args)

    monkeypatch.setattr(catalog_kernels, "arcee_fuse", watched)
    shared = np.empty_like(loaded[0])
    with ThreadPoolExecutor(helper_count, thread_name_prefix="helper") as helpers:
        flags = arcee.arcee_fusion_apply(state, loaded, 0, shared, helpers, helper_count)
    assert np.array_equal(shared.view(np.uint16), alone.view(np.uint16))
    assert flags.tolist() == flags_alone.tolist() == [False, True]
    assert {name.split("_")[0] for name in threads} == {"MainThread", "helper"}
