"""torch._scaled_mm / F.scaled_mm with (1x128, 128x128) block scales (cuBLASLt's block-scaled FP8
GEMM) on this GPU, before ``torch_scaled_mm_block`` was built on it:

1. which scale layouts each entry point takes, and its error against the fp8_block reference;
2. on which small shapes it is right (M, K and N where the scale columns are not 16-byte aligned);
3. its speed and host time against bf16 ``F.linear`` and our Triton GEMM on Llama-3-8B's shapes.

    python benchmarks/probe_block_scaled_mm.py OUT.json     (a CUDA GPU; prints as it goes)

``bench_linear.py --schemes fp8_block`` times the kernel as it ships, beside the others."""
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlinear_pass import schemes as S  # noqa: E402
from qlinear_pass.kernels import triton_gemm as T  # noqa: E402

dev = "cuda"
out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layouts": {}, "cells": []}

def timeit(fn, iters=50):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for _ in range(iters): fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) * 1000 / iters)
    return sorted(ts)[2]

def host_us(fn, iters=200):
    fn(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters): fn()
    h = (time.perf_counter() - t) / iters * 1e6
    torch.cuda.synchronize()
    return h

def make(m, k, n):
    g = torch.Generator(device=dev).manual_seed(0)
    wf = torch.randn(n, k, device=dev, generator=g) * 0.05
    qw = S.quantize_weight("fp8_block", wf)
    w, sw = qw["weight"], qw["weight_scale"]
    x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
    xq, sa = S.quantize_activation("fp8_block", x)
    return x, wf.to(torch.bfloat16), w, sw.float().contiguous(), xq, sa.float().reshape(m, -1).contiguous()

def ref(xq, sa, w, sw):
    a = xq.float() * sa.repeat_interleave(128, 1)
    b = w.float() * sw.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
    return (a @ b.t())

def mn(sa):  # [M, G] with strides (1, M), M = 1 included
    return torch.empty_strided(sa.shape, (1, sa.shape[0]), dtype=sa.dtype, device=sa.device).copy_(sa)

# which layouts does each entry point take
m, k, n = 256, 4096, 6144
x, wb, w, sw, xq, sa = make(m, k, n)
r = ref(xq, sa, w, sw)
tries = {
    "v1 sa(1,M) sw.t()": lambda: torch._scaled_mm(xq, w.t(), mn(sa), sw.t(), out_dtype=torch.bfloat16),
    "v1 sa(1,M) sw.t().contig": lambda: torch._scaled_mm(xq, w.t(), mn(sa), sw.t().contiguous(), out_dtype=torch.bfloat16),
    "v1 sa rowmajor sw.t()": lambda: torch._scaled_mm(xq, w.t(), sa, sw.t(), out_dtype=torch.bfloat16),
}
try:
    from torch.nn.functional import ScalingType as ST
    tries["v2 sa(1,M) sw.t()"] = lambda: F.scaled_mm(xq, w.t(), mn(sa), ST.BlockWise1x128, sw.t(), ST.BlockWise128x128, output_dtype=torch.bfloat16)
    tries["v2 sa(1,M) sw.t().contig"] = lambda: F.scaled_mm(xq, w.t(), mn(sa), ST.BlockWise1x128, sw.t().contiguous(), ST.BlockWise128x128, output_dtype=torch.bfloat16)
except Exception as e:
    out["layouts"]["v2 import"] = repr(e)
good = None
for name, fn in tries.items():
    try:
        y = fn(); torch.cuda.synchronize()
        err = ((y.float() - r).norm() / r.norm()).item()
        out["layouts"][name] = f"ok, relative error {err:.3g}"
        if good is None and err < 0.02:
            good = name
    except Exception as e:
        out["layouts"][name] = "error: " + str(e).splitlines()[0][:300]
print(json.dumps(out["layouts"], indent=1), flush=True)
out["chosen"] = good
if good is None:
    json.dump(out, open(sys.argv[1], "w"), indent=1); sys.exit(0)
v2 = good.startswith("v2")

# small shapes: the activation scales as columns of M, the weight's as the transposed view of [N/128, K/128]
out["shapes"] = {}
for m, k, n in itertools.product([1, 3, 4, 5, 16, 64], [256, 384, 512, 640, 1024], [128, 192, 256]):
    x, wb, w, sw, xq, sa = make(m, k, n)
    r = ref(xq, sa, w, sw)
    try:
        y = torch._scaled_mm(xq, w.t(), mn(sa), sw.t(), out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        e = ((y.float() - r).norm() / r.norm()).item()
        out["shapes"][f"M={m} K={k} N={n}"] = "ok" if e < 1e-2 else f"WRONG {e:.2g}"
    except RuntimeError as ex:
        out["shapes"][f"M={m} K={k} N={n}"] = "error " + str(ex).splitlines()[0][:120]
bad = {k: v for k, v in out["shapes"].items() if v != "ok"}
print(f"{len(out['shapes'])} small shapes, {len(bad)} not ok:", flush=True)
print("\n".join(f"  {k}: {v}" for k, v in bad.items()), flush=True)
def blk(xq, w, sa_mn, swt):
    if v2:
        return F.scaled_mm(xq, w.t(), sa_mn, ST.BlockWise1x128, swt, ST.BlockWise128x128, output_dtype=torch.bfloat16)
    return torch._scaled_mm(xq, w.t(), sa_mn, swt, out_dtype=torch.bfloat16)
contig = good.endswith("contig")

for (k, n) in [(4096, 14336), (14336, 4096), (4096, 6144), (4096, 28672)]:
    for m in [16, 64, 128, 512, 1024, 2048, 4096]:
        x, wb, w, sw, xq, sa = make(m, k, n)
        sa_mn = mn(sa); swt = sw.t().contiguous() if contig else sw.t()
        y = blk(xq, w, sa_mn, swt)
        r = ref(xq, sa, w, sw)
        err = ((y.float() - r).norm() / r.norm()).item()
        yt = T.w8a8_gemm(xq, w, sa, sw, None, torch.bfloat16, a_scale=T.A_GROUP, w_scale=T.W_BLOCK)
        errt = ((yt.float() - r).norm() / r.norm()).item()
        c = dict(k=k, n=n, m=m, err_cublas=err, err_triton=errt,
                 us_bf16=timeit(lambda: F.linear(x, wb)),
                 us_cublas_block=timeit(lambda: blk(xq, w, sa_mn, swt)),
                 us_triton=timeit(lambda: T.w8a8_gemm(xq, w, sa, sw, None, torch.bfloat16, a_scale=T.A_GROUP, w_scale=T.W_BLOCK)),
                 host_us_cublas_block=host_us(lambda: blk(xq, w, sa_mn, swt)),
                 host_us_triton=host_us(lambda: T.w8a8_gemm(xq, w, sa, sw, None, torch.bfloat16, a_scale=T.A_GROUP, w_scale=T.W_BLOCK)))
        c["tflops_cublas_block"] = 2 * m * k * n / c["us_cublas_block"] / 1e6
        out["cells"].append(c)
        print(f"K={k:5d} N={n:5d} M={m:4d}: bf16 {c['us_bf16']:7.1f} cublas-block {c['us_cublas_block']:7.1f} triton {c['us_triton']:7.1f} us "
              f"(x bf16 {c['us_bf16']/c['us_cublas_block']:.2f} / {c['us_bf16']/c['us_triton']:.2f}); host {c['host_us_cublas_block']:.1f} / {c['host_us_triton']:.1f} us; "
              f"err {err:.2e} / {errt:.2e}", flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
