#!/usr/bin/env python3
"""Our CUDA decode kernels (``qlinear_pass/kernels/cuda/``) with CTAs of 8 warps, of 4, and as their
rule picks (``cuda_w4a16.warps_for`` / ``cuda_w8a8.warps_for``), timed side by side: the measurement
behind the rules.

Each cell is timed like ``bench_decode.py`` (CUDA graph replays over weight copies past L2) and
checked against the scheme's reference.  Writes ``bench_cuda_warps.json`` and
``bench_cuda_warps.log`` to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_decode import L2_BYTES, graph_time, tee  # noqa: E402
from qlinear_pass import schemes as S  # noqa: E402
from qlinear_pass.kernels import cuda_w4a16 as CW  # noqa: E402
from qlinear_pass.kernels import cuda_w8a8 as C8  # noqa: E402
from qlinear_pass.kernels import int4_layout  # noqa: E402

SCHEMES = ("w4a16", "int8_weight_only", "fp8_weight_only", "fp8_rowwise", "fp8_block")
SHAPES = [(4096, 14336), (14336, 4096), (4096, 6144), (4096, 28672), (4096, 4096), (4096, 1024)]


def kernel_call(scheme: str, x: torch.Tensor, **knobs):
    """A function of one weight copy (weight, scale) that runs the scheme's decode kernel on ``x``
    with ``knobs`` (``warps``, ``splits``: the kernel's keyword arguments; fp8_rowwise: quantized
    here, once)."""
    if scheme == "w4a16":
        return lambda w, s: CW.w4a16_decode(x, w, s, None, None, 128, **knobs)
    if scheme == "fp8_rowwise":
        xq, sx = S.quantize_activation(scheme, x)
        return lambda w, s: C8.w8a8_decode(xq, sx, w, s, None, x.dtype, **knobs)
    if scheme == "fp8_block":
        return lambda w, s: C8.fp8_block_decode(x, w, s, None, **knobs)
    return lambda w, s: C8.w8a16_decode(x, w, s, None, **knobs)


def weight_copies(scheme: str, n: int, k: int) -> tuple[dict, list]:
    p = S.quantize_weight(scheme, torch.randn(n, k, device="cuda") * 0.02, group_size=128)
    w = int4_layout.to_mma16(p["weight"]) if scheme == "w4a16" else p["weight"]
    s = p["weight_scale"].float()
    s = s if scheme in ("w4a16", "fp8_block") else s.reshape(-1)
    s = s.contiguous()
    nbytes = w.numel() * w.element_size() + s.numel() * 4
    return p, [(w.clone(), s.clone()) for _ in range(int(2 * L2_BYTES // nbytes) + 1)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cuda_warps"))
    ap.add_argument("--ms", default="1,8,16")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda_warps.py needs a CUDA GPU", file=sys.stderr)
        return 2
    schemes = args.schemes.split(",")
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        ap.error(f"unknown scheme {', '.join(unknown)} (known: {', '.join(SCHEMES)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = tee(out / "bench_cuda_warps.log")

    say(f"# us per call, {torch.cuda.get_device_name()}; w8 / w4: 8 / 4 warps a CTA, rule: the kernel's rule "
        "(-: 4 warps do not serve this M); w4a16 g128, the 8-bit schemes per channel (fp8_block per 128x128 block)")
    result = {"device": torch.cuda.get_device_name(), "cases": []}
    start = time.monotonic()
    for scheme in schemes:
        for k, n in SHAPES:
            p, copies = weight_copies(scheme, n, k)
            for m in (int(v) for v in args.ms.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = S.reference(scheme, x, [p[name] for name in S.get_scheme(scheme).param_names if p.get(name) is not None], None)
                case = {"scheme": scheme, "k": k, "n": n, "m": m, "us": {}, "rel_err": {}}
                for name, warps in (("w8", 8), ("w4", 4), ("rule", None)):
                    limit = 1 if scheme == "w4a16" else 8
                    if warps == 4 and m > limit:
                        continue
                    call = kernel_call(scheme, x, warps=warps)
                    case["rel_err"][name] = S.relative_error(call(*copies[0]), ref)
                    case["us"][name] = graph_time([(lambda ws: (lambda: call(*ws)))(ws) for ws in copies]) * 1e6
                result["cases"].append(case)
                tol = S.TOLERANCE[torch.bfloat16]
                say(f"{scheme:17s} K={k:5d} N={n:5d} M={m:2d}: " + " | ".join(
                    f"{name} " + (f"{case['us'][name]:5.1f}" + ("" if case["rel_err"][name] <= tol else " WRONG")
                                  if name in case["us"] else "    -") for name in ("w8", "w4", "rule")))
                (out / "bench_cuda_warps.json").write_text(json.dumps(result, indent=1))
            del copies
    say(f"# {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
