#!/usr/bin/env bash
# One device call for the decode kernel: its GPU tests, the configuration sweep, every format at
# the chosen configuration, and Nsight Compute's view of two launches.  Results under $OUT.
# Knobs: SKIP_TESTS=1, SKIP_SWEEP=1, SKIP_NCU=1, SWEEP_FORMATS, BENCH_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/decode}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } | tee "$OUT/env.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  QLINEAR_TEST_EXAMPLES=${QLINEAR_TEST_EXAMPLES:-25} timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -rfs \
    ${TEST_FILES:-tests/kernels/test_triton_decode.py tests/backends/test_triton.py} > "$OUT/tests_gpu.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed|Error" "$OUT/tests_gpu.txt" | tail -15
fi
if [ "${SKIP_SWEEP:-0}" != 1 ]; then
  timeout ${SWEEP_TIMEOUT:-240} python3 benchmarks/bench_decode.py --sweep ${SWEEP:-configs} --out "$OUT/sweep" \
    --formats "${SWEEP_FORMATS:-fp8_rowwise,int8_weight_only,w4a16 g128}" --shapes ${SWEEP_SHAPES:-4096x14336,14336x4096} --ms ${SWEEP_MS:-1,8} \
    2>&1 | tee "$OUT/sweep.log" | grep -v "^\s*$" | tail -20
fi
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_decode.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -100
if [ "${SKIP_NCU:-0}" != 1 ] && command -v ncu >/dev/null; then
  target=$(mktemp --suffix=.py)
  cat > "$target" <<'PY'
import torch, sys
sys.path.insert(0, ".")
from qlinear_pass import schemes as S
from qlinear_pass.kernels import triton_decode as D
for scheme, g, wk, ws, act in (("fp8_rowwise", 0, D.Weight.FP8, D.Weight.CHANNEL, D.Act.DYN_TOKEN),
                               ("w4a16", 128, D.Weight.INT4, D.Weight.GROUP, D.Act.FLOAT)):
    p = S.quantize_weight(scheme, torch.randn(14336, 4096, device="cuda") * 0.02, group_size=g or 128)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        D.decode_gemm(x, p["weight"], p["weight_scale"], None, None, None, torch.bfloat16, w_kind=wk, w_scale=ws, act=act, group_size=g)
torch.cuda.synchronize()
PY
  timeout 120 ncu -k regex:_decode_kernel --launch-skip 2 --launch-count 4 \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size \
    python3 "$target" > "$OUT/ncu.txt" 2>&1
  grep -E "_decode_kernel|gpu__time|dram__|warps_active|registers|grid_size" "$OUT/ncu.txt" | head -40
fi
