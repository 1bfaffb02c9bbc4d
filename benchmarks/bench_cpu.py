#!/usr/bin/env python3
"""Which kernel should ``auto`` try first on a CPU?  Time every CPU kernel of every scheme.

For every scheme, activation dtype, shape (K x N) and M this times, on the same data:

* every registered kernel of the scheme that runs behind the custom op and is supported
  on the CPU, through its ``run()`` (W8A8 schemes with a float activation in: the kernel
  quantizes it, as the whole linear must).  Triton kernels run on a CPU only through the
  interpreter (for tests) and are left out;
* ``torch_int_mm``, which writes ATen ops into the graph instead of running behind the
  op: its ops (activation quantization, ``_int_mm``, the scale epilogue), eagerly;
* the eager reference module (``qlinear_pass.nn.QuantizedLinear``) and float ``F.linear``,
  as points of reference.

Wall-clock median of single calls after warm-up, under ``torch.inference_mode``, with
torch's thread count as found; the contestants of one scheme, shape and M take turns,
one call each per round, so a load that comes and goes weighs on all of them alike.  Writes ``bench_cpu.json`` and ``summary.md`` to --out; the
summary ranks the kernels of each scheme and M by their geometric-mean time over the
shapes (the CPU rows of ``qlinear_pass/ranking.py`` follow it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qlinear_pass import registry  # noqa: E402
from qlinear_pass import schemes as S  # noqa: E402
from qlinear_pass.config import SCHEMES  # noqa: E402
from qlinear_pass.kernel import Kernel  # noqa: E402
from qlinear_pass.nn import QuantizedLinear  # noqa: E402
from qlinear_pass.spec import DeviceInfo, LayerSpec  # noqa: E402

GROUP_SIZE = 128
CPU = DeviceInfo("cpu", None, "cpu")
W8A8 = ("fp8_tensor", "fp8_rowwise", "fp8_block", "int8_rowwise")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", default="1024x1024,4096x1024", help="comma-separated KxN")
    p.add_argument("--m", default="1,16,128", help="comma-separated M (rows of the activation)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="activation dtypes")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated schemes")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per contestant (at least)")
    p.add_argument("--max-calls", type=int, default=200, help="most calls per contestant")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu"))
    args = p.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        args.m = [int(v) for v in args.m.split(",")]
    except ValueError:
        p.error(f"--shapes takes KxN pairs and --m integers, got {args.shapes!r} / {args.m!r}")
    args.dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    args.schemes = args.schemes.split(",")
    for s in args.schemes:
        if s not in SCHEMES:
            p.error(f"unknown scheme {s!r} (known: {', '.join(SCHEMES)})")
    return args


def median_us(calls: list[Callable[[], object]], min_time: float, max_rounds: int) -> tuple[list[float], int]:
    """Median wall time of one call of each of ``calls``, in microseconds, and the rounds timed.

    The calls take turns, one call each per round, so a load that comes and goes on a
    shared machine weighs on all of them alike.
    """
    for call in calls:
        call()
        call()
    times: list[list[float]] = [[] for _ in calls]
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < 5 or time.perf_counter() - start < min_time * len(calls)):
        for i, call in enumerate(calls):
            t0 = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - t0)
        rounds += 1
    return [statistics.median(t) * 1e6 for t in times], rounds


def cpu_kernels(scheme: str) -> tuple[list[Kernel], list[tuple[str, str]]]:
    """The kernels of ``scheme`` to time through run(), and (name, reason) for those left out."""
    chosen, left_out = [], []
    for kernel in sorted(registry.kernels().values(), key=lambda k: k.name):
        if scheme not in kernel.schemes:
            continue
        if kernel.backend == "triton":
            left_out.append((kernel.name, "Triton runs on a CPU only through its interpreter (for tests)"))
            continue
        if type(kernel).run is Kernel.run:
            if kernel.name != "torch_int_mm":
                left_out.append((kernel.name, "no run(): it writes ATen ops into the graph"))
            continue
        ok, why = kernel.is_supported(CPU)
        if ok:
            chosen.append(kernel)
        else:
            left_out.append((kernel.name, why))
    return chosen, left_out


def int_mm_call(params, x: torch.Tensor, out_dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """torch_int_mm's graph ops, run eagerly: quantize, _int_mm, scales, cast."""
    w, sw = params[0], params[1].float().reshape(1, -1)

    def call():
        xq, sa = S.quantize_activation("int8_rowwise", x)
        return (torch._int_mm(xq, w.t()).float() * sa.float().reshape(-1, 1) * sw).to(out_dtype)

    return call


def measure(args) -> dict:
    rows, skipped = [], []
    torch.manual_seed(0)
    for dtype in args.dtypes:
        for scheme in args.schemes:
            kernels, left_out = cpu_kernels(scheme)
            skipped += [{"scheme": scheme, "kernel": n, "reason": r} for n, r in left_out]
            for k, n in args.shapes:
                lin = torch.nn.Linear(k, n, bias=False)
                lin.weight.data = (torch.randn(n, k) * 0.02).to(dtype)
                ref = QuantizedLinear.from_linear(lin, scheme, group_size=GROUP_SIZE if scheme == "w4a16" else None)
                params = ref.params
                for m in args.m:
                    x = torch.randn(m, k, dtype=dtype)
                    spec = LayerSpec(scheme=scheme, n=n, k=k, act_dtype=dtype, out_dtype=dtype,
                                     group_size=GROUP_SIZE if scheme == "w4a16" else None,
                                     act_input="dynamic" if scheme in W8A8 else "none", device="cpu",
                                     weights_constant=True, m=m)
                    calls = [("F.linear", "baseline", lambda x=x: F.linear(x, lin.weight)),
                             ("eager reference module", "reference", lambda x=x: ref(x))]
                    for kernel in kernels:
                        ok, why = kernel.can_implement(spec)
                        if not ok:
                            skipped.append({"scheme": scheme, "kernel": kernel.name, "K": k, "N": n, "M": m,
                                            "dtype": str(dtype), "reason": why})
                            continue
                        calls.append((kernel.name, "kernel", lambda kernel=kernel, spec=spec, x=x:
                                      kernel.run(spec, x, params, None)))
                    if scheme == "int8_rowwise":
                        calls.append(("torch_int_mm", "kernel", int_mm_call(params, x, dtype)))
                    with torch.inference_mode():
                        medians, rounds = median_us([c for _, _, c in calls], args.min_time, args.max_calls)
                    for (name, kind, _), us in zip(calls, medians):
                        row = {"scheme": scheme, "dtype": str(dtype).replace("torch.", ""), "K": k, "N": n, "M": m,
                               "name": name, "kind": kind, "time_us": round(us, 1), "calls": rounds}
                        rows.append(row)
                        print(f"{row['dtype']:9s} {scheme:17s} K={k:5d} N={n:5d} M={m:4d} {name:24s} {us:10.1f} us",
                              flush=True)
    return {"rows": rows, "skipped": skipped}


def rank(rows: list[dict]) -> dict:
    """{dtype: {scheme: {M: [(kernel, geometric-mean us over the shapes), ...] fastest first}}}."""
    out: dict = {}
    keys = {(r["dtype"], r["scheme"], r["M"]) for r in rows}
    for dtype, scheme, m in sorted(keys, key=lambda key: (key[0], SCHEMES.index(key[1]), key[2])):
        times: dict[str, list[float]] = {}
        for r in rows:
            if (r["dtype"], r["scheme"], r["M"]) == (dtype, scheme, m) and r["kind"] == "kernel":
                times.setdefault(r["name"], []).append(r["time_us"])
        shapes = max((len(v) for v in times.values()), default=0)
        ranked = sorted(((name, math.exp(statistics.fmean(math.log(t) for t in ts)))
                         for name, ts in times.items() if len(ts) == shapes), key=lambda p: p[1])
        out.setdefault(dtype, {}).setdefault(scheme, {})[m] = ranked
    return out


def summary(result: dict) -> str:
    env = result["env"]
    lines = [f"# CPU kernels, {env['cpu']} ({env['threads']} torch threads, load average "
             f"{env['load_before']} before, {env['load_after']} after), torch {env['torch']}",
             "",
             "Wall-clock median of one call in us, the contestants taking turns; W8A8 kernels quantize the "
             "activation themselves. Ranked by the geometric mean over the shapes "
             f"({', '.join(f'{k}x{n}' for k, n in result['settings']['shapes'])}, KxN); `auto`'s CPU rows in "
             "`qlinear_pass/ranking.py` follow this ranking, per activation dtype where the dtypes disagree.",
             ""]
    by = {}
    for r in result["rows"]:
        by.setdefault((r["dtype"], r["scheme"], r["K"], r["N"], r["M"]), {})[r["name"]] = r["time_us"]
    ranks = rank(result["rows"])
    for dtype, schemes in ranks.items():
        lines += [f"## {dtype}", "", "| scheme | M | kernels, fastest first (geomean us) | F.linear | eager reference |",
                  "|---|---:|---|---|---|"]
        for scheme, per_m in schemes.items():
            for m, ranked in per_m.items():
                cells = {}
                for name in ("F.linear", "eager reference module"):
                    ts = [v[name] for key, v in by.items() if key[:2] == (dtype, scheme) and key[4] == m and name in v]
                    cells[name] = f"{math.exp(statistics.fmean(math.log(t) for t in ts)):.0f}" if ts else "-"
                order = ", ".join(f"{n} {t:.0f}" for n, t in ranked)
                lines.append(f"| {scheme} | {m} | {order} | {cells['F.linear']} | {cells['eager reference module']} |")
        lines.append("")
    lines += ["## every measurement", "", "| dtype | scheme | K | N | M | times (us) |", "|---|---|---:|---:|---:|---|"]
    for (dtype, scheme, k, n, m), v in by.items():
        lines.append(f"| {dtype} | {scheme} | {k} | {n} | {m} | " + ", ".join(f"{a} {t:.0f}" for a, t in v.items()) + " |")
    if result["skipped"]:
        lines += ["", "Left out: " + "; ".join(sorted({f"{s['kernel']} ({s['reason']})" for s in result['skipped']}))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    env = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(),
           "load_before": [round(v, 2) for v in os.getloadavg()]}
    try:
        env["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = measure(args)
    env["load_after"] = [round(v, 2) for v in os.getloadavg()]
    result = {"env": env, "settings": {"shapes": args.shapes, "m": args.m, "dtypes": [str(d) for d in args.dtypes],
                                       "min_time_s": args.min_time, "group_size": GROUP_SIZE}, **result}
    result["ranking"] = rank(result["rows"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "summary.md").write_text(summary(result))
    print(f"wrote {out / 'bench_cpu.json'} and {out / 'summary.md'}")


if __name__ == "__main__":
    main()
