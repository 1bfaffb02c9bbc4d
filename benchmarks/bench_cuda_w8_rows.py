#!/usr/bin/env python3
"""The 8-bit-weight decode kernel (``qlinear_pass/kernels/cuda/w8a8_decode.cu``) with row tiles of 16,
32 and 48 channels (``row_tiles`` 1, 2, 3; 3 above 8 tokens with a scale per channel), and as its
rule picks (``cuda_w8a8.w8_row_tiles``), timed side by side with bf16 ``F.linear``: the measurement
behind the rule.

Each cell is timed like ``bench_decode.py`` (CUDA graph replays over weight copies past L2) and
checked against the scheme's reference.  Writes ``bench_cuda_w8_rows.json`` and
``bench_cuda_w8_rows.log`` to --out.
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

from bench_cuda_warps import kernel_call, weight_copies  # noqa: E402
from bench_decode import bf16_linear_time, copy_bandwidth, graph_time, tee  # noqa: E402
from qlinear_pass import schemes as S  # noqa: E402
from qlinear_pass.kernels import cuda_w8a8 as C8  # noqa: E402

SCHEMES = ("int8_weight_only", "fp8_weight_only", "fp8_rowwise", "fp8_block")
#: row tiles -> label
ROWS = {1: "r16", 2: "r32", 3: "r48"}
SHAPES = [(4096, 14336), (14336, 4096), (4096, 6144), (4096, 28672), (4096, 4096), (4096, 1024)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cuda_w8_rows"))
    ap.add_argument("--ms", default="8,12,16")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda_w8_rows.py needs a CUDA GPU", file=sys.stderr)
        return 2
    schemes = args.schemes.split(",")
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        ap.error(f"unknown scheme {', '.join(unknown)} (known: {', '.join(SCHEMES)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = tee(out / "bench_cuda_w8_rows.log")
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    say(f"# us per call, {torch.cuda.get_device_name()} ({sms} SMs); r16 / r32 / r48: row tiles of 16 / 32 / 48 "
        "channels (-: not served), rule: the kernel's rule (its row tiles in brackets), bf16: F.linear; the 8-bit "
        "schemes per channel (fp8_block per 128x128 block), warps as their rule picks")
    copy_bw = copy_bandwidth()
    say(f"# copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write); % copy: the rule's weight bytes / time / that")
    result = {"device": torch.cuda.get_device_name(), "sms": sms, "copy_bytes_per_s": copy_bw, "cases": []}
    start = time.monotonic()
    for k, n in SHAPES:
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = bf16_linear_time(x, n, k) * 1e6
            for scheme in schemes:
                p, copies = weight_copies(scheme, n, k)
                ref = S.reference(scheme, x, [p[name] for name in S.get_scheme(scheme).param_names if p.get(name) is not None], None)
                rule = C8.w8_row_tiles(m, n, sms, scheme == "fp8_block")
                w, sw = copies[0]
                nbytes = w.numel() * w.element_size() + sw.numel() * sw.element_size()
                case = {"scheme": scheme, "k": k, "n": n, "m": m, "rule": rule, "bf16_us": bf16, "weight_bytes": nbytes,
                        "us": {}, "rel_err": {}}
                for name, rows in [*((v, r) for r, v in ROWS.items()), ("rule", None)]:
                    if rows == 3 and (m <= 8 or scheme == "fp8_block"):
                        continue
                    call = kernel_call(scheme, x, row_tiles=rows)
                    case["rel_err"][name] = S.relative_error(call(*copies[0]), ref)
                    case["us"][name] = graph_time([(lambda ws: (lambda: call(*ws)))(ws) for ws in copies]) * 1e6
                result["cases"].append(case)
                tol = S.TOLERANCE[torch.bfloat16]
                say(f"{scheme:17s} K={k:5d} N={n:5d} M={m:2d}: " + " | ".join(
                    f"{name} " + (f"{case['us'][name]:5.1f}" + ("" if case["rel_err"][name] <= tol else " WRONG")
                                  if name in case["us"] else "    -") for name in (*ROWS.values(), "rule"))
                    + f" [{rule}] {nbytes / (case['us']['rule'] * 1e-6) / copy_bw:4.0%} | bf16 {bf16:5.1f}")
                (out / "bench_cuda_w8_rows.json").write_text(json.dumps(result, indent=1))
                del copies
    say(f"# {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
