"""The CPU backend's slerp, nuslerp, multislerp, karcher and model_stock (``backends.cpu.
catalog``) against the torch backend's (``methods.streamed``): the same output bytes and the
same non-finite flags, on random and adversarial blocks, bfloat16 and float32, read in several
blocks; and the sums of products bit for bit (``methods.row_sums``)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from della_cli.backends.cpu import catalog, spherical
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
        state = catalog.prepare(method, settings, weights, lambda: iter(blocks), has_base)
    merged = [
        catalog.apply(method, settings, weights, state, r, e, has_base, out_dtype)
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


@pytest.mark.parametrize(("method", "settings", "count", "has_base"), CASES)
@pytest.mark.parametrize("kind", ["random", "parallel", "antiparallel", "zero", "nan"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
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
def test_the_sums_of_products_are_the_torch_backends_bits(length):
    rng = np.random.default_rng(length)
    x = rng.standard_normal((5, length)).astype(np.float32)
    y = rng.standard_normal((5, length)).astype(np.float32)
    gram = spherical.gram_rows(x, [x, y], subtract=False)
    expected = row_dots(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    np.testing.assert_array_equal(gram[:, 0, 1], expected)
    folded = spherical.fold_rows(None, gram[:, 0, 1])
    assert folded == fold_rows(torch.zeros(()), torch.from_numpy(expected)).item()
    # folding in two blocks is folding whole
    assert spherical.fold_rows(spherical.fold_rows(None, gram[:2, 0, 1]), gram[2:, 0, 1]) == folded
