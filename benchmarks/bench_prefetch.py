#!/usr/bin/env python3
"""Does the w4a16 decode kernel gain from L2 prefetches of the next layer's weights?  Pairs of
launches as they follow each other in a Llama-3-8B decoder layer at batch 1 (q/k/v then o_proj
across attention; o_proj then gate/up and down then the next q/k/v across a norm; gate/up then
down across SwiGLU), with a stand-in for the kernels between them, timed with and without the
first launch asking L2 for the second's weights as its CTAs finish (``prefetch``).

Stand-ins between the two launches: ``none``; ``idle`` (one thread spinning ``--idle-us``, DRAM
idle, like a norm or SwiGLU kernel); ``stream`` (a copy of ``--stream-mb`` MB, as attention reads
the KV cache).  Each step (first launch, stand-in, second launch) is timed like ``bench_decode.py``
(CUDA graph replays over weight copies past L2), and the second launch's output is checked against
the scheme's reference.  Writes ``bench_prefetch.json`` and ``bench_prefetch.log`` to --out.
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
from qlinear_pass.kernels import int4_layout  # noqa: E402

#: (name, first launch's layers [(K, N)], second launch's layers, stand-in between them)
PAIRS = [
    ("qkv -> attention -> o", [(4096, 4096), (4096, 1024), (4096, 1024)], [(4096, 4096)], "stream"),
    ("o -> norm -> gate/up", [(4096, 4096)], [(4096, 14336), (4096, 14336)], "idle"),
    ("gate/up -> swiglu -> down", [(4096, 14336), (4096, 14336)], [(14336, 4096)], "idle"),
    ("down -> norm -> qkv", [(14336, 4096)], [(4096, 4096), (4096, 1024), (4096, 1024)], "idle"),
]


def layers_of(shapes, seed):
    """Public-layout weights and scales (for the reference) and the kernel's layers."""
    torch.manual_seed(seed)
    public, kernel = [], []
    for k, n in shapes:
        p = S.quantize_weight("w4a16", torch.randn(n, k, device="cuda") * 0.02, group_size=128)
        public.append(p)
        kernel.append(CW.Layer(int4_layout.to_mma16(p["weight"]), p["weight_scale"].float().contiguous()))
    return public, kernel


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prefetch"))
    ap.add_argument("--ms", default="1,8")
    ap.add_argument("--idle-us", type=float, default=3.0)
    ap.add_argument("--stream-mb", type=float, default=8.0)
    ap.add_argument("--limits-mb", default="8,16,all", help="prefetch at most this many MB of the second launch's weights")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_prefetch.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = tee(out / "bench_prefetch.log")
    hz = getattr(torch.cuda.get_device_properties(0), "clock_rate", 1_980_000) * 1e3  # kHz
    idle_cycles = int(args.idle_us * 1e-6 * hz)
    src = torch.empty(int(args.stream_mb * 2**20) // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    standins = {"none": lambda: None, "idle": lambda: torch.cuda._sleep(idle_cycles), "stream": lambda: dst.copy_(src)}
    say(f"# us per step (first launch, stand-in, second launch), w4a16 g128, {torch.cuda.get_device_name()}; idle "
        f"{args.idle_us} us ({idle_cycles} cycles), stream {args.stream_mb} MB copied; pf N: the first launch prefetches "
        "at most N MB of the second's weights (all: all of them); gain: plain - pf")
    result = {"device": torch.cuda.get_device_name(), "args": vars(args), "cases": []}
    t0 = time.monotonic()
    limits = [None if v == "all" else int(float(v) * 2**20) for v in args.limits_mb.split(",")]
    for name, first, second, between in PAIRS:
        pub_a, lay_a = layers_of(first, 1)
        pub_b, lay_b = layers_of(second, 2)
        nbytes = sum(t.numel() * t.element_size() for ly in lay_a + lay_b for t in (ly.w, ly.s))
        sets = [([ly._replace(w=ly.w.clone(), s=ly.s.clone()) for ly in lay_a],
                 [ly._replace(w=ly.w.clone(), s=ly.s.clone()) for ly in lay_b])
                for _ in range(int(2 * L2_BYTES // nbytes) + 2)]
        for m in (int(v) for v in args.ms.split(",")):
            torch.manual_seed(3)
            xa = torch.randn(m, first[0][0], device="cuda", dtype=torch.bfloat16)
            xb = torch.randn(m, second[0][0], device="cuda", dtype=torch.bfloat16)
            refs = [S.reference("w4a16", xb, [p["weight"], p["weight_scale"]], None) for p in pub_b]
            case = {"pair": name, "m": m, "between": between, "us": {}}
            for st_name in ("none", between):
                mid = standins[st_name]
                for limit in [0, *limits]:
                    label = f"{st_name} " + ("plain" if limit == 0 else f"pf {'all' if limit is None else limit >> 20}")

                    def step(a, b, limit=limit, mid=mid):
                        pf = () if limit == 0 else CW.prefetch_ranges([ly.w for ly in b], xb.device, limit)
                        CW.w4a16_decode_group(xa, a, 128, prefetch=pf)
                        mid()
                        return CW.w4a16_decode_group(xb, b, 128)

                    ys = step(*sets[0])
                    for y, ref in zip(ys, refs):
                        assert S.relative_error(y, ref) <= S.TOLERANCE[torch.bfloat16], f"{name} M={m} {label}: wrong"
                    case["us"][label] = graph_time([(lambda s: (lambda: step(*s)))(s) for s in sets]) * 1e6
            result["cases"].append(case)
            parts = []
            for st_name in ("none", between):
                plain = case["us"][f"{st_name} plain"]
                parts.append(f"{st_name}: plain {plain:5.1f} " + " ".join(
                    f"{lab.split(' ', 1)[1]} {us:5.1f} ({plain - us:+4.1f})" for lab, us in case["us"].items()
                    if lab.startswith(st_name + " pf")))
            say(f"{name:26s} M={m:2d}: " + " | ".join(parts))
            (out / "bench_prefetch.json").write_text(json.dumps(result, indent=1))
        del sets
    say(f"# {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
