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

import argparse
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

from bench_cuda_ring import build  # noqa: E402
from bench_cuda_warps import kernel_call, weight_copies  # noqa: E402
from bench_decode import bf16_linear_time, copy_bandwidth, graph_time, tee  # noqa: E402
from qlinear_pass import schemes as S  # noqa: E402
from qlinear_pass.kernels import cuda_w8a8 as C8  # noqa: E402

SCHEMES = ("int8_weight_only", "fp8_weight_only", "fp8_rowwise", "fp8_block")
SHAPES = [(4096, 14336), (14336, 4096), (4096, 6144), (4096, 28672), (4096, 4096), (4096, 1024)]
#: name -> the defines it is built with (the others keep the source's defaults)
VARIANTS = {
    "base": {},
    "t16s3": {"QLP_W8_SLOTS_R2_T16": 3},
    "t16s4": {"QLP_W8_SLOTS_R2_T16": 4, "QLP_W8_SLOTS_R1_T16": 4},
    "r2s3": {"QLP_W8_SLOTS_R2": 3},
    "r1s4": {"QLP_W8_SLOTS_R1": 4},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cuda_w8_ring"))
    ap.add_argument("--ms", default="1,8,16")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda_w8_ring.py needs a CUDA GPU", file=sys.stderr)
        return 2
    schemes = args.schemes.split(",")
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        ap.error(f"unknown scheme {', '.join(unknown)} (known: {', '.join(SCHEMES)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = tee(out / "bench_cuda_w8_ring.log")
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
            for k, n in SHAPES:
                for m in (int(v) for v in args.ms.split(",")):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    bf16 = bf16_linear_time(x, n, k) * 1e6
                    for scheme in schemes:
                        p, copies = weight_copies(scheme, n, k)
                        ref = S.reference(scheme, x, [p[name] for name in S.get_scheme(scheme).param_names
                                                      if p.get(name) is not None], None)
                        w, sw = copies[0]
                        nbytes = w.numel() * w.element_size() + sw.numel() * sw.element_size()
                        case = {"scheme": scheme, "k": k, "n": n, "m": m, "bf16_us": bf16, "weight_bytes": nbytes,
                                "us": {}, "rel_err": {}}
                        for name, lib in libs.items():
                            C8._library = lambda device, lib=lib: lib
                            call = kernel_call(scheme, x)
                            case["rel_err"][name] = S.relative_error(call(*copies[0]), ref)
                            case["us"][name] = graph_time([(lambda ws: (lambda: call(*ws)))(ws) for ws in copies]) * 1e6
                        result["cases"].append(case)
                        best = min(case["us"].values())
                        tol = S.TOLERANCE[torch.bfloat16]
                        say(f"{scheme:17s} K={k:5d} N={n:5d} M={m:2d}: " + " | ".join(
                            f"{name} {us:5.1f}" + ("" if case["rel_err"][name] <= tol else " WRONG")
                            for name, us in case["us"].items())
                            + f" | {nbytes / (best * 1e-6) / copy_bw:4.0%} | bf16 {bf16:5.1f}")
                        (out / "bench_cuda_w8_ring.json").write_text(json.dumps(result, indent=1))
                        del copies
        finally:
            C8._library = original
    say(f"# {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
