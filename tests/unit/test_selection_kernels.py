"""The CPU backend's catalog kernels (``cpu/sce``, ``cpu/ram``, ``cpu/ramplus_tl``,
``cpu/arcee_fusion``) give the torch backend's bytes, block by block, on random and
adversarial inputs; the plan gives them to bfloat16 and float32 merges on the CPU."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from kernel_check import copy_with_nan, merge_in_child

from della_cli.api import MergeOptions, prepare
from della_cli.kernels import cpu_backend_installed

numba_installed = cpu_backend_installed()
pytestmark = pytest.mark.skipif(not numba_installed, reason="numba is not installed")

METHODS = {
    "sce": ({"select_topk": 0.4}, 3),
    "sce_one": ({"select_topk": 0.7}, 1),
    "ram": ({"epsilon": 0.25}, 3),
    "ramplus_tl": ({"epsilon": 0.25, "r": 0.5, "alpha": 0.8}, 4),
    "arcee_fusion": ({}, 1),
}
DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "f32": np.dtype(np.float32)}


def inputs(shape, models, dtype, kind, seed=0):
    """[base, *models] as (rows, row length) arrays: ``random`` normal changes on half the
    entries; ``ties`` changes from {0, ±0.25, ±0.5} (many equal variances and magnitudes,
    changes at ε exactly, zeros and all-zero entries)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    arrays = [base]
    for _ in range(models):
        if kind == "ties":
            change = rng.choice(np.float32([0, 0.25, -0.25, 0.5, -0.5]), size=shape)
        else:
            change = rng.standard_normal(shape) * (rng.random(shape) < 0.5) * 0.01
        arrays.append(base + change.astype(np.float32))
    rows = shape[0] if len(shape) > 1 else 1
    return [np.ascontiguousarray(a.astype(dtype).reshape(rows, -1)) for a in arrays]


def split(loaded, blocks):
    """``blocks()`` of the rows in ``blocks`` pieces (ties then span blocks)."""
    rows = loaded[0].shape[0]
    bounds = np.linspace(0, rows, min(blocks, rows) + 1).astype(int)
    pieces = [[a[s:e] for a in loaded] for s, e in itertools.pairwise(bounds)]
    return pieces, lambda: iter(pieces)


def torch_merge(method, values, loaded, shape, blocks):
    from della_cli.backends.torch_backend import TorchBackend

    backend = TorchBackend("cpu", "F32")
    kernel = SimpleNamespace(name=method, settings=values)
    pieces, _ = split(loaded, blocks)

    def tensors(piece):
        rows_shape = (piece[0].shape[0], *shape[1:]) if len(shape) > 1 else shape
        base, *models = (backend.as_stored(a).reshape(rows_shape) for a in piece)
        return base, models

    numel = int(np.prod(shape))
    state = None
    if method != "ram":
        state = backend.prepare(kernel, [], lambda: (tensors(p) for p in pieces), numel)
    out_code = "BF16" if loaded[0].dtype == DTYPES["bf16"] else "F32"
    outs = [backend.streamed(kernel, [], state, *tensors(p), out_code) for p in pieces]
    return state, np.concatenate(outs)


def cpu_merge(method, values, loaded, shape, blocks):
    from della_cli.backends.cpu import arcee, catalog

    pieces, blocked = split(loaded, blocks)
    numel = int(np.prod(shape))
    out = np.empty_like(loaded[0])
    state = None
    if method == "arcee_fusion":
        state = arcee.arcee_fusion_prepare(blocked, numel, shape)
    if method == "sce":
        state = catalog.sce_prepare(values["select_topk"], blocked, numel, shape)
    elif method == "ramplus_tl":
        state = catalog.ramplus_tl_prepare(values, blocked, len(loaded) - 1)
    start = 0
    for piece in pieces:
        rows = piece[0].shape[0]
        if method == "sce":
            catalog.sce_apply(state, piece, out[start : start + rows])
        elif method == "arcee_fusion":
            first = start * piece[0].shape[1]
            arcee.arcee_fusion_apply(state, piece, first, out[start : start + rows])
        else:
            catalog.ram_apply(state, values["epsilon"], piece, out[start : start + rows])
        start += rows
    return state, out


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(37, 41), (130,), (3, 4, 5)], ids=["2d", "1d", "3d"])
@pytest.mark.parametrize("case", list(METHODS))
def test_a_cpu_catalog_kernel_gives_the_torch_backends_bytes(case, shape, dtype, kind):
    values, models = METHODS[case]
    method = "sce" if case.startswith("sce") else case
    loaded = inputs(shape, models, DTYPES[dtype], kind)
    blocks = 3 if len(shape) > 1 else 1  # a 1-D tensor is one row, one block
    expected_state, expected = torch_merge(method, values, loaded, shape, blocks)
    state, ours = cpu_merge(method, values, loaded, shape, blocks)
    if method == "arcee_fusion":  # the threshold, then the merge from the kept keys
        threshold = state["threshold"]
        assert threshold.dtype == expected_state.dtype
        assert float(threshold) == float(expected_state)
    assert ours.dtype == expected.dtype
    assert np.array_equal(ours.view(np.uint8), expected.reshape(ours.shape).view(np.uint8))


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "streamed"])
@pytest.mark.parametrize("case", ["sce", "arcee_fusion"])
def test_a_large_tensor_is_selected_in_16_bit_radix_passes_to_the_same_bytes(
    case, kept, monkeypatch
):
    """From 262,144 entries the selection takes two 16-bit radix digits: over the keys kept
    from the first pass, or (above ``KEYS_KEPT_BELOW`` entries) made afresh in each pass."""
    from della_cli.backends.cpu import arcee, catalog_select
    from della_cli.methods import streamed

    values, models = METHODS[case]
    shape = (520, 512)
    assert np.prod(shape) >= catalog_select.PARTITION_BELOW
    if not kept:
        monkeypatch.setattr(streamed, "KEYS_KEPT_BELOW", catalog_select.PARTITION_BELOW)
        monkeypatch.setattr(streamed, "ARCEE_KEYS_KEPT_BYTES", 0)
    loaded = inputs(shape, models, DTYPES["bf16"], "ties")
    expected_state, expected = torch_merge(case, values, loaded, shape, 2)
    _, blocked = split(loaded, 2)
    if case == "arcee_fusion":
        state = arcee.arcee_fusion_prepare(blocked, int(np.prod(shape)), shape)
        assert (state["keys"] is not None) == kept
        assert float(state["threshold"]) == float(expected_state)
        if not kept:
            return
    _, ours = cpu_merge(case, values, loaded, shape, 2)
    assert np.array_equal(ours.view(np.uint16), expected.reshape(ours.shape).view(np.uint16))


def test_sce_keeps_exactly_k_entries_ties_by_position():
    """Every variance equal: the top-k are the last k entries, whatever the blocks."""
    from della_cli.backends.cpu import catalog

    base = np.zeros((10, 10), dtype=np.float32)
    loaded = [base, base + 1, base - 1]
    for blocks in (1, 3, 10):
        _, blocked = split(loaded, blocks)
        state = catalog.sce_prepare(0.25, blocked, 100, (10, 10))
        out = np.empty_like(base)
        start = 0
        for piece in blocked():
            catalog.sce_apply(state, piece, out[start : start + len(piece[0])])
            start += len(piece[0])
        # the kept ±1 cancel in the election (+ wins a tie), so kept entries take +1
        assert (out.reshape(-1)[:75] == 0).all() and (out.reshape(-1)[75:] == 1).all()


def test_nan_inputs_flag_the_input_and_a_nan_variance_is_refused_as_by_torch():
    from della_cli.backends.cpu import catalog

    loaded = inputs((4, 6), 3, DTYPES["f32"], "random")
    loaded[2][1, 3] = np.nan
    out = np.empty_like(loaded[0])
    flags = catalog.ram_apply(None, 1e-5, loaded, out)
    assert flags.tolist() == [False, False, True, False]
    _, expected = torch_merge("ram", {"epsilon": 1e-5}, loaded, (4, 6), 1)
    assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))
    assert np.isnan(out[1, 3])
    with pytest.raises(ValueError, match="score is NaN"):
        catalog.sce_prepare(0.5, lambda: iter([loaded]), 24, (4, 6))
    with pytest.raises(ValueError, match="score is NaN"):
        torch_merge("sce", {"select_topk": 0.5}, loaded, (4, 6), 1)


@pytest.mark.parametrize("method", ["sce", "ram", "ramplus_tl", "arcee_fusion"])
def test_the_plan_gives_the_selecting_catalog_methods_the_cpu_kernel(
    method, model_zoo, write_recipe
):
    import torch

    from della_cli.kernels import assign_kernels

    experts = 1 if method == "arcee_fusion" else 2
    recipe = {
        "merge_method": method,
        "base_model": str(model_zoo("llama", dtype=torch.bfloat16)),
        "models": [
            {"model": str(model_zoo("llama", expert=e, dtype=torch.bfloat16))}
            for e in range(1, experts + 1)
        ],
        "parameters": {"sce": {"select_topk": 0.5}}.get(method, {}),
    }
    parsed, models, plan = prepare(write_recipe(recipe), MergeOptions(device="cpu"))
    labels = {job.kernel.label for job in plan.jobs if job.action == "merge"}
    # the tiny model's tensors are small: their keys are kept after the first pass
    passes = {"sce": ", 3 passes", "ram": "", "ramplus_tl": ", 2 passes"}.get(method, ", 2 passes")
    assert labels == {f"cpu/{method}{passes}"}
    on_cuda = assign_kernels(plan, parsed, models.base, models.experts, "cuda")
    assert {job.kernel.backend for job in on_cuda.jobs if job.action == "merge"} == {"torch"}
    _, _, wide = prepare(write_recipe({**recipe, "dtype": "float64"}), MergeOptions(device="cpu"))
    assert {job.kernel.backend for job in wide.jobs if job.action == "merge"} == {"torch"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_the_bit_test_for_nan_and_inf_agrees_with_isfinite(dtype):
    from della_cli.engine.reporting import has_nonfinite

    dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    values = np.array([0.0, -1.5, 3e4, -0.0], dtype=np.float32).astype(dtype)
    assert not has_nonfinite(values) and not has_nonfinite(values[:0])
    for bad in (np.nan, np.inf, -np.inf):
        changed = values.copy()
        changed[2] = bad
        assert has_nonfinite(changed.reshape(2, 2))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_bit_test_finds_a_nan_or_inf_in_any_chunk(dtype, monkeypatch):
    """The check goes a chunk at a time: a bad entry anywhere, in a chunk of its own or a
    short last one, is found; an array of finite values is not flagged."""
    from della_cli.engine import reporting

    monkeypatch.setattr(reporting, "NONFINITE_CHUNK", 4)
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    values = np.linspace(-3.0, 3.0, 10, dtype=np.float32).astype(dtype)
    assert not reporting.has_nonfinite(values)
    for index in range(values.size):
        for bad in (np.nan, -np.inf):
            changed = values.copy()
            changed[index] = bad
            assert reporting.has_nonfinite(changed), (index, bad)


def test_passthrough_copies_its_input_as_stored_without_torch_or_numba(
    model_zoo, write_recipe, tmp_path
):
    """No scale: ``cpu/passthrough``, the bytes of the input (a NaN in it reported); with a
    scale, the torch reference."""

    from safetensors.numpy import load_file

    source = model_zoo("llama", expert=1, dtype=__import__("torch").bfloat16)
    model = tmp_path / "model"
    name = copy_with_nan(source, model, 0x7FC0)  # a bfloat16 NaN
    tensors = load_file(next(model.glob("*.safetensors")))  # with the NaN
    recipe = write_recipe({"merge_method": "passthrough", "models": [{"model": str(model)}]})
    _, _, plan = prepare(recipe, MergeOptions(device="cpu"))
    assert {job.kernel.label for job in plan.jobs if job.action == "merge"} == {"cpu/passthrough"}
    warnings, imported = merge_in_child(recipe, tmp_path / "out")
    assert "NaN or Inf" in warnings and name in warnings
    assert imported == []
    out = load_file(next((tmp_path / "out").glob("*.safetensors")))
    assert all(
        np.array_equal(out[n].view(np.uint16), t.view(np.uint16)) for n, t in tensors.items()
    )
    scaled = write_recipe(
        {
            "merge_method": "passthrough",
            "models": [{"model": str(model), "parameters": {"scale": 2.0}}],
        }
    )
    _, _, plan = prepare(scaled, MergeOptions(device="cpu"))
    assert {job.kernel.label for job in plan.jobs if job.action == "merge"} == {"torch/passthrough"}
