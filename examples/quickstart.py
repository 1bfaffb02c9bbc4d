"""Quantize a small Llama-style block in every scheme, compile it with `auto`, show what ran.

Prints, for each scheme: the explain table (which kernel runs each linear and
why not the others), the max error of the compiled model against the eager
reference modules, and eager vs compiled time.
"""
from __future__ import annotations

import copy
import time

import torch

import qlinear_pass as qp
from qlinear_pass import schemes as S
from qlinear_pass.examples_model import TinyBlock


def timed(fn, x, reps):
    fn(x)  # warm up (and compile)
    if x.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, inter = (1024, 2816) if device == "cuda" else (256, 512)
    torch.manual_seed(0)
    base = TinyBlock(hidden, inter).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(4, 32, hidden, device=device, dtype=torch.bfloat16)
    print(f"qlinear_pass {qp.__version__} on {qp.DeviceInfo.of(device)}, torch {torch.__version__}")
    print(f"block: hidden={hidden}, intermediate={inter}; input {tuple(x.shape)} bf16\n")
    summary = []
    for scheme in [s.name for s in S.all_schemes()]:
        model = qp.quantize(copy.deepcopy(base), scheme)
        with torch.no_grad():
            report = qp.explain(model, x)
        print(f"== {scheme} ==")
        print(report)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=qp.make(), dynamic=False)
        with torch.no_grad():
            ref = model(x)
            out = compiled(x)
            err = (out.float() - ref.float()).abs().max().item()
            rel = S.relative_error(out, ref)
            reps = 20 if device == "cuda" else 3
            t_eager = timed(model, x, reps)
            t_comp = timed(compiled, x, reps)
        print(f"max |compiled - eager reference| = {err:.3g} (relative {rel:.2g}); "
              f"eager {t_eager:.2f} ms, compiled {t_comp:.2f} ms\n")
        kernels = sorted({r["kernel"] for r in report.rows})
        summary.append((scheme, ",".join(kernels), rel, t_eager, t_comp))
    print(f"{'scheme':<18} {'kernels (auto)':<28} {'rel err':>8} {'eager ms':>9} {'compiled ms':>12}")
    for scheme, kernels, rel, te, tc in summary:
        print(f"{scheme:<18} {kernels:<28} {rel:>8.2g} {te:>9.2f} {tc:>12.2f}")


if __name__ == "__main__":
    main()
