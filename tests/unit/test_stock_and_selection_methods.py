"""model_stock, sce, ram, ramplus_tl, arcee_fusion, passthrough: ALGORITHMS.md's worked examples
E12-E16, the streaming passes against the whole-tensor functions, the exact order statistics
they select with, and properties."""

from __future__ import annotations

import itertools

import pytest
import torch
from worked_examples import DTYPES, assert_printed, row_blocks, t

from della_cli.methods import catalog, entrywise, stock
from della_cli.methods import selection as sel
from della_cli.methods import spherical_means as means
from della_cli.methods.order_statistics import order_statistic, sortable_keys, top_rank_mask


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------- golden (E12-E16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_e12_model_stock(dtype):
    base = t([1, 1, 1, 1], dtype)
    first, second = t([2, 1, 2, 1], dtype), t([1, 2, 2, 1], dtype)
    assert_printed(stock.model_stock([first, second], base), [1.3333, 1.3333, 1.6667, 1])
    opposite = t([0, 1, 0, 1], dtype)  # δ₂ = −δ₁: the denominator is 0, keep the base
    assert_printed(stock.model_stock([first, opposite], base), [1, 1, 1, 1])
    rows = stock.model_stock(
        [t([[1, 0], [1, 0]], dtype), t([[0, 1], [2, 0]], dtype)],
        t([[0, 0], [0, 0]], dtype),
        filter_wise=True,
    )
    assert_printed(rows, [[0, 0], [1.5, 0]])


E13_DELTAS = [
    [0.9, -0.1, 0.4, -0.7, 0.05, 0.3],
    [-0.5, 0.8, -0.2, -0.6, 0.1, -0.05],
    [0.2, 0.3, 0.6, 0.1, -0.9, 0.0],
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_e13_sce(dtype):
    base = t([0] * 6, dtype)
    models = [t(d, dtype) for d in E13_DELTAS]
    assert_printed(sel.sce(models, base), [0.5808, 0.5493, 0.4912, -0.6545, -0.9, 0.3])
    assert_printed(sel.sce(models, base, 0.5), [0.5267, 0.5446, 0, 0, -0.9, 0])
    deltas = sel.task_vectors(models, base)
    assert_printed(sel.sce_scores(deltas), [0.3267, 0.1356, 0.1156, 0.1267, 0.2117, 0.0239])
    keep, _ = sel.sce_block_mask(sel.sce_selection(lambda: [deltas], 0.5), deltas, 0)
    weights = sel.sce_weights(sel.sce_statistics(deltas, keep), 6)
    assert_printed(weights, [0.3089, 0.3380, 0.3531])


@pytest.mark.parametrize("dtype", DTYPES)
def test_e14_ram_and_ramplus_tl(dtype):
    base = t([0] * 6, dtype)
    models = [t([0.5, 0.3, 0.3, 0.1, 0.2, 0], dtype), t([0.1, 0.000001, 0, 0, 0, 0.4], dtype)]
    assert_printed(sel.ram(models, base), [0.3, 0.3, 0.3, 0.1, 0.2, 0.4])
    counts = sel.ramplus_tl_statistics(models, base)
    assert counts.tolist() == [[1, 4], [1, 1]]
    assert_printed(sel.ramplus_tl_lambdas(counts, r=0.1, alpha=0.5), [1.025, 1.05])
    assert_printed(
        sel.ramplus_tl(models, base, r=0.1, alpha=0.5), [0.3, 0.3075, 0.3075, 0.1025, 0.205, 0.42]
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_e15_arcee_fusion(dtype):
    one_row = sel.arcee_fusion(t([0] * 6, dtype), t([0.1, -0.2, 0.05, 2.0, -0.1, 0.3], dtype))
    assert_printed(one_row, [0, 0, 0, 2.0, 0, 0.3])
    base = t([[0.5, 0, 0], [0, 0, 0]], dtype)
    other = t([[1, 0.2, 0], [0.1, 0.3, -0.2]], dtype)
    importance = sel.arcee_fusion_importance(base, other)
    printed = t([[0.010838, 0.004335, 0], [0.002011, 0.006034, 0.004022]])  # 6 decimals
    torch.testing.assert_close(importance.double(), printed, atol=1e-6, rtol=0)
    threshold = sel.arcee_fusion_threshold(lambda: [importance])
    assert float(threshold) == pytest.approx(0.007508, abs=1e-6)
    assert_printed(sel.arcee_fusion(base, other), [[1, 0, 0], [0, 0, 0]])


def test_e16_passthrough():
    x = t([1, -2, 0.5, 4], torch.bfloat16)
    assert entrywise.passthrough(x) is x
    assert_printed(entrywise.passthrough(x, 0.5), [0.5, -1, 0.25, 2])


# ---------------------------------------------------------------- streaming passes


def stream_sce(models, base, select_topk, bounds):
    def deltas_blocks():
        return [sel.task_vectors([m[a:b] for m in models], base[a:b]) for a, b in bounds]

    selection = sel.sce_selection(deltas_blocks, select_topk)
    masks, ties = [], 0
    for block in deltas_blocks():
        keep, block_ties = sel.sce_block_mask(selection, block, ties)
        masks.append(keep)
        ties += block_ties
    sums = sum(sel.sce_statistics(d, k) for d, k in zip(deltas_blocks(), masks, strict=True))
    weights = sel.sce_weights(sums, base.numel())
    pieces = [
        sel.sce_apply(weights, d, k, base[a:b])
        for d, k, (a, b) in zip(deltas_blocks(), masks, bounds, strict=True)
    ]
    return torch.cat(pieces)


@pytest.mark.parametrize("shape", [(7, 5), (7,)])
@pytest.mark.parametrize("select_topk", [1.0, 0.37, 0.0])
def test_sce_streaming_equals_whole(shape, select_topk):
    models = [randn(*shape, seed=s) for s in (1, 2, 3)]
    base = randn(*shape, seed=4)
    whole = sel.sce(models, base, select_topk)
    for bounds in row_blocks(shape[0]):
        torch.testing.assert_close(stream_sce(models, base, select_topk, bounds), whole)


def test_sce_keep_count_is_exact_on_the_decimal_written():
    """S7 (c): mergekit's float32 product gives 4,508,877 for the second case."""
    assert sel.sce_keep_count(0.29, 100) == 29
    assert sel.sce_keep_count(0.1, 45_088_768) == 4_508_876
    assert sel.sce_keep_count(0.3, 16_777_216) == 5_033_164


def test_sce_streaming_ties_rank_by_position():
    """Coarse deltas: many equal variances straddle the threshold; the kept ties are the
    last ones in position order, in every block split."""
    models = [(randn(6, 4, seed=s) * 2).round() / 2 for s in (5, 6)]
    base = torch.zeros(6, 4)
    whole = sel.sce(models, base, 0.5)
    deltas = sel.task_vectors(models, base)
    keep, _ = sel.sce_block_mask(sel.sce_selection(lambda: [deltas], 0.5), deltas, 0)
    scores = sel.sce_scores(deltas).reshape(-1)
    kept = keep.reshape(-1)
    k = int(kept.sum())
    assert k == sel.sce_keep_count(0.5, int(torch.count_nonzero(scores)))
    order = torch.sort(scores, stable=True).indices  # stable ascending ranks
    assert torch.equal(kept[order], torch.arange(24) >= 24 - k)
    for bounds in row_blocks(6):
        torch.testing.assert_close(stream_sce(models, base, 0.5, bounds), whole)


@pytest.mark.parametrize("shape", [(7, 5), (7,), (7, 2, 3)])
def test_model_stock_streaming_equals_whole(shape):
    models = [randn(*shape, seed=s) for s in (7, 8, 9)]
    base = randn(*shape, seed=10)
    whole = stock.model_stock(models, base)
    rows = stock.model_stock(models, base, filter_wise=True)
    for bounds in row_blocks(shape[0]):
        blocks = [([m[a:b] for m in models], base[a:b]) for a, b in bounds]
        gram = sum(stock.gram_statistics(ms, b) for ms, b in blocks)
        t_whole = stock.model_stock_t(gram)
        streamed = torch.cat([stock.model_stock_apply(t_whole, ms, b, False) for ms, b in blocks])
        torch.testing.assert_close(streamed, whole)
        if len(shape) > 1:  # per row: each block's own rows; a 1-D tensor is one row
            per_row = [
                stock.model_stock_apply(stock.model_stock_t(stock.row_gram(ms, b)), ms, b, True)
                for ms, b in blocks
            ]
            torch.testing.assert_close(torch.cat(per_row), rows)


@pytest.mark.parametrize("shape", [(7, 5), (7,)])
def test_ramplus_tl_streaming_equals_whole(shape):
    models = [(randn(*shape, seed=s) > 0.3) * randn(*shape, seed=s + 10) for s in (11, 12, 13)]
    base = randn(*shape, seed=14)
    models = [m + base for m in models]
    whole = sel.ramplus_tl(models, base)
    for bounds in row_blocks(shape[0]):
        blocks = [([m[a:b] for m in models], base[a:b]) for a, b in bounds]
        counts = sum(sel.ramplus_tl_statistics(ms, b) for ms, b in blocks)
        lambdas = sel.ramplus_tl_lambdas(counts)
        streamed = torch.cat([sel.ramplus_tl_apply(lambdas, ms, b) for ms, b in blocks])
        torch.testing.assert_close(streamed, whole)


@pytest.mark.parametrize("shape", [(9, 5), (9, 2, 3)])
def test_arcee_fusion_streaming_equals_whole(shape):
    base, other = randn(*shape, seed=15), randn(*shape, seed=16)
    whole = sel.arcee_fusion(base, other)
    for bounds in row_blocks(shape[0]):
        blocks = [(base[a:b], other[a:b]) for a, b in bounds]
        threshold = sel.arcee_fusion_threshold(
            lambda blocks=blocks: (sel.arcee_fusion_importance(*b) for b in blocks)
        )
        streamed = torch.cat([sel.arcee_fusion_apply(threshold, *b) for b in blocks])
        torch.testing.assert_close(streamed, whole, rtol=0, atol=0)


# ---------------------------------------------------------------- order statistics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_order_statistic_equals_sorting(dtype):
    values = torch.cat(
        [randn(200, seed=17, dtype=dtype), t([0.0, -0.0, 0.0, 3.5, 3.5, -1e-30], dtype)]
    )
    values[50:60] = 0.25  # a run of ties
    ascending = torch.sort(values, stable=True).values
    for bounds in ([(0, 206)], [(i, min(i + 13, 206)) for i in range(0, 206, 13)]):
        for rank in (0, 57, 205):
            value, below = order_statistic(lambda b=bounds: (values[x:y] for x, y in b), rank)
            assert value.dtype == dtype
            assert float(value) == float(ascending[rank])
            assert below == int((values < ascending[rank]).sum())


def test_sortable_keys_order_and_refuse_nan():
    values = t([-3.0, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")], torch.float32)
    keys = sortable_keys(values)
    assert torch.all(keys[1:] >= keys[:-1]) and keys[2] == keys[3]
    with pytest.raises(ValueError, match="NaN"):
        sortable_keys(t([1.0, float("nan")]))


def test_top_rank_mask_keeps_the_last_ties():
    scores = t([1, 2, 2, 3, 2, 0])
    mask = top_rank_mask(scores[:3], torch.tensor(2.0), 2, 0)
    rest = top_rank_mask(scores[3:], torch.tensor(2.0), 2, 2)
    assert torch.cat([mask, rest]).tolist() == [False, False, False, True, True, False]


# ---------------------------------------------------------------- properties


def test_sce_scales_with_the_task_vectors():
    """Small changes keep the paper's weights (mergekit turns them uniform below 1e-6)."""
    models = [randn(5, 4, seed=s) for s in (18, 19, 20)]
    base = randn(5, 4, seed=21)
    delta = sel.sce(models, base, 0.5) - base.double()
    small = [base + (m - base) * 1e-4 for m in models]
    torch.testing.assert_close(
        sel.sce(small, base, 0.5) - base, (delta * 1e-4).float(), rtol=1e-3, atol=1e-9
    )


def test_permutation_invariance():
    models = [randn(4, 5, seed=s) for s in (22, 23, 24)]
    base = randn(4, 5, seed=25)
    references = [fn(models, base) for fn in (stock.model_stock, sel.sce, sel.ram, sel.ramplus_tl)]
    for order in itertools.permutations(range(3)):
        permuted = [models[i] for i in order]
        for fn, ref in zip(
            (stock.model_stock, sel.sce, sel.ram, sel.ramplus_tl), references, strict=True
        ):
            torch.testing.assert_close(fn(permuted, base), ref)


def test_models_equal_to_the_base_give_the_base():
    base = randn(4, 5, seed=26)
    copies = [base.clone(), base.clone()]
    for result in (
        stock.model_stock(copies, base),
        sel.sce(copies, base, 0.5),
        sel.ram(copies, base),
        sel.ramplus_tl(copies, base),
        sel.arcee_fusion(base, base.clone()),
    ):
        torch.testing.assert_close(result, base)
    assert torch.equal(sel.sce([], base), base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_compute_dtype(dtype):
    models = [randn(3, 4, seed=s).to(dtype) for s in (27, 28)]
    base = randn(3, 4, seed=29).to(dtype)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    for result in (
        stock.model_stock(models, base),
        sel.sce(models, base, 0.5),
        sel.ramplus_tl(models, base),
        sel.arcee_fusion(base, models[0]),
        entrywise.passthrough(base, 2.0),
    ):
        assert result.dtype == expected


def test_degenerate_inputs():
    assert sel.arcee_fusion(torch.zeros(0, 3), torch.zeros(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match="at least 2"):
        stock.model_stock([randn(3, seed=1)], randn(3, seed=2))
    with pytest.raises(ValueError, match="NaN"):
        sel.arcee_fusion(t([0.0, 1.0]), t([float("nan"), 1.0]))


def test_catalog_declares_every_method():
    assert set(catalog.CATALOG) == {
        "slerp",
        "nuslerp",
        "multislerp",
        "karcher",
        "nearswap",
        "model_stock",
        "sce",
        "ram",
        "ramplus_tl",
        "arcee_fusion",
        "passthrough",
    }
    slerp = catalog.CATALOG["slerp"]
    assert [p.name for p in slerp.parameters] == ["t"] and slerp.parameters[0].required
    assert catalog.CATALOG["sce"].parameters[0].default == 1.0
    assert not catalog.CATALOG["passthrough"].parameters[0].required
    for entry in catalog.CATALOG.values():
        assert entry.passes[-1] == "merge"
        assert (len(entry.passes) > 1) == bool(entry.statistics) or entry.name == "nuslerp"


def test_empty_tensors_merge_to_empty_tensors():
    empty = [torch.zeros(0, 3) for _ in range(3)]
    results = [
        means.multislerp(empty[:2], [1, 2], empty[2]),
        means.karcher(empty),
        stock.model_stock(empty[:2], empty[2]),
        stock.model_stock(empty[:2], empty[2], filter_wise=True),
        sel.sce(empty[:2], empty[2], 0.5),
        sel.sce(empty[:2], empty[2]),
        sel.ram(empty[:2], empty[2]),
        sel.ramplus_tl(empty[:2], empty[2]),
        sel.arcee_fusion(empty[0], empty[1]),
    ]
    assert all(r.shape == (0, 3) for r in results)


def test_nan_spans_its_statistics():
    models = [randn(4, 3, seed=s) for s in (30, 31)]
    base = randn(4, 3, seed=32)
    models[0][1, 2] = float("nan")
    assert torch.isnan(stock.model_stock(models, base)).all()
    rows = torch.isnan(stock.model_stock(models, base, filter_wise=True)).all(dim=1)
    assert rows.tolist() == [False, True, False, False]
    assert torch.isnan(sel.sce(models, base)).all()
    ram = torch.isnan(sel.ram(models, base))
    assert ram[1, 2] and int(ram.sum()) == 1
    with pytest.raises(ValueError, match="NaN"):
        sel.sce(models, base, 0.5)


@pytest.mark.parametrize("models", [1, 2, 3, 5])
def test_sce_scores_have_the_bits_of_torch_var(models):
    """sce_scores repeats torch.var's float64 Welford steps: the same bits (mergekit's), also
    where an input is infinite, so the k-th variance selects the same entries."""
    generator = torch.Generator().manual_seed(models)
    for scale in (1e-3, 1.0, 1e3):
        deltas = [scale * torch.randn(37, 29, generator=generator) for _ in range(models)]
        deltas[0][0, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")])
        expected = torch.var(torch.stack(deltas), dim=0, unbiased=False)
        assert torch.equal(sel.sce_scores(deltas).isnan(), expected.isnan())
        finite = ~expected.isnan()
        assert torch.equal(sel.sce_scores(deltas)[finite], expected[finite])
        doubles = [d.double() for d in deltas]
        expected = torch.var(torch.stack(doubles), dim=0, unbiased=False)
        assert torch.equal(sel.sce_scores(doubles)[finite], expected[finite])
