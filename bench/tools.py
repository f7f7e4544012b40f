"""What the benchmark runs: recipes, the commands of each tool, and one timed child process.

Each run is its own process, forked by the small ``timed.py`` launcher and reaped there with
``os.wait4``, so that its peak resident set size is that child's alone (``getrusage
(RUSAGE_CHILDREN)`` would mix all children, and a fork of this torch-laden process would start
from its RSS). Wall time covers the whole process, Python start-up and imports included, as a
user sees it.
"""

from __future__ import annotations

import compileall
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

MERGEKIT_VERSION = "0.1.5"
SEED = 42
BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
FLOOR_SCRIPT = BENCH_DIR / "floor.py"
TIMED_SCRIPT = BENCH_DIR / "timed.py"

# Parameters both tools accept, top-level so that one recipe file serves both.
METHOD_PARAMETERS: dict[str, dict[str, float]] = {
    "della": {"density": 0.7, "epsilon": 0.07, "lambda": 1.1},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "task_arithmetic": {},
    "linear": {},
    # mergekit's other methods (ALGORITHMS.md S1-S11)
    "slerp": {"t": 0.5},
    "nuslerp": {},
    "multislerp": {},
    "karcher": {},
    "model_stock": {},
    "sce": {"select_topk": 0.5},
    "nearswap": {"t": 0.001},
    "arcee_fusion": {},
    "ram": {},
    "ramplus_tl": {},
    "passthrough": {},
}
DETERMINISTIC = {
    "ties",
    "breadcrumbs",
    "task_arithmetic",
    "linear",
    *(name for name in METHOD_PARAMETERS if name not in ("della", "dare_ties", "dare_linear")),
}
# Methods whose models take a weight; the others read none (mergekit ignores it with a note).
WEIGHTED = {"della", "ties", "dare_ties", "dare_linear", "breadcrumbs", "task_arithmetic", "linear"}
WEIGHTED |= {"nuslerp", "multislerp"}
# Methods without a base (the base, if given, would be one more input).
NO_BASE = {"linear", "karcher", "passthrough"}
# Methods that take a fixed number of models besides the base, whatever ``--experts`` says.
FIXED_EXPERTS = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1, "passthrough": 1, "nuslerp": 2}


def experts_for(method: str, requested: int) -> int:
    """The models a method merges besides the base: its fixed count, else ``requested``."""
    return FIXED_EXPERTS.get(method, requested)


@dataclass
class Run:
    """One finished child process."""

    wall_s: float
    peak_rss_bytes: int
    returncode: int
    log: Path


def measure(command: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``command`` to completion through the light ``timed.py`` launcher; output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, str(TIMED_SCRIPT), str(log), "--", *command]
    done = subprocess.run(launcher, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"timed.py failed: {done.stderr.strip()}")
    result = json.loads(done.stdout)
    return Run(result["wall_s"], result["peak_rss_bytes"], result["returncode"], log)


def write_recipe(path: Path, method: str, base: Path, experts: list[Path]) -> Path:
    """One mergekit-format recipe that both tools read unchanged.

    No ``seed`` key: mergekit ignores unknown top-level keys silently, so the seed is given on
    each tool's command line instead (``--seed`` / ``--random-seed``).
    """
    recipe: dict = {"merge_method": method}
    if method not in NO_BASE:  # linear averages the models themselves and takes no base
        recipe["base_model"] = str(base)
    weight = {"parameters": {"weight": 1.0}} if method in WEIGHTED else {}
    recipe["models"] = [{"model": str(e), **weight} for e in experts]
    if METHOD_PARAMETERS[method]:
        recipe["parameters"] = dict(METHOD_PARAMETERS[method])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def mergekit_venv(work: Path) -> Path:
    return work / "mergekit-venv"


def ensure_mergekit(work: Path, log=print) -> Path:
    """mergekit in its own virtual environment, on this machine's CPU build of torch.

    torch is installed first, pinned to the exact version (local tag included) of the torch this
    script runs on, so that mergekit's ``torch>=2`` is already satisfied and pip never fetches a
    multi-GB CUDA build.
    """
    import torch

    venv = mergekit_venv(work)
    script = venv / "bin" / "mergekit-yaml"
    if script.exists():
        return script
    log(f"installing mergekit {MERGEKIT_VERSION} into {venv}")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch.__version__}"], check=True)
    subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}"], check=True)
    installed = venv_torch_version(venv)
    if installed != torch.__version__:
        raise SystemExit(
            f"mergekit's install replaced torch {torch.__version__} with {installed}; "
            f"remove {venv} and install mergekit with --no-deps"
        )
    return script


def venv_torch_version(venv: Path) -> str:
    code = "import torch; print(torch.__version__)"
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def tool_command(tool: str, recipe: Path, out: Path, work: Path, device: str) -> list[str]:
    if tool in ("della", "before"):
        prefix = [*della_launcher()]
        return [
            *prefix,
            "merge",
            str(recipe),
            str(out),
            "--quiet",
            "--overwrite",
            "--device",
            device,
            "--seed",
            str(SEED),
        ]
    if tool == "mergekit":
        script = mergekit_venv(work) / "bin" / "mergekit-yaml"
        return [
            str(script),
            str(recipe),
            str(out),
            "--copy-tokenizer",
            "--quiet",
            "--device",
            device,
            "--random-seed",
            str(SEED),
        ]
    raise ValueError(f"unknown tool {tool!r}")


def della_launcher() -> list[str]:
    """How users start della: the console script installed with this Python (where pip put
    it), else ``python -m della_cli``. Not ``shutil.which("della")``, which may find a version
    manager's shim (pyenv's adds about 0.1 s of shell to every run) or another install."""
    script = Path(sys.executable).with_name("della.exe" if os.name == "nt" else "della")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "della_cli"]


def compile_della(checkout: Path | None = None) -> None:
    """Byte-compile della's modules, as installing it does (pip compiles what it installs, and
    mergekit's venv has its bytecode), so a timed run does not compile them. Without this, a
    checkout run where ``PYTHONDONTWRITEBYTECODE`` is set (it is on the reference machine)
    compiles della's modules in every run: 0.08 s of a 0.62 s ``--dry-run`` there."""
    compileall.compile_dir((checkout or REPO_DIR) / "della_cli", quiet=1)


def floor_command(inputs: list[Path], out: Path, out_bytes: int) -> list[str]:
    files = [str(p) for p in inputs]
    return [sys.executable, str(FLOOR_SCRIPT), str(out / "floor.bin"), str(out_bytes), *files]


# A checkout of della timed as the tool "before" (``bench.py --before``).
BEFORE_DIR: Path | None = None


def child_env(tool: str) -> dict[str, str]:
    """The environment of a timed run: offline, and della importable from this checkout even
    where it is not installed (the GPU machine); mergekit's venv gets no extra path."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if tool in ("della", "before"):
        checkout = BEFORE_DIR if tool == "before" else REPO_DIR
        paths = [str(checkout), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def compare_outputs(ours: Path, theirs: Path, exact: bool) -> str:
    """A short verdict: same tensor names, shapes and dtypes; largest |difference| if exact."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, tuple, str]]:
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(path, "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    sl = handle.get_slice(name)
                    found[name] = (path, tuple(sl.get_shape()), sl.get_dtype())
        return found

    a, b = tensors(ours), tensors(theirs)
    if a.keys() != b.keys():
        ours_only, theirs_only = len(a.keys() - b.keys()), len(b.keys() - a.keys())
        return f"names differ: {ours_only} only in della's, {theirs_only} only in mergekit's"
    mismatched = [n for n in a if a[n][1:] != b[n][1:]]
    if mismatched:
        n = mismatched[0]
        return f"{len(mismatched)} shape/dtype differ, e.g. {n}: {a[n][1:]} vs {b[n][1:]}"
    verdict = f"same {len(a)} names, shapes, dtypes"
    if exact:
        worst, where, differing, total = _differences(a, b)
        verdict += f"; max abs diff {worst:.2g} ({where}), {differing / total:.1%} of values differ"
    return verdict


def _differences(a: dict, b: dict) -> tuple[float, str, int, int]:
    """Largest absolute difference, where it is, and how many values differ at all."""
    from safetensors import safe_open

    worst, where, differing, total = 0.0, "-", 0, 0
    for name in a:
        with safe_open(a[name][0], "pt") as x, safe_open(b[name][0], "pt") as y:
            diff = (x.get_tensor(name).float() - y.get_tensor(name).float()).abs()
        differing += int((diff > 0).sum())
        total += diff.numel()
        if float(diff.max()) > worst:
            worst, where = float(diff.max()), name
    return worst, where, differing, total
