"""The CPU backend's block kernel must give exactly the bytes of the torch reference.

Each case runs ``methods.merge_tensor`` (the torch backend) and ``backends.cpu.block`` on the
same float32 inputs and compares bit patterns, so -0.0 against 0.0 and NaN payloads count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from della_cli.backends.cpu import block, rules
from della_cli.io.dtypes import from_torch, to_torch
from della_cli.methods import METHODS, ExpertParams, GlobalParams, Rescale, merge_tensor
from della_cli.methods.randomness import Draws, derive_key

pytestmark = pytest.mark.skipif(not rules.available(), reason="numba is not installed")


def awkward_delta(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """bf16-derived deltas (many equal magnitudes) with zeros, negative zeros and long ties."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator).bfloat16().float()
    expert = (base + 0.01 * torch.randn(shape, generator=generator)).bfloat16().float()
    delta = expert - base
    flat = delta.view(-1)
    flat[::13] = 0.0
    flat[5::17] = -0.0
    flat[7::19] = flat[min(7, flat.numel() - 1)]
    return delta


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(1, -1) if tensor.dim() <= 1 else tensor.reshape(tensor.shape[0], -1)


def both_backends(method, base, models, params, global_params, keys, start=0):
    """(cpu, torch) results of one merge; expert t draws with ``keys[t]`` from ``start``."""
    spec = METHODS[method]
    reference = merge_tensor(
        spec,
        base,
        models,
        params,
        global_params,
        uniform=lambda t: Draws(keys[t], start),
    )
    plans = []
    for p, key in zip(params, keys, strict=True):
        if spec.sparsifier.value == "none" or p.density is None or p.density >= 1.0:
            plans.append(block.ExpertPlan(block.KEEP_ALL, weight=p.weight))
            continue
        mode = block.MAGPRUNE if spec.sparsifier.value == "magprune" else block.RANDOM
        epsilon = (p.epsilon or 0.0) if mode == block.MAGPRUNE else 0.0
        plans.append(block.ExpertPlan(mode, p.density, epsilon, p.weight, Draws(key).key_words))
    merged, _ = block.merge_block(
        from_torch(as_rows(base)),
        [from_torch(as_rows(m)) for m in models],
        plans,
        None,
        start=start,
        rescale=global_params.rescale is Rescale.KEEP_PROB,
        on_deltas=spec.on_deltas,
        consensus=spec.sign_consensus,
        normalize=global_params.normalize,
        lambda_=global_params.lambda_,
        out_dtype=np.dtype(np.float32),
    )
    return to_torch(merged).reshape(base.shape), reference


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


CASES = [
    ((64, 2816), 0),
    ((300, 7), 0),
    ((3, 5, 40), 12_345),  # viewed as (3, 200)
    ((1, 2), 0),
    ((2, 3000), 2**32 - 4000),  # flat indices cross 2**32
    ((257,), 2**31 - 100),  # one row; indices cross 2**31
]


@pytest.mark.parametrize("rescale", [Rescale.KEEP_PROB, Rescale.NONE])
@pytest.mark.parametrize(("shape", "start"), CASES)
@pytest.mark.parametrize("method", ["della_linear", "dare_linear"])
def test_random_drops_match_the_torch_reference_bit_for_bit(method, shape, start, rescale):
    delta = awkward_delta(shape, seed=len(shape) + shape[0])
    base = torch.zeros(shape)  # θ = 0 + δ̂: the drop itself is what is compared
    params = [ExpertParams(density=0.7, epsilon=0.07)]
    global_params = GlobalParams(rescale=rescale, normalize=False)
    cpu, reference = both_backends(
        method, base, [delta], params, global_params, [derive_key(7, "w", 1)], start
    )
    assert same_bits(cpu, reference)
    if delta.numel() >= 1000:  # a real drop happened on this input
        kept = int((reference != 0).sum()) / int((delta != 0).sum())
        assert 0.6 < kept < 0.8


@pytest.mark.parametrize("epsilon", [0.0, 0.29])
def test_magprune_matches_at_the_window_edges(epsilon):
    delta = awkward_delta((32, 512), seed=3)
    params = [ExpertParams(density=0.7, epsilon=epsilon)]
    cpu, reference = both_backends(
        "della_linear", torch.zeros(32, 512), [delta], params, GlobalParams(normalize=False), [99]
    )
    assert same_bits(cpu, reference)


def test_non_finite_inputs_give_the_same_bits():
    delta = awkward_delta((8, 256), seed=4)
    delta[0, 0], delta[1, 1], delta[2, 2] = float("nan"), float("inf"), float("-inf")
    params = [ExpertParams(density=0.6, epsilon=0.1)]
    cpu, reference = both_backends(
        "della_linear", torch.zeros(8, 256), [delta], params, GlobalParams(normalize=False), [5]
    )
    assert same_bits(cpu, reference)


@pytest.mark.parametrize("method", ["della", "dare_ties", "dare_linear", "task_arithmetic"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, -0.25, 2.0], [0.0, 0.0, 1.5]])
def test_elect_and_fuse_match_the_torch_reference(method, normalize, weights):
    generator = torch.Generator().manual_seed(11)
    base = torch.randn(64, 96, generator=generator)
    models = [base + awkward_delta((64, 96), seed) for seed in (1, 2, 3)]
    models[0][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    models[1][1, :2] = base[1, :2]  # zero deltas
    models[2][2, 0] = base[2, 0] - (models[0][2, 0] - base[2, 0])  # sums cancelling to 0
    params = [ExpertParams(weight=w, density=0.8, epsilon=0.1) for w in weights]
    global_params = GlobalParams(lambda_=1.1, normalize=normalize)
    keys = [derive_key(3, "t", index) for index in range(3)]
    cpu, reference = both_backends(method, base, models, params, global_params, keys)
    assert same_bits(cpu, reference)


def test_bfloat16_inputs_are_widened_and_rounded_as_torch_does():
    generator = torch.Generator().manual_seed(5)
    base = (torch.randn(70, 1000, generator=generator) * 1e30).bfloat16()
    specials = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -3e38]
    base.view(-1)[: len(specials)] = torch.tensor(specials).bfloat16()
    expert = (base.float() + torch.randn(70, 1000, generator=generator)).bfloat16()
    params = ExpertParams(weight=0.3)
    plans = [block.ExpertPlan(block.KEEP_ALL, weight=0.3)]
    merged, nonfinite = block.merge_block(
        from_torch(base),
        [from_torch(expert)],
        plans,
        None,
        start=0,
        rescale=True,
        on_deltas=True,
        consensus=False,
        normalize=False,
        lambda_=1.0,
        out_dtype=from_torch(base).dtype,
    )
    spec = METHODS["task_arithmetic"]
    reference = merge_tensor(
        spec, base.float(), [expert.float()], [params], GlobalParams(normalize=False)
    )
    assert torch.equal(to_torch(merged).view(torch.int16), reference.bfloat16().view(torch.int16))
    assert nonfinite.tolist() == [True, True]


def test_one_compilation_serves_every_expert_count():
    """numba compiles once per argument type; the experts go in as addresses so that the type
    does not change with their count (each count cost 13 s of compilation before)."""
    base = np.zeros((3, 40), dtype=np.float32)

    def merge(count: int) -> None:
        plans = [block.ExpertPlan(block.KEEP_ALL) for _ in range(count)]
        block.merge_block(
            base,
            [base + index for index in range(count)],
            plans,
            None,
            start=0,
            rescale=True,
            on_deltas=True,
            consensus=True,
            normalize=False,
            lambda_=1.0,
            out_dtype=np.dtype(np.float32),
        )

    merge(1)
    signatures = len(block._merge_rows.signatures)
    for count in (2, 3, 7):
        merge(count)
    assert len(block._merge_rows.signatures) == signatures


@pytest.mark.parametrize(
    ("weights", "density", "exact"),
    [
        ([1.0, 1.0, 1.0], 0.5, [0.9, 0.55, 0.5, -0.65, -0.9, 0.0]),
        ([1.0, 2.0, 1.0], 0.5, [-0.5, 1.9 / 3, 0.5, -1.9 / 3, -0.9, 0.0]),
        ([1.0, 1.0, 1.0], 1.0, [0.55, 0.55, 0.5, -0.65, -0.9, 0.3]),
    ],
)
def test_golden_e2_ties_on_the_cpu_backend(weights, density, exact):
    """ALGORITHMS.md E2, the trim made by ``select`` and the merge by the block kernel."""
    from della_cli.backends.cpu.select import window_keep_mask
    from della_cli.methods.counts import magnitude_rank_window

    deltas = [
        [0.9, -0.1, 0.4, -0.7, 0.05, 0.3],
        [-0.5, 0.8, -0.2, -0.6, 0.1, -0.05],
        [0.2, 0.3, 0.6, 0.1, -0.9, 0.0],
    ]
    base = np.zeros((1, 6), dtype=np.float32)
    experts = [np.array([delta], dtype=np.float32) for delta in deltas]
    low, high = magnitude_rank_window(6, density, None)
    masks = [window_keep_mask(expert, base, low, high) for expert in experts]
    mode = block.MASK if density < 1 else block.KEEP_ALL
    merged, _ = block.merge_block(
        base,
        experts,
        [block.ExpertPlan(mode, weight=w) for w in weights],
        masks,
        start=0,
        rescale=True,
        on_deltas=True,
        consensus=True,
        normalize=True,
        lambda_=1.0,
        out_dtype=np.dtype(np.float32),
    )
    np.testing.assert_allclose(merged[0], exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("normalize", "expected"), [(False, [1.2, 1.6, 3.4, 4.4]), (True, [1.1, 1.8, 3.2, 4.2])]
)
def test_golden_e1_task_arithmetic_on_the_cpu_backend(normalize, expected):
    """ALGORITHMS.md E1 through the C weighted sum."""
    from kernel_check import require_kernel

    from della_cli.backends.cpu import weighted_sum

    require_kernel()
    base = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    experts = [
        np.array([[1.5, 1.0, 3.0, 4.2]], dtype=np.float32),
        np.array([[0.7, 2.6, 3.4, 4.2]], dtype=np.float32),
    ]
    spec = weighted_sum.WeightedSum((1.0, 1.0), True, normalize, 1.0)
    merged, flags = weighted_sum.merge_block(base, experts, spec, np.dtype(np.float32))
    np.testing.assert_allclose(merged[0], expected, atol=1e-6, rtol=0)
    assert not flags.any()
