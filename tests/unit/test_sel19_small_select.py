"""The one-call selection of a small tensor (``select_small``, issue 19): every expert's TIES or
breadcrumbs mask equals the streamed selection's (``select.window_keep_mask``) and the torch
reference's, and a merge through it writes the bytes of the streamed path and of torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_check import without_cpu_backend

from della_cli.api import MergeOptions, prepare
from della_cli.backends.cpu import rules
from della_cli.io.dtypes import from_torch
from della_cli.methods.counts import magnitude_rank_window
from della_cli.methods.sparsify import middle_magnitude_mask, top_magnitude_mask

pytestmark = pytest.mark.skipif(not rules.available(), reason="needs numba")


def experts_and_base(shape, dtype, seed, count=3, coarse=False):
    """``count`` experts near a base; ``coarse``: deltas on a grid of 1/2000, so many
    magnitudes are equal and some deltas are zero."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.02
    experts = []
    for _ in range(count):
        delta = torch.randn(shape, generator=generator) * 0.002
        if coarse:
            delta = (delta * 2000).round() / 2000
        experts.append((base + delta).to(dtype))
    return experts, base.to(dtype)


def one_call(experts, base, windows):
    from della_cli.backends.cpu import select_small

    arrays = [from_torch(expert) for expert in experts]
    return select_small.window_keep_masks(arrays, from_torch(base), windows)


def streamed(expert, base, window):
    from della_cli.backends.cpu import select

    return select.window_keep_mask(from_torch(expert), from_torch(base), *window)


def reference(expert, base, density, gamma):
    magnitude = (expert.float() - base.float()).abs()
    if gamma is None:
        return top_magnitude_mask(magnitude, density).numpy()
    return middle_magnitude_mask(magnitude, density, gamma).numpy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize(
    ("density", "gamma"),
    [(0.5, None), (0.01, None), (0.0, None), (1.0, None), (0.3, 0.05), (0.9, 0.2), (0.5, 0.0)],
)
@pytest.mark.parametrize("shape", [(96, 64), (7,), (3, 5), (300, 70), (1, 1)])
def test_masks_equal_the_streamed_selection_and_the_reference(dtype, coarse, density, gamma, shape):
    experts, base = experts_and_base(shape, dtype, seed=sum(shape), coarse=coarse)
    window = magnitude_rank_window(base.numel(), density, gamma)
    masks = one_call(experts, base, [window] * len(experts))
    assert masks.shape == (len(experts), *shape) and masks.dtype == np.bool_
    for expert, mask in zip(experts, masks, strict=True):
        assert np.array_equal(mask, streamed(expert, base, window))
        assert np.array_equal(mask, reference(expert, base, density, gamma))
        assert int(mask.sum()) == window[1] - window[0]


def test_each_expert_has_its_own_window_in_one_call():
    """Windows differ per expert (their densities do), an expert may keep all or none, and
    out-of-range ends are clipped as the streamed selection clips them."""
    experts, base = experts_and_base((40, 30), torch.bfloat16, seed=5, count=6, coarse=True)
    n = base.numel()
    windows = [(600, n), (0, n), (n, n), (-3, n + 4), (17, 1100), (500, 500)]
    masks = one_call(experts, base, windows)
    for expert, window, mask in zip(experts, windows, masks, strict=True):
        assert np.array_equal(mask, streamed(expert, base, window)), window
    assert masks[1].all() and not masks[2].any() and masks[3].all() and not masks[5].any()


def test_equal_magnitudes_rank_by_position():
    """Every |δ| equal: the window's ranks are the positions themselves, at both ends."""
    base = torch.zeros(1000, dtype=torch.bfloat16)
    expert = torch.full((1000,), 0.5, dtype=torch.bfloat16)
    (mask,) = one_call([expert], base, [(300, 900)])
    assert np.array_equal(mask, (np.arange(1000) >= 300) & (np.arange(1000) < 900))


def test_zero_deltas_rank_lowest():
    """Unchanged entries (δ = 0) are the smallest magnitudes: a trim of the top half keeps the
    changed ones first, then zeros by position."""
    base = torch.zeros(10, dtype=torch.float32)
    expert = torch.tensor([0, 0, 3, 0, -1, 0, 0, 2, 0, 0], dtype=torch.float32)
    (mask,) = one_call([expert], base, [(5, 10)])
    assert mask.nonzero()[0].tolist() == [2, 4, 7, 8, 9]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nan_and_inf_rank_as_the_streamed_selection_ranks_them(dtype):
    """A NaN or an infinite δ is selected as the streamed selection selects it: its magnitude
    key ranks above every finite one, NaN above Inf."""
    experts, base = experts_and_base((50, 20), dtype, seed=9)
    expert = experts[0].clone()
    expert.view(-1)[[3, 400, 999]] = float("nan")
    expert.view(-1)[[10, 20]] = float("inf")
    n = base.numel()
    windows = [(n - 5, n), (n - 3, n), (n - 8, n - 3), (n // 2, n - 2)]
    masks = one_call([expert] * len(windows), base, windows)
    for window, mask in zip(windows, masks, strict=True):
        assert np.array_equal(mask, streamed(expert, base, window)), window
    assert masks[1].reshape(-1).nonzero()[0].tolist() == [3, 400, 999]
    assert masks[0].reshape(-1).nonzero()[0].tolist() == [3, 10, 20, 400, 999]


def test_mixed_dtypes_are_refused():
    experts, base = experts_and_base((4, 4), torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="shape and dtype"):
        one_call([experts[0], experts[1].float()], base, [(2, 16)] * 2)


@pytest.mark.parametrize(
    ("method", "parameters"),
    [("ties", {"density": 0.3}), ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05})],
)
def test_a_merge_selects_each_small_tensor_in_one_call_with_the_same_bytes(
    method, parameters, bf16_recipe, tmp_path, monkeypatch
):
    """Every merged tensor of the tiny model is small: each is selected in one call, and the
    output is the streamed selection's (the one-call path turned off) and torch's, byte for
    byte."""
    from della_cli.api import run_merge
    from della_cli.backends.cpu import select_small
    from della_cli.engine.cpu_jobs import CpuJobs

    recipe_path = bf16_recipe(method, parameters)
    calls = []
    window_keep_masks = select_small.window_keep_masks

    def counted(experts, base, windows):
        calls.append(len(experts))
        return window_keep_masks(experts, base, windows)

    monkeypatch.setattr(select_small, "window_keep_masks", counted)
    run_merge(recipe_path, tmp_path / "one_call", MergeOptions(device="cpu"))
    _, inputs, plan = prepare(recipe_path, MergeOptions())
    for reader in [inputs.base, *inputs.experts]:
        reader.close()
    merged_tensors = sum(job.action == "merge" for job in plan.jobs)
    assert merged_tensors > 5 and calls == [2] * merged_tensors
    monkeypatch.setattr(CpuJobs, "SMALL_SELECTION_BELOW", 0)
    run_merge(recipe_path, tmp_path / "streamed", MergeOptions(device="cpu"))
    assert len(calls) == merged_tensors  # not called again
    without_cpu_backend(monkeypatch)
    run_merge(recipe_path, tmp_path / "torch", MergeOptions(device="cpu"))
    written = (tmp_path / "one_call" / "model.safetensors").read_bytes()
    assert written == (tmp_path / "streamed" / "model.safetensors").read_bytes()
    assert written == (tmp_path / "torch" / "model.safetensors").read_bytes()


def test_the_engine_selects_in_one_call_only_small_tensors_of_one_dtype():
    """Above ``SMALL_SELECTION_BELOW`` entries, or with an expert's rows fitted to another
    vocabulary (float32 beside a bfloat16 base), each expert goes to the streamed selection."""
    from types import SimpleNamespace

    from della_cli.engine.cpu_jobs import CpuJobs
    from della_cli.engine.masks import _one_call

    small = SimpleNamespace(numel=CpuJobs.SMALL_SELECTION_BELOW - 1)
    large = SimpleNamespace(numel=CpuJobs.SMALL_SELECTION_BELOW)
    bf16 = [from_torch(torch.zeros(2, dtype=torch.bfloat16))] * 3
    fitted = [*bf16[:2], np.zeros(2, dtype=np.float32)]
    assert _one_call(small, bf16)
    assert not _one_call(large, bf16)
    assert not _one_call(small, fitted)
