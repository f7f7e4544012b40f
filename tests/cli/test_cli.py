"""The ``della`` command line through typer's CliRunner: exit codes, stdout/stderr, and files.

Results go to stdout, errors to stderr as one ``error: ...`` line with no traceback; exit codes
are 0 success, 2 bad usage/recipe/model/output, 1 merge or IO failure, 130 interrupted. Every
failure leaves the file system as it was: no output folder, no staging folder beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import typer.main
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner, Result

from della_cli import __version__
from della_cli.cli import app
from della_cli.engine import MergeEngine
from della_cli.methods import METHODS
from della_cli.methods.registry import RUNNING

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    return runner.invoke(app, [str(arg) for arg in args], env=env)


def assert_one_line_error(result: Result, code: int, fragment: str) -> str:
    """Exit ``code``, nothing on stdout, one ``error:`` line on stderr containing ``fragment``."""
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Staging or retired output folders a merge must never leave behind."""
    return sorted(
        p.name for p in folder.iterdir() if ".della-tmp-" in p.name or ".della-old-" in p.name
    )


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return tensors


def weight_bytes(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.glob("*.safetensors")))


@dataclass
class Setup:
    """What a test merges: a tiny Llama base, two experts, a DELLA recipe, an output path."""

    tmp: Path
    base: Path
    experts: list[Path]
    write_recipe: Callable[..., Path]

    def recipe(self, **changes: object) -> Path:
        recipe: dict = {
            "merge_method": "della",
            "base_model": str(self.base),
            "models": [{"model": str(path)} for path in self.experts],
            "parameters": {"density": 0.7, "epsilon": 0.07, "lambda": 1.1},
            "seed": 5,
        }
        recipe.update(changes)
        return self.write_recipe(recipe)

    @property
    def out(self) -> Path:
        return self.tmp / "merged"


@pytest.fixture
def setup(tmp_path: Path, model_zoo, write_recipe) -> Setup:
    base = model_zoo("llama")
    return Setup(
        tmp_path, base, [model_zoo("llama", expert=1), model_zoo("llama", expert=2)], write_recipe
    )


# --- informational commands -------------------------------------------------------------------


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"della {__version__}\n"


def test_methods_lists_the_pipeline_and_the_catalog_methods_della_runs():
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    listed = [line.split(":")[0] for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert listed == list(METHODS)
    assert len(listed) == 9 + len(RUNNING)
    assert "arXiv:2406.11617" in result.stdout
    assert "    parameters: t (merge-wide, required)" in result.stdout  # slerp


def test_methods_json():
    result = invoke("methods", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert list(rows) == list(METHODS)
    della = rows["della"]
    assert della["needs_base"] is True
    assert della["sign_consensus"] is True
    assert della["normalize_default"] is True
    assert della["required"] == []  # density and epsilon take mergekit's defaults
    assert della["model_parameters"] == ["weight", "density", "epsilon"]
    assert della["merge_parameters"] == ["lambda", "normalize", "rescale"]
    assert rows["linear"]["needs_base"] is False
    assert rows["linear"]["required"] == []
    assert rows["breadcrumbs"]["model_parameters"] == ["weight", "density", "gamma"]
    assert rows["dare_linear"]["sign_consensus"] is False
    slerp = rows["slerp"]
    assert slerp["merge_parameters"] == ["t"] and slerp["required"] == ["t"]
    assert slerp["passes"] == ["statistics", "merge"]
    assert slerp["parameters"][0]["scope"] == "shared"


# --- a merge that works ---------------------------------------------------------------------


def test_merge_json_report(setup: Setup):
    recipe = setup.recipe()
    result = invoke("merge", recipe, setup.out, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    base_tensors = read_tensors(setup.base)
    out_tensors = read_tensors(setup.out)
    assert report["output"] == str(setup.out)
    assert report["method"] == "della"
    assert report["device"] == "cpu"
    assert report["seed"] == 5
    assert report["recipe_sha256"] == hashlib.sha256(recipe.read_text().encode()).hexdigest()
    assert report["tensors"] == len(base_tensors) == len(out_tensors)
    assert report["shards"] == len(list(setup.out.glob("*.safetensors"))) == 1
    assert report["bytes"] == sum(t.numel() * t.element_size() for t in out_tensors.values())
    assert report["warnings"] == []
    assert set(out_tensors) == set(base_tensors)
    for name, tensor in out_tensors.items():
        assert tensor.shape == base_tensors[name].shape
        assert tensor.dtype == base_tensors[name].dtype
    assert (setup.out / "config.json").is_file()
    published = recipe.read_text()
    for folder in (setup.base, *setup.experts):  # absolute paths: folder names
        published = published.replace(str(folder), folder.name)
    assert (setup.out / "della_recipe.yaml").read_text() == published
    assert str(setup.base.parent) not in published
    assert leftovers(setup.tmp) == []
    assert result.stderr == ""


def test_merge_human_summary_and_quiet(setup: Setup):
    recipe = setup.recipe()
    result = invoke("merge", recipe, setup.out)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("merged ")
    assert str(setup.out) in result.stdout
    quiet = invoke("merge", recipe, setup.tmp / "quiet", "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output == ""


def test_quiet_still_shows_warnings(setup: Setup, tmp_path):
    """--quiet drops the bar and the summary; a warning is never silenced."""
    partial = tmp_path / "partial"
    partial.mkdir()
    tensors = read_tensors(setup.experts[0])
    tensors.pop("model.norm.weight")
    save_file(tensors, partial / "model.safetensors")
    shutil.copy(setup.experts[0] / "config.json", partial / "config.json")
    recipe = setup.recipe(models=[{"model": str(partial)}, {"model": str(setup.experts[1])}])
    quiet = invoke("merge", recipe, setup.out, "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == ""
    assert quiet.stderr == (
        f"warning: '{partial}' has no 'model.norm.weight'; it is left out of that tensor\n"
    )


def test_a_bad_recipe_is_reported_before_a_missing_token(setup: Setup, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    recipe = setup.recipe(parameters={"densty": 0.7, "epsilon": 0.07})
    result = invoke("merge", recipe, setup.out, "--push-to-hub", "me/merged")
    assert result.exit_code == 2, result.output
    assert "parameters.densty: unknown key" in result.stderr
    assert "token" not in result.stderr


def test_merge_into_several_shards(setup: Setup):
    result = invoke("merge", setup.recipe(), setup.out, "--json", "--out-shard-size", "20kB")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    shards = sorted(setup.out.glob("*.safetensors"))
    assert report["shards"] == len(shards) > 1
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((setup.out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == report["bytes"]
    assert set(index["weight_map"]) == set(read_tensors(setup.base))


def test_seed_override_changes_bytes_and_same_seed_repeats(setup: Setup):
    recipe = setup.recipe()
    runs = {}
    for label, extra in [
        ("recipe", []),
        ("one", ["--seed", 1]),
        ("one-again", ["--seed", 1]),
        ("two", ["--seed", 2]),
    ]:
        result = invoke("merge", recipe, setup.tmp / label, "--json", *extra)
        assert result.exit_code == 0, result.output
        runs[label] = (json.loads(result.stdout)["seed"], weight_bytes(setup.tmp / label))
    assert [seed for seed, _ in runs.values()] == [5, 1, 1, 2]
    assert runs["one"][1] == runs["one-again"][1]
    assert runs["one"][1] != runs["two"][1]
    assert runs["recipe"][1] != runs["one"][1]
    assert "seed: 1" in (setup.tmp / "one" / "README.md").read_text()


def test_dry_run_writes_nothing(setup: Setup):
    result = invoke("merge", setup.recipe(), setup.out, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "nothing written (dry run)" in result.stdout
    assert not setup.out.exists()
    assert leftovers(setup.tmp) == []


def test_dry_run_json(setup: Setup):
    result = invoke("merge", setup.recipe(), setup.out, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    tensors = len(read_tensors(setup.base))
    assert summary["method"] == "della"
    assert summary["tensors"] == tensors
    assert summary["merged"] + summary["copied"] == tensors
    assert summary["shards"] == 1
    assert summary["output_bytes"] > 0
    assert not setup.out.exists()


def test_overwrite_replaces_an_existing_output(setup: Setup):
    setup.out.mkdir()
    (setup.out / "model-00001-of-00002.safetensors").write_bytes(b"an earlier merge")
    result = invoke("merge", setup.recipe(), setup.out, "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    assert not (setup.out / "model-00001-of-00002.safetensors").exists()
    assert (setup.out / "model.safetensors").is_file()
    assert leftovers(setup.tmp) == []


# --- usage errors: exit 2, one line, nothing written ----------------------------------------


@dataclass
class BadCall:
    """A failing ``della merge`` call: how to build its arguments, its exit and its message."""

    args: Callable[[Setup], list[object]]
    code: int
    fragment: str
    one_line: bool = True


def _bad_recipe(s: Setup) -> list[object]:
    return [s.recipe(models=[{"model": str(s.experts[0]), "parameters": {"density": 1.3}}]), s.out]


def _missing_model(s: Setup) -> list[object]:
    return [s.recipe(models=[{"model": str(s.tmp / "no-such-model")}]), s.out]


def _output_is_file(s: Setup) -> list[object]:
    s.out.write_text("not a folder")
    return [s.recipe(), s.out]


def _output_exists(s: Setup) -> list[object]:
    s.out.mkdir()
    (s.out / "keep.txt").write_text("keep")
    return [s.recipe(), s.out]


def _output_inside_input(s: Setup) -> list[object]:
    # A private copy of an expert, so that a failing check cannot touch the shared zoo.
    expert = shutil.copytree(s.experts[0], s.tmp / "expert-copy")
    recipe = s.recipe(models=[{"model": str(expert)}, {"model": str(s.experts[1])}])
    return [recipe, expert / "merged"]


def _incompatible_expert(s: Setup) -> list[object]:
    """An expert whose final norm has the wrong width: a plan error before any data is read."""
    tensors = read_tensors(s.experts[0])
    tensors["model.norm.weight"] = torch.ones(16)
    expert = s.tmp / "wrong-width"
    expert.mkdir()
    save_file(tensors, expert / "model.safetensors", metadata={"format": "pt"})
    return [s.recipe(models=[{"model": str(expert)}, {"model": str(s.experts[1])}]), s.out]


def _density_keeps_nothing(s: Setup) -> list[object]:
    return [s.recipe(merge_method="ties", parameters={"density": 0.001}), s.out]


BAD_CALLS = {
    "bad-recipe": BadCall(
        _bad_recipe, 2, "models.0.parameters.density: must be in (0, 1], got 1.3"
    ),
    "yaml-error": BadCall(
        lambda s: [s.write_recipe("merge_method: della\n  models: x\n"), s.out],
        2,
        "line 2, column 9: invalid YAML",
    ),
    "recipe-missing": BadCall(lambda s: [s.tmp / "nope.yaml", s.out], 2, "no such recipe file"),
    "model-missing": BadCall(_missing_model, 2, "does not exist"),
    "hub-id-offline-uncached": BadCall(
        lambda s: [s.recipe(base_model="meta-llama/Llama-2-13b-hf"), s.out],
        1,
        "not in the local Hub cache",
    ),
    "output-is-file": BadCall(_output_is_file, 2, "exists and is a file"),
    "output-exists": BadCall(_output_exists, 2, "already exists; pass --overwrite"),
    "output-inside-input": BadCall(_output_inside_input, 2, "overlaps input model folder"),
    "device-tpu": BadCall(
        lambda s: [s.recipe(), s.out, "--device", "tpu"], 2, "--device: 'tpu' is not a device"
    ),
    "device-cuda-9": BadCall(lambda s: [s.recipe(), s.out, "--device", "cuda:9"], 2, "--device"),
    "incompatible-expert": BadCall(
        _incompatible_expert, 2, "has 'model.norm.weight' of shape (16,)", one_line=False
    ),
    "density-keeps-nothing": BadCall(
        _density_keeps_nothing, 2, "density 0.001 keeps no entry", one_line=False
    ),
    "seed-negative": BadCall(
        lambda s: [s.recipe(), s.out, "--seed", -1], 2, "--seed: must be an integer"
    ),
    "shard-size-word": BadCall(
        lambda s: [s.recipe(), s.out, "--out-shard-size", "big"], 2, "not a size"
    ),
    "shard-size-zero": BadCall(
        lambda s: [s.recipe(), s.out, "--out-shard-size", "0"], 2, "at least 1 byte"
    ),
    "shard-size-unit": BadCall(
        lambda s: [s.recipe(), s.out, "--out-shard-size", "5XB"], 2, "not a size", one_line=False
    ),
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["merge", "dry-run"])
@pytest.mark.parametrize("case", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_call_exits_with_one_line_and_writes_nothing(
    setup: Setup, case: BadCall, dry_run: bool
):
    s = setup
    args = case.args(s)
    before = sorted(p.name for p in s.tmp.rglob("*"))
    existing = {p: p.read_bytes() for p in s.tmp.rglob("*") if p.is_file()}
    result = invoke("merge", *args, *(["--dry-run"] if dry_run else []))
    if case.one_line:
        assert_one_line_error(result, case.code, case.fragment)
    else:
        assert result.exit_code == case.code, result.output
        assert result.stdout == ""
        assert result.stderr.startswith("error: ") or "Usage:" in result.stderr
        assert case.fragment in result.stderr
        assert "Traceback" not in result.output
    assert sorted(p.name for p in s.tmp.rglob("*")) == before, "nothing written"
    assert {p: p.read_bytes() for p in existing} == existing, "existing files untouched"
    out = Path(str(args[1]))
    assert leftovers(out.parent) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(setup: Setup):
    result = invoke("merge", setup.recipe(), setup.out, "--device", "cuda")
    assert_one_line_error(result, 2, "--device cuda: CUDA is not available on this machine")
    assert not setup.out.exists()


def test_example_recipes_fail_cleanly_on_hub_ids_offline():
    """The shipped examples name Hub ids; offline with an empty cache, della says so in one
    line (tests run with HF_HUB_OFFLINE=1, see conftest.py) rather than crash."""
    result = invoke("merge", REPO / "recipes" / "della.yaml", REPO / "no-output", "--dry-run")
    assert_one_line_error(result, 1, "HF_HUB_OFFLINE is set; connect once to download it")
    assert not (REPO / "no-output").exists()


def test_debug_variable_shows_the_traceback(setup: Setup):
    recipe = setup.recipe(seed=-1)
    plain = invoke("merge", recipe, setup.out)
    assert_one_line_error(plain, 2, "seed:")
    debug = invoke("merge", recipe, setup.out, env={"DELLA_DEBUG": "1"})
    assert debug.exit_code == 2
    assert "Traceback" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("error: seed:")


# --- failures mid-merge: nothing left behind --------------------------------------------------


def fail_after(
    monkeypatch: pytest.MonkeyPatch, calls: int, error: BaseException | Callable[[], None]
):
    """Make MergeEngine.compute_block raise ``error`` (or call it) once ``calls`` blocks are
    done (tiny models: one block per tensor)."""
    original = MergeEngine.compute_block
    done = 0

    def compute_block(self, task, loaded):
        nonlocal done
        if done == calls:
            if callable(error) and not isinstance(error, BaseException):
                error()
            else:
                raise error
        done += 1
        return original(self, task, loaded)

    monkeypatch.setattr(MergeEngine, "compute_block", compute_block)


MID_MERGE_FAILURES = {
    "ctrl-c": (KeyboardInterrupt(), 130, "error: interrupted; nothing was written"),
    "sigterm": (lambda: os.kill(os.getpid(), signal.SIGTERM), 130, "error: interrupted"),
    "disk-full": (OSError(28, "No space left on device"), 1, "No space left on device"),
    "bug": (RuntimeError("boom"), 1, "error: unexpected RuntimeError: boom"),
}


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite"])
@pytest.mark.parametrize(
    ("error", "code", "fragment"), MID_MERGE_FAILURES.values(), ids=MID_MERGE_FAILURES.keys()
)
def test_failure_mid_merge_leaves_nothing(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, error, code: int, fragment: str, existing: bool
):
    if existing:
        setup.out.mkdir()
        (setup.out / "README.md").write_text("keep")
    sigterm_handler = signal.getsignal(signal.SIGTERM)
    # Small shards, so that some are already written when the failure comes.
    fail_after(monkeypatch, 12, error)
    result = invoke("merge", setup.recipe(), setup.out, "--overwrite", "--out-shard-size", "20kB")
    assert_one_line_error(result, code, fragment)
    assert leftovers(setup.tmp) == []
    if existing:
        assert sorted(p.name for p in setup.out.iterdir()) == ["README.md"]
    else:
        assert not setup.out.exists()
    assert signal.getsignal(signal.SIGTERM) == sigterm_handler, "SIGTERM handler restored"


# --- documentation --------------------------------------------------------------------------


def test_every_command_is_documented_in_the_readme():
    readme = REPO / "README.md"
    if not readme.is_file():
        pytest.skip("README.md does not exist yet; this test checks it once it is written")
    text = readme.read_text()
    commands = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert "merge" in commands and "methods" in commands
    missing = [name for name in commands if f"della {name}" not in text]
    assert missing == [], f"commands not shown as `della <command>` in README.md: {missing}"


def test_plan_of_local_models_reports_groups_sizes_and_disk(setup: Setup):
    text = invoke("plan", setup.recipe())
    assert text.exit_code == 0, text.output
    assert "  merged" in text.stdout and "model.layers.*." in text.stdout
    assert "0 B to download" in text.stdout and "disk: output needs" in text.stdout
    assert text.stdout.rstrip().endswith("the merge can run; nothing downloaded, nothing written")
    report = json.loads(invoke("plan", setup.recipe(), "--out", setup.out, "--json").stdout)
    assert report["can_run"] and report["inputs"] == {} and report["download_bytes"] == 0
    assert report["tensors"] == len(read_tensors(setup.base))
    assert report["disk"][0]["holds"] == ["output"]
    assert not setup.out.exists()


def test_a_merge_that_cannot_fit_in_memory_is_refused_before_it_starts(setup: Setup, monkeypatch):
    from della_cli import preflight

    monkeypatch.setattr(preflight, "available_memory", lambda device: 1000)
    result = invoke("merge", setup.recipe(), setup.out, "--device", "cpu")
    assert result.exit_code == 2
    assert "of memory on cpu but 1.0 kB is available" in result.stderr
    assert not setup.out.exists() and leftovers(setup.tmp) == []
    plan = json.loads(invoke("plan", setup.recipe(), "--device", "cpu", "--json").stdout)
    assert plan["can_run"] is False and plan["available_memory_bytes"] == 1000


def test_the_console_script_merges_with_the_collector_on_and_the_modules_frozen(setup: Setup):
    """``main`` pauses Python's cyclic garbage collector while the command loads its modules
    and freezes them; the merge itself must run with the collector on (a long merge must not
    accumulate garbage), with what it loaded frozen (tens of thousands of objects)."""
    script = (
        "import gc, sys\n"
        "from della_cli import cli, engine\n"
        "run = engine.MergeEngine.run\n"
        "def watched(self, *args, **kwargs):\n"
        "    print('merging with the collector', gc.isenabled(), gc.get_freeze_count() > 10000)\n"
        "    return run(self, *args, **kwargs)\n"
        "engine.MergeEngine.run = watched\n"
        "sys.argv = ['della', *sys.argv[1:]]\n"
        "print('collector before main', gc.isenabled())\n"
        "cli.main()\n"
    )
    command = [sys.executable, "-c", script, "merge", str(setup.recipe()), str(setup.out)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "collector before main True" in lines
    assert "merging with the collector True True" in lines
