#!/usr/bin/env python3
"""Calls of the CUDA w4a16 decode kernel (``cuda_w4a16.w4a16_decode``) for Nsight Compute to profile:
random weights of one (K, N) layer in the kernel's layout, a random activation of M rows, ``--calls``
calls, then a synchronize.  The profiles under ``benchmarks/results/h200/decode/cuda_w4a16/`` skip
the first calls (the build, the layout copy, a cold launch) and take the fourth:

    M=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum
    M=$M,smsp__inst_executed.sum,sm__cycles_active.avg,smsp__issue_active.avg.pct_of_peak_sustained_active
    M=$M,smsp__warps_active.avg.per_cycle_active,launch__grid_size,launch__occupancy_limit_shared_mem
    M=$M,sm__cycles_elapsed.avg.per_second,regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio
    ncu --clock-control none -k regex:w4a16_kernel --launch-skip 3 --launch-count 1 --metrics $M \\
        python benchmarks/ncu_cuda_w4a16.py 1 4096 28672

(``m1_latency/ncu/``; ``xrow/ncu/`` used the profiler's locked clocks and ``--section`` SpeedOfLight,
Occupancy, LaunchStats, WarpStateStats, SchedulerStats and InstructionStats instead.)  Nsight
Compute flushes the caches before each profiled launch, so it sees the weights come from DRAM.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("m", type=int, help="tokens (rows of the activation)")
    ap.add_argument("k", type=int, help="input features")
    ap.add_argument("n", type=int, help="output features")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--zero-points", action="store_true", help="asymmetric weights (zero points)")
    ap.add_argument("--calls", type=int, default=4, help="calls to make (default: %(default)s)")
    args = ap.parse_args(argv)
    if min(args.m, args.k, args.n, args.calls) < 1:
        ap.error("M, K, N and --calls must be positive")

    import torch

    if not torch.cuda.is_available():
        print("ncu_cuda_w4a16.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from qlinear_pass import schemes as S
    from qlinear_pass.kernels import cuda_w4a16 as CW
    from qlinear_pass.kernels import int4_layout

    p = S.quantize_weight("w4a16", torch.randn(args.n, args.k, device="cuda") * 0.02, group_size=args.group_size,
                          zero_points=args.zero_points)
    w = int4_layout.mma16_of(p["weight"])
    x = torch.randn(args.m, args.k, device="cuda", dtype=torch.bfloat16)
    for _ in range(args.calls):
        CW.w4a16_decode(x, w, p["weight_scale"], p.get("weight_zero"), None, args.group_size)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
