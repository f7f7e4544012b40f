"""A sweep's batch on the CUDA device: each output is its candidate merged alone there
(skipped without a CUDA device)."""

from __future__ import annotations

from pathlib import Path

import pytest
from killed_merges import make_model

from della_cli.api import MergeOptions, run_merge
from della_cli.sweep import runner as sweep_runner
from della_cli.sweep.batch import merge_batch
from della_cli.sweep.runner import SweepRequest, plan_candidates

pytestmark = pytest.mark.gpu
OPTIONS = MergeOptions(device="cuda")


def weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors*"))}


@pytest.mark.parametrize(
    ("method", "grid"), [("della", "density=0.4,0.7"), ("task_arithmetic", "lambda=0.5,1.2")]
)
def test_a_cuda_batch_writes_each_candidates_own_merge(tmp_path, write_recipe, method, grid):
    base = make_model(tmp_path / "base", 0)
    experts = [make_model(tmp_path / f"expert{i}", i) for i in (1, 2)]
    recipe = write_recipe(
        {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(e)} for e in experts],
            "parameters": {"weight": 0.6},
            "seed": 3,
        }
    )
    request = SweepRequest(recipe, tmp_path / "s", "echo 1 {model}", grid=[grid], seeds=2)
    request.options = OPTIONS
    planned, candidates = plan_candidates(request)
    shared, sessions = sweep_runner._planned_sessions(planned, candidates, OPTIONS)
    outs = [tmp_path / "batch" / c.name for c in candidates]
    try:
        merge_batch(sessions, outs, lambda message: None)
    finally:
        shared.close()
    for candidate, out in zip(candidates, outs, strict=True):
        alone = tmp_path / "alone" / candidate.name
        run_merge(candidate.recipe, alone, OPTIONS)
        assert weights(out) == weights(alone), candidate.name
