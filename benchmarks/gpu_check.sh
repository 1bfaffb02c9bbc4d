#!/usr/bin/env bash
# One device call: environment, the whole test suite on the GPU, then the benchmark.
# Usage: bash benchmarks/gpu_check.sh [bench args...]; results under $OUT (default benchmarks/results/h100)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/h100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  export PATH=/tmp/site/bin:$PATH  # ninja, for torch.utils.cpp_extension
fi
# a FlashInfer installed by an earlier call on this machine (its wheel travels alone: 62 MiB)
if [ -d /root/fisite/flashinfer ]; then export PYTHONPATH=/root/fisite:${PYTHONPATH:-}; fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -m qlinear_pass env | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee -a "$OUT/env.txt"
# the CUTLASS kernel families, built side by side (each build says how long it took)
if [ "${SKIP_CUTLASS_BUILD:-0}" != 1 ] && python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)"; then
  for f in fp8 int8 fp8_block; do
    (python3 -m qlinear_pass.kernels.cutlass_build $f > "$OUT/cutlass_build_$f.txt" 2>&1; echo "exit $?" >> "$OUT/cutlass_build_$f.txt") &
  done
  wait
  tail -n 3 "$OUT"/cutlass_build_*.txt
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  QLINEAR_TEST_EXAMPLES=${QLINEAR_TEST_EXAMPLES:-12} timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -rfs ${TEST_ARGS:-tests} > "$OUT/tests.txt" 2>&1; grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/tests.txt" | tail -30
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 benchmarks/bench_linear.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
