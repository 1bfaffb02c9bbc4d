#!/usr/bin/env python3
"""The 8-bit-weight decode kernel (``qlinear_pass/kernels/cuda/w8a8_decode.cu``) with its row tiles
split along K into 1, 2 or 4 parts, and as its rule picks (``cuda_w8a8.splits_for``), timed side by
side with bf16 ``F.linear``: the measurement behind the rule.

Each cell is timed like ``bench_decode.py`` (CUDA graph replays over weight copies past L2) and
checked against the scheme's reference.  Writes ``bench_cuda_splits.json`` and
``bench_cuda_splits.log`` to --out.
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
SHAPES = [(4096, 14336), (14336, 4096), (4096, 6144), (4096, 28672), (4096, 4096), (4096, 1024)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cuda_splits"))
    ap.add_argument("--ms", default="1,8,16")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda_splits.py needs a CUDA GPU", file=sys.stderr)
        return 2
    schemes = args.schemes.split(",")
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        ap.error(f"unknown scheme {', '.join(unknown)} (known: {', '.join(SCHEMES)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = tee(out / "bench_cuda_splits.log")
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    say(f"# us per call, {torch.cuda.get_device_name()} ({sms} SMs); s1 / s2 / s4: row tiles in 1 / 2 / 4 parts "
        "of K, rule: the kernel's rule (its parts in brackets; -: K / 128 not divisible), bf16: F.linear; "
        "the 8-bit schemes per channel (fp8_block per 128x128 block), tiles and warps as their rules pick")
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
                rows = 16 * C8.row_tiles_for(m, n, sms)
                rule = C8.splits_for(m, -(-n // rows), k, sms)
                w, sw = copies[0]
                nbytes = w.numel() * w.element_size() + sw.numel() * sw.element_size()
                case = {"scheme": scheme, "k": k, "n": n, "m": m, "rule": rule, "bf16_us": bf16, "weight_bytes": nbytes,
                        "us": {}, "rel_err": {}}
                for name, splits in (("s1", 1), ("s2", 2), ("s4", 4), ("rule", None)):
                    if C8.check_splits(splits, k):
                        continue
                    call = kernel_call(scheme, x, splits=splits)
                    case["rel_err"][name] = S.relative_error(call(*copies[0]), ref)
                    case["us"][name] = graph_time([(lambda ws: (lambda: call(*ws)))(ws) for ws in copies]) * 1e6
                result["cases"].append(case)
                tol = S.TOLERANCE[torch.bfloat16]
                say(f"{scheme:17s} K={k:5d} N={n:5d} M={m:2d}: " + " | ".join(
                    f"{name} " + (f"{case['us'][name]:5.1f}" + ("" if case["rel_err"][name] <= tol else " WRONG")
                                  if name in case["us"] else "    -") for name in ("s1", "s2", "s4", "rule"))
                    + f" [{rule}] {nbytes / (case['us']['rule'] * 1e-6) / copy_bw:4.0%} | bf16 {bf16:5.1f}")
                (out / "bench_cuda_splits.json").write_text(json.dumps(result, indent=1))
                del copies
    say(f"# {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
