#!/usr/bin/env python3
"""The 8-bit-weight decode kernel (``qlinear_pass/kernels/cuda/w8a8_decode.cu``) built with other
depths of its ``cp.async`` ring (``QLP_W8_SLOTS_R1`` / ``QLP_W8_SLOTS_R2``: slots a warp with 16 /
32-row tiles up to 8 tokens a CTA, ``QLP_W8_SLOTS_R1_T16`` / ``QLP_W8_SLOTS_R2_T16``: with 16), timed
side by side with bf16 ``F.linear``: the measurement behind the defaults.

Each variant is compiled with this machine's nvcc (the flags of ``kernels/cuda_build.py`` plus the
defines), called with the row tiles and warps its rules pick, timed like ``bench_decode.py`` (CUDA
graph replays over weight copies past L2) and checked against the scheme's reference.  Writes
``bench_cuda_w8_ring.json`` and ``bench_cuda_w8_ring.log`` to --out.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_cuda_launch import cells, command_line, kernel_call  # noqa: E402
from bench_cuda_ring import build  # noqa: E402
from bench_decode import copy_bandwidth  # noqa: E402
from qlinear_pass import schemes as S  # noqa: E402
from qlinear_pass.kernels import cuda_w8a8 as C8  # noqa: E402

SCHEMES = ("int8_weight_only", "fp8_weight_only", "fp8_rowwise", "fp8_block")
#: name -> the defines it is built with (the others keep the source's defaults)
VARIANTS = {
    "base": {},
    "t16s3": {"QLP_W8_SLOTS_R2_T16": 3},
    "t16s4": {"QLP_W8_SLOTS_R2_T16": 4, "QLP_W8_SLOTS_R1_T16": 4},
    "r2s3": {"QLP_W8_SLOTS_R2": 3},
    "r1s4": {"QLP_W8_SLOTS_R1": 4},
}


def main(argv=None) -> int:
    cli = command_line("cuda_w8_ring", __doc__, SCHEMES, argv)
    if cli is None:
        return 2
    args, schemes, out, say = cli
    say("# variants: " + "; ".join(f"{name} = {d}" for name, d in VARIANTS.items()))
    copy_bw = copy_bandwidth()
    say(f"# us per call, {torch.cuda.get_device_name()}, copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write); "
        "% copy: weight bytes / the fastest variant's time / that; the 8-bit schemes per channel (fp8_block per "
        "128x128 block)")
    result = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": copy_bw, "variants": VARIANTS, "cases": []}
    original = C8._library
    with tempfile.TemporaryDirectory(prefix="qlp_w8_ring_") as tmp:
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(VARIANTS)) as pool:  # one nvcc each, side by side
            built = {name: pool.submit(build, name, d, Path(tmp), None, "w8a8_decode", C8.prepare)
                     for name, d in VARIANTS.items()}
            libs = {name: f.result() for name, f in built.items()}
        say(f"# built {len(libs)} variants in {time.monotonic() - t0:.0f} s")
        try:
            for c in cells(args.ms, schemes):
                case = {"scheme": c.scheme, "k": c.k, "n": c.n, "m": c.m, "bf16_us": c.bf16_us,
                        "weight_bytes": c.weight_bytes, "us": {}, "rel_err": {}}
                for name, lib in libs.items():
                    C8._library = lambda device, lib=lib: lib
                    case["rel_err"][name], case["us"][name] = c.time(kernel_call(c.scheme, c.x))
                result["cases"].append(case)
                best = min(case["us"].values())
                tol = S.TOLERANCE[torch.bfloat16]
                say(f"{c.scheme:17s} K={c.k:5d} N={c.n:5d} M={c.m:2d}: " + " | ".join(
                    f"{name} {us:5.1f}" + ("" if case["rel_err"][name] <= tol else " WRONG")
                    for name, us in case["us"].items())
                    + f" | {c.weight_bytes / (best * 1e-6) / copy_bw:4.0%} | bf16 {c.bf16_us:5.1f}")
                (out / "bench_cuda_w8_ring.json").write_text(json.dumps(result, indent=1))
        finally:
            C8._library = original
    say(f"# {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
