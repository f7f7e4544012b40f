"""Time ``della inspect`` on the synthetic Llama-shaped models of ``synth.py``.

    python bench/inspect_bench.py --size 250m --experts 2 [--runs 3] [--device cpu]

prints one JSON line per run: wall time and peak RSS of the whole command (start-up included,
measured by ``timed.py``), the size and the number of experts. Models are cached in
``bench/work`` as for ``bench.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import synth

BENCH_DIR = Path(__file__).resolve().parent
# bench/kernels.py would shadow the ``kernels`` package transformers imports when synth
# writes a config; synth is imported, so this folder can leave the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=sorted(synth.SIZES))
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "work")
    args = parser.parse_args()
    base, experts = synth.ensure_models(args.work, args.size, args.experts, log=_log)
    recipe = args.work / args.size / f"inspect-{args.experts}.yaml"
    recipe.write_text(
        json.dumps(
            {
                "merge_method": "della",
                "base_model": str(base),
                "models": [{"model": str(folder)} for folder in experts],
                "parameters": {"density": 0.5, "epsilon": 0.1},
            }
        )
    )
    log = args.work / args.size / "inspect.log"
    command = [sys.executable, "-m", "della_cli", "inspect", str(recipe), "--json"]
    command += ["--device", args.device]
    for _ in range(args.runs):
        timed = [sys.executable, str(BENCH_DIR / "timed.py"), str(log), "--", *command]
        result = json.loads(subprocess.run(timed, check=True, capture_output=True).stdout)
        result.update(size=args.size, experts=args.experts, device=args.device)
        print(json.dumps(result), flush=True)


def _log(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    main()
