#!/usr/bin/env bash
# The whole GPU check of issue 18, in under five minutes on a fresh device machine, from the
# repository root:
#
#     bash bench/gpu_check.sh            # results under $OUT (default bench/work/gpu-check)
#
# 1. compiles the CPU backend's numba kernels once (the CPU merges the tests compare with),
# 2. runs tests/gpu (every method's bytes on CUDA against the CPU, one device and several, a
#    real out-of-memory retry, the plan's device-memory check), at most 150 s,
# 3. runs bench/gpu_bench.py on the ~1.1B merge, every method, start-up timed apart, stopping
#    new methods so that the whole script ends by about 290 s.
# Writes gpu-tests.txt, gpu-bench.md and gpu-bench.log to $OUT; exits non-zero if a step failed.
set -u
OUT=${OUT:-bench/work/gpu-check}
mkdir -p "$OUT"
started=$(date +%s)
elapsed() { echo $(($(date +%s) - started)); }
status=0

python -m della_cli.backends.cpu.warm >"$OUT/warm.log" 2>&1 || echo "compiling the numba kernels failed (torch stands in); see warm.log" >&2
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv >"$OUT/nvidia-smi.csv" 2>&1

timeout 150 python -m pytest -q -p no:cacheprovider -rs tests/gpu >"$OUT/gpu-tests.txt" 2>&1 || status=1
tail -n 5 "$OUT/gpu-tests.txt"
echo "tests/gpu done at $(elapsed) s" >&2

left=$((290 - $(elapsed)))
budget=$((left - 45))  # the last method started may take this long (generation comes first)
if [ "$budget" -gt 0 ]; then
    timeout "$left" python bench/gpu_bench.py --budget-s "$budget" --markdown "$OUT/gpu-bench.md" \
        >"$OUT/gpu-bench.log" 2>&1 || status=1
    cat "$OUT/gpu-bench.md" 2>/dev/null || tail -n 20 "$OUT/gpu-bench.log"
else
    echo "no time left for bench/gpu_bench.py" >&2
    status=1
fi
echo "gpu_check: $(elapsed) s in all, exit $status" >&2
exit $status
