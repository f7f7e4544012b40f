"""Signals end della with exit 130 from its first instant, also inside compiled kernels
(issue #14, finding 11: its signal part)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from della_cli.cli import app


def raw_model(folder: Path, seed: int, rows: int = 64) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tensors = {f"layers.{i}.weight": rng.standard_normal((rows, 64), np.float32) for i in range(3)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return folder


@pytest.fixture
def ties_recipe(tmp_path) -> Path:
    base = raw_model(tmp_path / "base", 0)
    experts = [raw_model(tmp_path / f"expert{i}", i) for i in (1, 2)]
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "parameters": {"density": 0.5},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_while_della_starts_exits_130(ties_recipe, tmp_path, signum):
    """SIGTERM in the first second killed della by the signal (exit 143), so a batch loop that
    stops on 130 went on. The signal is sent as soon as typer is imported (``-X importtime``
    reports it), long before any command runs."""
    out = tmp_path / "merged"
    command = [sys.executable, "-X", "importtime", "-m", "della_cli", "merge", ties_recipe, out]
    lines = []
    with subprocess.Popen(
        [str(part) for part in command], stderr=subprocess.PIPE, text=True, bufsize=1
    ) as process:
        for line in process.stderr:
            lines.append(line)
            if _imported(line, "typer"):
                process.send_signal(signum)
                break
        rest = process.stderr.read()
        process.wait(timeout=60)
    assert any(_imported(line, "typer") for line in lines), "typer was never imported"
    assert process.returncode == 130, rest[-2000:]
    assert "error: interrupted" in rest
    assert "Traceback" not in rest
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if ".della-" in p.name) == []


def _imported(line: str, module: str) -> bool:
    return line.startswith("import time:") and line.split("|")[-1].strip() == module


def test_an_interrupt_inside_a_compiled_kernel_exits_130(ties_recipe, tmp_path, monkeypatch):
    """A signal handled while numba's dispatcher runs surfaces as `SystemError:
    CPUDispatcher(<function _pivots ...>) returned a result with an exception set`, the
    KeyboardInterrupt as its context; it was reported as an unexpected error, exit 1."""
    from della_cli.backends.cpu import select as trim_select
    from della_cli.backends.cpu import select_small

    def interrupted_kernel(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs here, as it would inside the dispatcher
        except KeyboardInterrupt as error:
            raise SystemError(
                "CPUDispatcher(<function _pivots at 0x7f>) returned a result with an exception set"
            ) from error
        raise AssertionError("the SIGTERM handler did not run")

    monkeypatch.setattr(trim_select, "window_keep_mask", interrupted_kernel)
    monkeypatch.setattr(select_small, "window_keep_masks", interrupted_kernel)  # small tensors
    monkeypatch.setattr(trim_select, "supports", lambda *args: True)
    result = CliRunner().invoke(app, ["merge", str(ties_recipe), str(tmp_path / "merged")])
    assert result.exit_code == 130, result.output
    assert "error: interrupted" in result.output and "SystemError" not in result.output
    assert not (tmp_path / "merged").exists()


def test_sigterm_at_random_moments_of_a_ties_merge_exits_130(tmp_path):
    """The real thing: SIGTERM at seeded random moments of a ties merge (numba kernels);
    every run ends with exit 130 and nothing left, or finished before the signal with exit 0."""
    base = raw_model(tmp_path / "base", 0, rows=2048)
    experts = [raw_model(tmp_path / f"expert{i}", i, rows=2048) for i in (1, 2)]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "merge_method": "ties",
                "base_model": str(base),
                "models": [{"model": str(e)} for e in experts],
                "parameters": {"density": 0.5},
            }
        )
    )
    rng = np.random.default_rng(11)
    for attempt in range(4):
        out = tmp_path / f"merged{attempt}"
        command = [sys.executable, "-m", "della_cli", "merge", str(recipe), str(out), "--quiet"]
        with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as process:
            time.sleep(float(rng.uniform(0.3, 2.5)))
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=120)
        assert process.returncode in (0, 130), stderr
        if process.returncode == 130:
            assert stderr.strip().splitlines()[-1].startswith("error: interrupted"), stderr
            assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir() if ".della-" in p.name) == []


def test_signals_until_della_exits_never_change_its_exit_status(tmp_path):
    """A Ctrl-C, then SIGTERM every millisecond until della is gone: the clean-up completes,
    and the exit status stays 130, also while the interpreter exits (which puts the default
    handlers back; a SIGTERM then killed della by the signal after it had said 'interrupted')."""
    base = raw_model(tmp_path / "base", 0, rows=4096)
    experts = [raw_model(tmp_path / f"expert{i}", i, rows=4096) for i in (1, 2)]
    recipe = tmp_path / "recipe.yaml"
    models = [{"model": str(e)} for e in experts]
    recipe.write_text(
        json.dumps({"merge_method": "linear", "base_model": str(base), "models": models})
    )
    out = tmp_path / "merged"
    staging = tmp_path / ".merged.della-tmp-partial"
    command = [sys.executable, "-m", "della_cli", "merge", str(recipe), str(out)]
    command += ["--out-shard-size", "200kB", "--quiet"]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as process:
        deadline = time.monotonic() + 60
        while not staging.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert process.poll() is None, "the merge ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        while process.poll() is None:
            process.send_signal(signal.SIGTERM)
            time.sleep(0.001)
        stderr = process.stderr.read()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["error: interrupted; nothing was written"]
    assert not out.exists() and not staging.exists()
