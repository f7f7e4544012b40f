"""nearswap on the CPU backend (``cpu/nearswap``, issue 17): the kernel gives the torch
backend's bytes for every stored dtype (bfloat16, float16, float32, in and out), shape and t,
equal inputs and NaN or Inf among them included, reports the inputs that hold NaN or Inf, and
the plan gives it to CPU merges. Also the float16 rules it reads and writes with
(``backends.cpu.bits``), against torch's conversions for every float16 value."""

from __future__ import annotations

import json
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from kernel_check import copy_with_nan, merge_in_child
from typer.testing import CliRunner

from della_cli.kernels import cpu_backend_installed

pytestmark = pytest.mark.skipif(not cpu_backend_installed(), reason="numba is not installed")

DTYPES = {
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f16": np.dtype(np.float16),
    "f32": np.dtype(np.float32),
}
CODES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
T_VALUES = [0.0, 1e-3, 0.1, 0.37, 1.0, -0.25, 40.0]
SHAPES = [(1, 1), (7,), (37, 41), (3, 4, 5)]


def pair(shape, dtype, seed=0, special=False):
    """(base, other): other = base + small changes, a seventh of the entries equal to the
    base's; with ``special``, NaN and ±Inf in either or both at the first entries."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32)
    other = base + (rng.standard_normal(shape) * 0.05).astype(np.float32)
    other.reshape(-1)[::7] = base.reshape(-1)[::7]
    if special and base.size >= 8:
        inf, nan = np.inf, np.nan
        base.reshape(-1)[:8] = [nan, inf, -inf, inf, 1.0, nan, 0.0, -0.0]
        other.reshape(-1)[:8] = [1.0, inf, nan, -inf, inf, nan, -0.0, 0.0]
    return base.astype(dtype), other.astype(dtype)


def torch_block(base, other, t, out_code):
    """The torch backend's block (``TorchBackend.streamed``) and its non-finite flags."""
    from della_cli.backends.torch_backend import TorchBackend

    backend = TorchBackend("cpu", "F32")
    kernel = SimpleNamespace(name="nearswap", settings={"t": t})
    tensors = [backend.as_stored(a) for a in (base, other)]
    out = backend.streamed(kernel, [], None, tensors[0], [tensors[1]], out_code)
    return out, backend.nonfinite(tensors)


def cpu_block(base, other, t, out_dtype):
    from della_cli.backends.cpu import nearswap

    return nearswap.nearswap_block(base, other, t, out_dtype)


def same_bytes(ours, expected):
    return ours.dtype == expected.dtype and np.array_equal(
        ours.reshape(-1).view(np.uint8), expected.reshape(-1).view(np.uint8)
    )


@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
@pytest.mark.parametrize("shape", SHAPES, ids=["one", "1d", "2d", "3d"])
@pytest.mark.parametrize("out", list(DTYPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_cpu_kernel_gives_the_torch_backends_bytes(dtype, out, shape, special):
    base, other = pair(shape, DTYPES[dtype], special=special)
    for t in T_VALUES:
        expected, expected_flags = torch_block(base, other, t, CODES[out])
        ours, flags = cpu_block(base, other, t, DTYPES[out])
        assert ours.shape == base.shape
        assert same_bytes(ours, expected), (t, ours, expected)
        assert list(flags) == (expected_flags or [False, False])


@pytest.mark.parametrize("out", list(DTYPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_magnitudes_at_float16s_limits_round_as_torch(dtype, out):
    """Entries from 1e-9 to 1e6: float16 outputs round to subnormals, to zero and to Inf."""
    rng = np.random.default_rng(5)
    scale = 10.0 ** rng.integers(-9, 7, size=(64, 48))
    base = (rng.standard_normal((64, 48)) * scale).astype(np.float32)
    other = (base * (1 + 0.1 * rng.standard_normal((64, 48)))).astype(np.float32)
    with np.errstate(over="ignore"):  # float16 inputs: the largest are Inf
        base, other = base.astype(DTYPES[dtype]), other.astype(DTYPES[dtype])
    for t in (1e-7, 0.5, 3e4):
        expected, _ = torch_block(base, other, t, CODES[out])
        ours, _ = cpu_block(base, other, t, DTYPES[out])
        assert same_bytes(ours, expected), t


def test_the_float16_rules_are_torchs_conversions():
    """Every float16 value widened, and float32 values around every float16 value, its
    rounding boundaries and Inf's, and over the subnormal range, rounded back."""
    import numba
    import torch

    from della_cli.backends.cpu import rules
    from della_cli.backends.cpu.bits import HALF_BITS

    @numba.njit
    def widen_all(source, target):
        rules.widen_row(source, target)

    @numba.njit
    def store_all(values, target):
        rules.store_row(values, target)

    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    widened = np.empty(halves.size, dtype=np.float32)
    widen_all(halves.view(HALF_BITS), widened)
    expected = torch.from_numpy(halves.copy()).to(torch.float32).numpy()
    assert np.array_equal(widened.view(np.uint32), expected.view(np.uint32))
    centers = expected.view(np.uint32).astype(np.int64)
    steps = np.array([-0x1001, -0x1000, -0xFFF, -1, 0, 1, 0xFFF, 0x1000, 0x1001, 0x2000])
    bits = (centers[:, None] + steps).reshape(-1)
    subnormal = np.arange(0, 0x38800000 + (1 << 16), 4099, dtype=np.int64)
    bits = np.concatenate([bits, subnormal, subnormal | 0x80000000])
    bits = bits[(bits >= 0) & (bits < 1 << 32)].astype(np.uint32)
    bits = bits[: bits.size // 64 * 64]  # torch's vectorized loop for every entry
    values = bits.view(np.float32)
    rounded = np.empty(values.size, dtype=HALF_BITS)
    store_all(values, rounded)
    expected = torch.from_numpy(values.copy()).to(torch.float16).view(torch.int16).numpy()
    assert np.array_equal(rounded, expected)


def test_equal_inputs_give_the_base_and_t_zero_gives_the_base():
    """|θ₀ − θ₁| = 0 is floored at 1e-6, so the weight is 1 (t > 0) and the result θ₁ = θ₀;
    t = 0 gives weight 0 and θ₀ exactly (no division by zero either way)."""
    base, other = pair((64, 33), np.dtype(np.float32))
    ours, flags = cpu_block(base, base, 0.5, np.dtype(np.float32))
    assert np.array_equal(ours, base) and not flags.any()
    ours, _ = cpu_block(base, other, 0.0, np.dtype(np.float32))
    assert np.array_equal(ours, base)


def test_an_empty_block_is_empty():
    base, other = pair((0, 8), DTYPES["bf16"])
    ours, flags = cpu_block(base, other, 0.5, DTYPES["f32"])
    assert ours.shape == (0, 8) and ours.dtype == DTYPES["f32"] and not flags.any()


def test_algorithms_e11_by_hand():
    """θ₀ = [1, 2, 3, 4], θ₁ = [1.05, 2.5, 2, 4], t = 0.1: w = [1, 0.2, 0.1, 1]."""
    base = np.float32([1, 2, 3, 4])
    other = np.float32([1.05, 2.5, 2, 4])
    ours, _ = cpu_block(base, other, 0.1, np.dtype(np.float32))
    np.testing.assert_allclose(ours, [1.05, 2.1, 2.9, 4.0], rtol=1e-6)


def test_a_block_of_several_spans_runs_in_parallel_to_the_same_bytes(monkeypatch):
    """Spans of 1,000 entries (not a multiple of the 4,096-entry pieces), NaN in the last
    span only: the flags of every span are gathered."""
    from della_cli.backends.cpu import nearswap

    base, other = pair((97, 131), DTYPES["bf16"], seed=3)
    other.reshape(-1)[-1] = np.nan
    expected, _ = cpu_block(base, other, 0.02, DTYPES["bf16"])
    reference, _ = torch_block(base, other, 0.02, "BF16")
    monkeypatch.setattr(nearswap, "SPAN", 1000)
    ours, flags = cpu_block(base, other, 0.02, DTYPES["bf16"])
    assert same_bytes(ours, expected) and same_bytes(ours, reference)
    assert list(flags) == [False, True]


def test_warm_compiles_nearswap_for_float16_and_finds_it_cached(monkeypatch):
    """``warm.warm`` compiles nearswap for a float16 pair (the other catalog kernels take
    none), after which ``missing`` finds nothing to compile for it; with an empty cache it
    finds the pair missing."""
    from della_cli.backends.cpu import warm

    warm.warm(set(), set(), set(), {("F16", "BF16")})
    assert not warm.catalog_missing(frozenset({("F16", "BF16")}))
    assert not warm.missing(set(), set(), set(), {("F16", "BF16")})
    monkeypatch.setattr(warm, "_cached_views", lambda dispatcher, positions: set())
    assert warm.catalog_missing(frozenset({("F16", "BF16")}))


def test_the_plan_gives_nearswap_the_cpu_kernel(model_zoo, write_recipe):
    """``della plan`` shows ``cpu/nearswap`` for bfloat16 (and float16) models on the CPU;
    CUDA and a float64 recipe stay on torch."""
    import torch

    from della_cli.api import MergeOptions, prepare
    from della_cli.cli import app
    from della_cli.kernels import assign_kernels

    recipe = {
        "merge_method": "nearswap",
        "base_model": str(model_zoo("llama", dtype=torch.bfloat16)),
        "models": [{"model": str(model_zoo("llama", expert=1, dtype=torch.bfloat16))}],
        "parameters": {"t": 0.01},
    }
    path = write_recipe(recipe)
    result = CliRunner().invoke(app, ["plan", str(path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "[cpu/nearswap]" in result.stdout and "torch/nearswap" not in result.stdout
    report = json.loads(
        CliRunner().invoke(app, ["plan", str(path), "--device", "cpu", "--json"]).stdout
    )
    assert "cpu/nearswap" in json.dumps(report)
    parsed, models, plan = prepare(path, MergeOptions(device="cpu"))
    on_cuda = assign_kernels(plan, parsed, models.base, models.experts, "cuda")
    assert {job.kernel.label for job in on_cuda.jobs if job.action == "merge"} == {"torch/nearswap"}
    _, _, wide = prepare(write_recipe({**recipe, "dtype": "float64"}), MergeOptions(device="cpu"))
    assert {job.kernel.backend for job in wide.jobs if job.action == "merge"} == {"torch"}
    half = {
        **recipe,
        "base_model": str(model_zoo("llama", dtype=torch.float16)),
        "models": [{"model": str(model_zoo("llama", expert=1, dtype=torch.float16))}],
    }
    _, _, plan = prepare(write_recipe(half), MergeOptions(device="cpu"))
    assert {job.kernel.label for job in plan.jobs if job.action == "merge"} == {"cpu/nearswap"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_cpu_merge_imports_no_torch_and_reports_a_nan_input(
    dtype, model_zoo, write_recipe, tmp_path
):
    """A bf16 (or f16) nearswap merge on the CPU writes the reference's bytes, names the
    tensor whose input holds a NaN, and never imports torch."""

    import torch
    from safetensors.numpy import load_file

    from della_cli.methods.entrywise import nearswap

    stored_dtype = getattr(torch, dtype)
    base_path = model_zoo("llama", dtype=stored_dtype)
    source = model_zoo("llama", expert=1, dtype=stored_dtype)
    model = tmp_path / "model"
    name = copy_with_nan(source, model, 0x7FC0 if dtype == "bfloat16" else 0x7E00)
    tensors = load_file(next(model.glob("*.safetensors")))  # with the NaN
    recipe = write_recipe(
        {
            "merge_method": "nearswap",
            "base_model": str(base_path),
            "models": [{"model": str(model)}],
            "parameters": {"t": 0.01},
        }
    )
    out = tmp_path / "out"
    warnings, imported = merge_in_child(recipe, out)
    assert "NaN or Inf" in warnings and name in warnings
    assert "torch" not in imported
    merged = load_file(next(out.glob("*.safetensors")))
    base = load_file(next(base_path.glob("*.safetensors")))
    for key, tensor in merged.items():
        if key not in tensors:
            continue
        stored = [
            torch.from_numpy(a[key].view(np.uint16)).view(stored_dtype) for a in (base, tensors)
        ]
        expected = nearswap(*stored, 0.01).to(stored_dtype).view(torch.uint16).numpy()
        assert np.array_equal(tensor.view(np.uint16), expected), key
