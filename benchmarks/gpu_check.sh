#!/usr/bin/env bash
# One device call: environment, kernel builds, the GPU tests, then the benchmarks.
# Usage: bash benchmarks/gpu_check.sh [bench_linear args...]; results under $OUT (default benchmarks/results/h100)
# Knobs: TEST_ARGS (default: every test), TEST_TIMEOUT, SKIP_TESTS=1, SKIP_BENCH=1 (bench_linear),
# TILES=1 (also bench_cutlass_tiles.py into $OUT/tiles, with TILES_ARGS), SKIP_CUTLASS_BUILD=1, CUTLASS_FAMILIES.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/h100}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# packages a machine without network lacks, carried in .whl/: wheels, and wheels re-packed as
# .tar.xz (FlashInfer's wheel is 62 MiB, 17 MiB as xz)
if [ -d .whl ]; then
  mkdir -p /tmp/site
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  for t in .whl/*.tar.xz; do [ -e "$t" ] && tar -xJf "$t" -C /tmp/site; done
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -m qlinear_pass env | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv | tee -a "$OUT/env.txt"
# the CUTLASS kernel families built side by side (each build says how long it took), and FlashInfer's
# JIT modules compiled meanwhile by one small call each
if [ "${SKIP_CUTLASS_BUILD:-0}" != 1 ] && python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)"; then
  for f in ${CUTLASS_FAMILIES:-fp8 int8 fp8_block}; do
    (python3 -m qlinear_pass.kernels.cutlass_build $f > "$OUT/cutlass_build_$f.txt" 2>&1; echo "exit $?" >> "$OUT/cutlass_build_$f.txt") &
  done
fi
if python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('flashinfer') is None)"; then
  (python3 - > "$OUT/flashinfer_jit.txt" 2>&1 <<'EOF'
import time, torch
from qlinear_pass import registry as R, schemes as S
from qlinear_pass.registry import LayerSpec
for scheme, name in (("fp8_tensor", "flashinfer_cublas_fp8"), ("fp8_block", "flashinfer_deepgemm_fp8_block")):
    t0 = time.monotonic()
    k = R.get_kernel(name)
    ok, why = k.is_supported(R.DeviceInfo.of("cuda"))
    if not ok:
        print(name, "not supported:", why)
        continue
    p = S.quantize_weight(scheme, torch.randn(256, 512, device="cuda") * 0.05)
    spec = LayerSpec(scheme, 256, 512, torch.bfloat16, torch.bfloat16, device="cuda", act_input="dynamic")
    k.run(spec, torch.randn(8, 512, device="cuda", dtype=torch.bfloat16), [p["weight"], p["weight_scale"]], None)
    torch.cuda.synchronize()
    print(name, f"ready in {time.monotonic() - t0:.0f} s")
EOF
  ) &
fi
wait
tail -n 3 "$OUT"/cutlass_build_*.txt "$OUT"/flashinfer_jit.txt 2>/dev/null
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  QLINEAR_TEST_EXAMPLES=${QLINEAR_TEST_EXAMPLES:-12} timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -rfs ${TEST_ARGS:-tests} > "$OUT/tests.txt" 2>&1; grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|Error" "$OUT/tests.txt" | tail -30
fi
if [ "${TILES:-0}" = 1 ]; then
  mkdir -p "$OUT/tiles"
  python3 benchmarks/bench_cutlass_tiles.py --out "$OUT/tiles" ${TILES_ARGS:-} 2>&1 | tee "$OUT/tiles/tiles.log" | tail -80
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 benchmarks/bench_linear.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -60
fi
