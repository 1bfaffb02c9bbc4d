#!/usr/bin/env python3
"""Host time of one quantized-linear call, layer by layer of the path a compiled prefill takes.

For each (scheme, CUTLASS kernel) it times, at M x K x N (default 2048 x 4096 x 4096) with the
activation already quantized as the compiled graph hands it on: the extension's ``gemm`` alone, the
kernel's ``run``, the ``qlinear_pass::linear`` op, the activation quantization, and the activation
scale's hand-over.  Each figure: host microseconds a call (200 calls queued back to back) and wall
microseconds a call once the GPU is done.  CUDA (Hopper) only; ``benchmarks/prefill_host.py`` shows
the whole prefill.
"""
import argparse
import sys
import time

import torch

from qlinear_pass import registry as R
from qlinear_pass import schemes as S
from qlinear_pass.kernels import ops
from qlinear_pass.spec import LayerSpec

CASES = (("fp8_block", "cutlass_fp8_block"), ("fp8_rowwise", "cutlass_fp8"))


def host_and_wall(fn, n=200):
    """(host us, wall us) per call of ``fn`` over ``n`` calls queued back to back."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return host * 1e6, (time.perf_counter() - t) / n * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mkn", default="2048,4096,4096", help="M,K,N")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("op_host.py needs a CUDA GPU", file=sys.stderr)
        return 2
    m, k, n = (int(v) for v in args.mkn.split(","))
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for scheme, name in CASES:
        kernel = R.get_kernel(name)
        ok, why = kernel.is_supported(R.DeviceInfo.of("cuda"))
        if not ok:
            print(f"{name}: not timed: {why}")
            continue
        p = S.quantize_weight(scheme, torch.randn(n, k, device="cuda") * 0.02)
        w, sw = p["weight"], p["weight_scale"]
        xq, sa = ops.quantize_activation(scheme, x)
        spec = LayerSpec(scheme, n, k, xq.dtype, torch.bfloat16, device="cuda", act_input="static")
        if scheme == "fp8_block":  # the graph's MN-major scales: an [M, K/128] view of a [K/128, M] buffer
            sa = ops.mn_major_scales(sa.reshape(m, -1))[:, :m].t()
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        sa_k, sw_f, idx, mod = kernel.activation_scale(sa, m), sw.float().reshape(-1).contiguous(), kernel.config_index(m, n, k), kernel.module()
        rows = {
            "gemm (the binding)": lambda: mod.gemm(xq, w, sa_k, sw_f, None, out, idx),
            "run": lambda: kernel.run(spec, xq, [w, sw, sa], None),
            "op (qlinear_pass::linear)": lambda: ops.call(name, spec, xq, [w, sw, sa]),
            "activation quantization": lambda: ops.quantize_activation(scheme, x),
            "activation scale hand-over": lambda: kernel.activation_scale(sa, m),
        }
        for label, fn in rows.items():
            h, wall = host_and_wall(fn)
            print(f"{scheme:12s} {label:28s} host {h:6.1f} us  wall {wall:6.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
