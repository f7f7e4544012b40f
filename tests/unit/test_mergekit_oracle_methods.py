"""Oracle: della's reference of each method equals mergekit 0.1.5's on random tensors.

mergekit runs in its own virtual environment (``DELLA_MERGEKIT_PYTHON``, else
``<repo>/.venv-mergekit/bin/python``), once per module for every case, on tensors passed in a
safetensors file. Without it the tests are skipped, except under ``CI``, where they fail.
Float32 inputs; both sides compute in float32 and sum in different orders (della its scalar
statistics in float64), so outputs agree within float32 rounding of the values: rtol 1e-5,
atol 1e-5 · max |output|. Where della deliberately differs (ALGORITHMS.md S3, S7, S10) the tests
check mergekit's rule instead of its bytes.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from della_cli.methods import entrywise, stock
from della_cli.methods import selection as sel
from della_cli.methods import spherical_means as means
from della_cli.methods import spherical_pairs as pairs

pytestmark = pytest.mark.oracle

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("mergekit_method_oracle.py")


# ---------------------------------------------------------------- inputs


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    out: dict[str, torch.Tensor] = {}
    for shape_name, shape in (("v", (17,)), ("m", (6, 9)), ("c", (3, 4, 5))):
        for i in range(4):
            out[f"{shape_name}{i}"] = torch.randn(shape, generator=generator)
    base = out["m0"]
    out["m_par"] = 2.5 * base  # parallel to m0
    out["m_anti"] = -0.5 * base  # antiparallel to m0
    out["m_zero"] = torch.zeros_like(base)
    out["m_near"] = base + 1e-3 * out["m1"]  # a small change: cos ≈ 1 per tensor, not per row
    rows = out["m1"].clone()
    rows[2] = 3.0 * base[2]  # one row parallel to the base's
    out["m_rows"] = rows
    # sparse changes for ram: about half the entries of each model changed
    for i in (1, 2, 3):
        changed = torch.rand(base.shape, generator=generator) < 0.5
        out[f"s{i}"] = base + changed * torch.randn(base.shape, generator=generator)
    out["s_tiny"] = base + 1e-6 * out["m1"]  # every change below ram's ε
    # small task vectors: mean squares below mergekit's 1e-6 uniform-weight threshold (S7)
    for i in (1, 2, 3):
        out[f"small{i}"] = base + 2e-4 * out[f"m{i}"]
    return {name: tensor.contiguous() for name, tensor in out.items()}


TENSORS = _tensors()


@dataclass
class Case:
    id: str
    method: str
    inputs: list[str]
    della: Callable[..., torch.Tensor]
    base_index: int | None = None
    parameters: dict = field(default_factory=dict)


def _cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    for s in ("v", "m", "c"):
        for step in (0.0, 0.3, 1.0):
            add(
                Case(
                    f"slerp-{s}-{step}",
                    "slerp",
                    [f"{s}0", f"{s}1"],
                    lambda b, o, step=step: pairs.slerp(b, o, step),
                    0,
                    {"t": step},
                )
            )
        add(
            Case(
                f"nearswap-{s}",
                "nearswap",
                [f"{s}0", f"{s}1"],
                lambda b, o: entrywise.nearswap(b, o, 0.4),
                0,
                {"t": 0.4},
            )
        )
        add(
            Case(
                f"karcher-{s}", "karcher", [f"{s}1", f"{s}2", f"{s}3"], lambda *x: means.karcher(x)
            )
        )
        add(
            Case(
                f"karcher-base-{s}",
                "karcher",
                [f"{s}0", f"{s}1", f"{s}2"],
                lambda *x: means.karcher(x),
                0,
            )
        )
        add(
            Case(
                f"multislerp-{s}",
                "multislerp",
                [f"{s}1", f"{s}2", f"{s}3"],
                lambda *x: means.multislerp(x, [0.2, 0.5, 1.3]),
                None,
                {"weight": [0.2, 0.5, 1.3]},
            )
        )
        add(
            Case(
                f"multislerp-base-{s}",
                "multislerp",
                [f"{s}0", f"{s}1", f"{s}2"],
                lambda b, *x: means.multislerp(x, [1.0, 2.0], b),
                0,
                {"weight": [1.0, 2.0]},
            )
        )
        add(
            Case(
                f"model_stock-{s}",
                "model_stock",
                [f"{s}0", f"{s}1", f"{s}2", f"{s}3"],
                lambda b, *x: stock.model_stock(x, b),
                0,
            )
        )
        add(
            Case(
                f"model_stock-fw-{s}",
                "model_stock",
                [f"{s}0", f"{s}1", f"{s}2"],
                lambda b, *x: stock.model_stock(x, b, True),
                0,
                {"filter_wise": True},
            )
        )
        for topk in (1.0, 0.3):
            add(
                Case(
                    f"sce-{s}-{topk}",
                    "sce",
                    [f"{s}0", f"{s}1", f"{s}2", f"{s}3"],
                    lambda b, *x, k=topk: sel.sce(x, b, k),
                    0,
                    {"select_topk": topk},
                )
            )
        add(Case(f"arcee_fusion-{s}", "arcee_fusion", [f"{s}0", f"{s}1"], sel.arcee_fusion, 0))
        for flatten, row_wise in ((True, False), (False, False), (False, True)):
            parameters = {
                "weight": [0.7, 0.4],
                "nuslerp_flatten": flatten,
                "nuslerp_row_wise": row_wise,
            }
            add(
                Case(
                    f"nuslerp-{s}-{flatten}-{row_wise}",
                    "nuslerp",
                    [f"{s}1", f"{s}2"],
                    lambda a, b, f=flatten, r=row_wise: pairs.nuslerp(a, b, [0.7, 0.4], None, f, r),
                    None,
                    parameters,
                )
            )
            add(
                Case(
                    f"nuslerp-base-{s}-{flatten}-{row_wise}",
                    "nuslerp",
                    [f"{s}0", f"{s}1", f"{s}2"],
                    lambda c, a, b, f=flatten, r=row_wise: pairs.nuslerp(a, b, [0.7, 0.4], c, f, r),
                    0,
                    parameters,
                )
            )
    # degenerate inputs
    for other in ("m_par", "m_anti", "m_zero", "m_near"):
        add(
            Case(
                f"slerp-{other}",
                "slerp",
                ["m0", other],
                lambda b, o: pairs.slerp(b, o, 0.35),
                0,
                {"t": 0.35},
            )
        )
        add(
            Case(
                f"slerp-zero-base-{other}",
                "slerp",
                ["m_zero", other],
                lambda b, o: pairs.slerp(b, o, 0.35),
                0,
                {"t": 0.35},
            )
        )
        if other != "m_anti":  # S2: della lerps near-antiparallel vectors; see its test
            add(
                Case(
                    f"nuslerp-{other}",
                    "nuslerp",
                    ["m0", other],
                    lambda a, b: pairs.nuslerp(a, b, [1.0, 3.0]),
                    None,
                    {"weight": [1.0, 3.0]},
                )
            )
        add(Case(f"karcher-{other}", "karcher", ["m0", other, "m1"], lambda *x: means.karcher(x)))
    add(
        Case(
            "nuslerp-rows-parallel",
            "nuslerp",
            ["m0", "m_rows"],
            lambda a, b: pairs.nuslerp(a, b, [1.0, 1.0], None, False, False),
            None,
            {"weight": [1.0, 1.0], "nuslerp_flatten": False},
        )
    )
    add(
        Case(
            "nuslerp-zero-weights",
            "nuslerp",
            ["m1", "m2"],
            lambda a, b: pairs.nuslerp(a, b, [1.0, -1.0]),
            None,
            {"weight": [1.0, -1.0]},
        )
    )
    add(
        Case(
            "multislerp-one",
            "multislerp",
            ["m0", "m1"],
            lambda b, x: means.multislerp([x], [2.0], b),
            0,
            {"weight": [2.0]},
        )
    )
    add(
        Case(
            "multislerp-antipodal-pair",
            "multislerp",
            ["m0", "m_anti"],
            lambda a, b: means.multislerp([a, b], [1.0, 5.0]),
            None,
            {"weight": [1.0, 5.0]},
        )
    )
    add(
        Case(
            "multislerp-raw-weights",
            "multislerp",
            ["m1", "m2"],
            lambda a, b: means.multislerp([a, b], [0.3, 0.9], normalize_weights=False),
            None,
            {"weight": [0.3, 0.9], "normalize_weights": False},
        )
    )
    add(
        Case(
            "karcher-params",
            "karcher",
            ["m1", "m2", "m3"],
            lambda *x: means.karcher(x, max_iter=2, tol=1e-3),
            None,
            {"max_iter": 2, "tol": 1e-3},
        )
    )
    add(
        Case(
            "model_stock-singular",
            "model_stock",
            ["m_zero", "m0", "m_anti"],
            lambda b, *x: stock.model_stock(x, b),
            0,
        )
    )
    add(
        Case(
            "model_stock-zero-delta",
            "model_stock",
            ["m0", "m1", "m0", "m2"],
            lambda b, *x: stock.model_stock(x, b),
            0,
        )
    )
    add(
        Case(
            "sce-none",
            "sce",
            ["m0", "m1", "m2"],
            lambda b, *x: sel.sce(x, b, 0.0),
            0,
            {"select_topk": 0.0},
        )
    )
    add(
        Case(
            "sce-one-model",
            "sce",
            ["m0", "m1"],
            lambda b, x: sel.sce([x], b, 0.5),
            0,
            {"select_topk": 0.5},
        )
    )
    add(
        Case(
            "sce-int8-mask",
            "sce",
            ["m0", "m1", "m2"],
            lambda b, *x: sel.sce(x, b, 0.6),
            0,
            {"select_topk": 0.6, "int8_mask": True},
        )
    )
    for other, step in (("m0", 0.1), ("m1", -0.2), ("m1", 0.0)):
        add(
            Case(
                f"nearswap-{other}-{step}",
                "nearswap",
                ["m0", other],
                lambda b, o, step=step: entrywise.nearswap(b, o, step),
                0,
                {"t": step},
            )
        )
    for name in ("ram", "ramplus_tl"):
        fn = sel.ram if name == "ram" else sel.ramplus_tl
        add(
            Case(f"{name}-sparse", name, ["m0", "s1", "s2", "s3"], lambda b, *x, fn=fn: fn(x, b), 0)
        )
        add(Case(f"{name}-tiny", name, ["m0", "s1", "s_tiny"], lambda b, *x, fn=fn: fn(x, b), 0))
        add(Case(f"{name}-dense", name, ["c0", "c1", "c2"], lambda b, *x, fn=fn: fn(x, b), 0))
    add(
        Case(
            "ramplus_tl-params",
            "ramplus_tl",
            ["m0", "s1", "s2"],
            lambda b, *x: sel.ramplus_tl(x, b, r=0.5, alpha=0.9, epsilon=0.3),
            0,
            {"r": 0.5, "alpha": 0.9, "epsilon": 0.3},
        )
    )
    add(Case("passthrough", "passthrough", ["m1"], entrywise.passthrough))
    add(
        Case(
            "passthrough-scale",
            "passthrough",
            ["c1"],
            lambda x: entrywise.passthrough(x, -0.75),
            None,
            {"scale": -0.75},
        )
    )
    return cases


CASES = _cases()
# Cases where della deliberately differs; each has its own test below.
SCE_SMALL = Case(
    "sce-small", "sce", ["m0", "small1", "small2", "small3"], None, 0, {"select_topk": 0.4}
)
NUSLERP_ANTI = Case("nuslerp-m_anti", "nuslerp", ["m0", "m_anti"], None, None, {"weight": [1, 3]})
BIG_SHAPE = (1100, 1000)  # above mergekit's 1,000,000-entry quantile sample
ARCEE_BIG = Case("arcee_fusion-big", "arcee_fusion", ["big0", "big1"], None, 0)


def _big_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    base = torch.randn(BIG_SHAPE, generator=generator) * 0.02
    return {"big0": base, "big1": base + torch.randn(BIG_SHAPE, generator=generator) * 0.002}


# ---------------------------------------------------------------- running mergekit


@pytest.fixture(scope="module")
def mergekit_outputs(tmp_path_factory, mergekit) -> dict[str, torch.Tensor]:
    """mergekit's result for every case; ``mergekit`` (tests/conftest.py) skips without it,
    and fails under CI."""
    python = mergekit.python
    folder = tmp_path_factory.mktemp("mergekit-oracle")
    save_file({**TENSORS, **_big_tensors()}, folder / "inputs.safetensors")
    cases = [
        {
            "id": c.id,
            "method": c.method,
            "inputs": c.inputs,
            "base_index": c.base_index,
            "parameters": c.parameters,
        }
        for c in (*CASES, SCE_SMALL, NUSLERP_ANTI, ARCEE_BIG)
    ]
    (folder / "cases.json").write_text(json.dumps(cases), encoding="utf-8")
    run = subprocess.run(
        [
            str(python),
            str(SCRIPT),
            str(folder / "inputs.safetensors"),
            str(folder / "cases.json"),
            str(folder / "outputs.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=folder,
    )
    if run.returncode != 0:
        pytest.fail(f"mergekit failed ({run.returncode}):\n{run.stderr[-4000:]}")
    return load_file(folder / "outputs.safetensors")


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_della_equals_mergekit(case: Case, mergekit_outputs):
    result = case.della(*(TENSORS[name] for name in case.inputs))
    assert_float32_close(result, mergekit_outputs[case.id])


def test_methods_all_have_oracle_cases():
    from della_cli.methods import catalog

    assert {c.method for c in CASES} == set(catalog.CATALOG)


def test_sce_small_task_vectors_mergekit_turns_weights_uniform(mergekit_outputs):
    """S7 (a): with mean squares summing below 1e-6, mergekit's weights are uniform; della's
    stay ∝ the mean squares. Same selection and signs, so mergekit's output is della's
    ``sce_apply`` with uniform weights, and della's differs from it."""
    base, *models = (TENSORS[name] for name in SCE_SMALL.inputs)
    deltas = sel.task_vectors(models, base)
    keep, _ = sel.sce_block_mask(sel.sce_selection(lambda: [deltas], 0.4), deltas, 0)
    assert float(sel.sce_statistics(deltas, keep).sum()) / base.numel() < 1e-6
    uniform = sel.sce_apply(torch.full((3,), 1 / 3, dtype=torch.float64), deltas, keep, base)
    expected = mergekit_outputs[SCE_SMALL.id]
    assert_float32_close(uniform, expected)
    assert (sel.sce(models, base, 0.4) - expected).abs().max() > 1e-6


def test_arcee_fusion_above_one_million_entries_same_law(mergekit_outputs):
    """S10: mergekit samples 1M importances for its quartiles; della takes them exactly. The
    kept sets differ only near the threshold: a small fraction of entries."""
    big = _big_tensors()
    ours = sel.arcee_fusion(big["big0"], big["big1"])
    theirs = mergekit_outputs[ARCEE_BIG.id]
    kept_ours = ours != big["big0"]
    kept_theirs = theirs != big["big0"]
    assert 0.02 < float(kept_ours.float().mean()) < 0.5
    assert float((kept_ours != kept_theirs).float().mean()) < 0.002
    both = kept_ours & kept_theirs
    assert torch.equal(ours[both], theirs[both])


def test_nuslerp_antiparallel_mergekit_divides_by_a_vanishing_sine(mergekit_outputs):
    """S2: v₂ = −0.5·v₁. della lerps (cos Ω < −0.9995); mergekit, whose float32 cosine misses
    −1 by rounding, divides by sin Ω ≈ 3e-4 and returns about 1000·v₁."""
    first, second = TENSORS["m0"], TENSORS["m_anti"]
    ours = pairs.nuslerp(first, second, [1, 3])
    torch.testing.assert_close(ours, 0.25 * first + 0.75 * second)
    theirs = mergekit_outputs[NUSLERP_ANTI.id]
    assert float(theirs.norm() / first.norm()) > 10
