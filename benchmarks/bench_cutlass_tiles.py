#!/usr/bin/env python3
"""Which CUTLASS tile configuration is fastest for each layer shape and M?

Every family of the ``cutlass`` backend is built with a few tile configurations
(``*Configs`` in ``qlinear_pass/kernels/cutlass/qlp_gemm.cuh``) and
``backends/cutlass.py: tile_config`` picks one per call.  This times every
configuration of every family on Llama-3-8B's shapes, with the activation already
quantized, next to the fastest other kernel of the scheme (FlashInfer's DeepGEMM for
``fp8_block``, ``torch._scaled_mm`` for ``fp8_rowwise``, our Triton GEMM for
``int8_rowwise``), and marks the configuration ``tile_config`` picks.  (The weight-only families'
configurations are timed by ``bench_decode.py --prefill``, beside our other weight-only paths.)  Timing as in ``bench_linear.py`` (CUDA-graph median, weight copies past L2).

Writes ``bench_cutlass_tiles.json`` and ``summary.md`` to --out.  Needs a Hopper GPU
and the CUTLASS toolchain (the families are built on first use).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_linear as BL  # noqa: E402

from qlinear_pass import registry  # noqa: E402
from qlinear_pass.backends import cutlass as CU  # noqa: E402
from qlinear_pass.registry import DeviceInfo  # noqa: E402

#: (scheme, our kernel, the other kernels of the scheme timed beside it: the fastest of each scheme
#: in bench_linear.py's runs; the rest are there)
CASES = [
    ("fp8_block", "cutlass_fp8_block", ["flashinfer_deepgemm_fp8_block"]),
    ("fp8_rowwise", "cutlass_fp8", ["torch_scaled_mm"]),
    ("int8_rowwise", "cutlass_int8", ["triton_w8a8"]),
]


def time_kernel(kernel, wt, act, settings, timer, config=None):
    """Median seconds of one static-activation call of ``kernel`` (with tile ``config`` for ours)."""
    spec = BL.layer_spec(wt.scheme, wt.k, wt.n, act.m, "static", act.xq.dtype, settings.device)
    ok, why = kernel.can_implement(spec)
    if not ok:
        raise ValueError(why)
    extra = {} if config is None else {"config": config}

    def make_call():
        params = BL.clone_all(wt.params) + [act.xs]
        return lambda: kernel.run(spec, act.xq, params, None, **extra)

    calls = [make_call() for _ in range(BL.n_copies(BL.nbytes(wt.params), settings.dry_run))]
    try:
        return timer.time(calls)["time_s"]
    finally:
        del calls
        BL._free()


def bench_case(scheme, ours_name, peer_names, shapes, ms, settings, timer, rows, device) -> bool:
    ours = registry.get_kernel(ours_name)
    ok, why = ours.is_supported(device)
    if not ok:
        BL.log(f"{ours_name}: not run here: {why}")
        return True
    configs = list(ours.module().configs())
    peers = []
    for name in peer_names:
        k = registry.kernels().get(name)
        if k is None:
            continue
        ok, why = k.is_supported(device)
        if ok:
            peers.append(k)
        else:
            BL.log(f"{name}: not timed: {why}")
    for k_, n in shapes:
        wt = BL.make_weights(scheme, k_, n, settings.device)
        for m in ms:
            act = BL.make_activation(scheme, m, k_, settings.device)
            chosen = CU.tile_config(ours.family, m, n, k_)
            contestants = [(ours, c, "ours") for c in configs] + [(p, None, "peer") for p in peers]
            for kernel, config, kind in contestants:
                if settings.out_of_time():
                    return False
                row = {"scheme": scheme, "kernel": kernel.name, "config": config, "kind": kind, "K": k_, "N": n,
                       "M": m, "chosen": config == chosen if kind == "ours" else None}
                try:
                    t = time_kernel(kernel, wt, act, settings, timer, config)
                    row.update(time_us=t * 1e6, tflops=2.0 * m * n * k_ / t / 1e12)
                    BL.log(f"[{settings.elapsed():6.1f}s] {scheme:<13} {k_}x{n:<6} M={m:<5} "
                           f"{kernel.name + (' ' + config if config else ''):<58} {row['time_us']:9.1f} us"
                           f"{'  <- tile_config' if row['chosen'] else ''}")
                except Exception as exc:
                    row["error"] = BL._short(exc)
                    BL.log(f"{scheme} {k_}x{n} M={m} {kernel.name} {config or ''}: ERROR {row['error']}")
                rows.append(row)
    return True


def summary(rows: list) -> str:
    """Per scheme and shape: each configuration's time by M, the chosen one against the fastest,
    and the fastest other kernel against the chosen one."""
    out = ["Times in us, activation pre-quantized. chosen/best: the time of tile_config's choice over the "
           "fastest configuration's (1.00: it picked the fastest); peer ratio: the fastest other kernel's "
           "time over the chosen configuration's (> 1: ours is faster).", ""]
    done = [r for r in rows if "time_us" in r]
    for scheme in dict.fromkeys(r["scheme"] for r in done):
        configs = list(dict.fromkeys(r["config"] for r in done if r["scheme"] == scheme and r["kind"] == "ours"))
        for k, n in dict.fromkeys((r["K"], r["N"]) for r in done if r["scheme"] == scheme):
            here = [r for r in done if r["scheme"] == scheme and (r["K"], r["N"]) == (k, n)]
            out += [f"### {scheme}, K={k} N={n}", "",
                    "| M | " + " | ".join(configs) + " | chosen/best | fastest other | us | peer ratio |",
                    "|---:|" + "---:|" * len(configs) + "---:|---|---:|---:|"]
            for m in sorted({r["M"] for r in here}):
                at = [r for r in here if r["M"] == m]
                mine = {r["config"]: r for r in at if r["kind"] == "ours"}
                cells = []
                for c in configs:
                    r = mine.get(c)
                    cells.append("-" if r is None else (f"**{r['time_us']:.1f}**" if r["chosen"] else f"{r['time_us']:.1f}"))
                chosen = next((r for r in mine.values() if r["chosen"]), None)
                best = min(mine.values(), key=lambda r: r["time_us"], default=None)
                peer = min((r for r in at if r["kind"] == "peer"), key=lambda r: r["time_us"], default=None)
                cb = f"{chosen['time_us'] / best['time_us']:.2f}" if chosen and best else "-"
                pr = f"{peer['time_us'] / chosen['time_us']:.2f}" if chosen and peer else "-"
                other = f"{peer['kernel']} | {peer['time_us']:.1f}" if peer else "- | -"
                out.append(f"| {m} | " + " | ".join(cells) + f" | {cb} | {other} | {pr} |")
            out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=BL.REPO / "benchmarks" / "results" / "h100" / "cutlass" / "tiles")
    p.add_argument("--schemes", default=",".join(c[0] for c in CASES), help="comma-separated (default: %(default)s)")
    p.add_argument("--shapes", type=BL._parse_shapes, default=BL.LLAMA3_8B_SHAPES, help="comma-separated KxN")
    p.add_argument("--ms", type=lambda s: [int(x) for x in s.split(",")], default=BL.MS)
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds after which no new measurement starts")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cutlass_tiles.py needs a CUDA device (a Hopper GPU)")
    settings = BL.settings_from(argparse.Namespace(dry_run=False, quick=args.quick, time_budget=args.time_budget))
    timer = BL.Timer(settings)
    device = DeviceInfo.of("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    BL.log(f"device: {device}; torch {torch.__version__}")
    rows: list = []
    wanted = args.schemes.split(",")
    finished = True
    for scheme, ours, peers in CASES:
        if scheme in wanted and finished:
            finished = bench_case(scheme, ours, peers, args.shapes, args.ms, settings, timer, rows, device)
    doc = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "time": time.strftime("%Y-%m-%d %H:%M:%S"), "stopped_early": not finished, "rows": rows}
    (args.out / "bench_cutlass_tiles.json").write_text(json.dumps(doc, indent=1))
    table = summary(rows)
    (args.out / "summary.md").write_text(table + "\n")
    BL.log(table)


if __name__ == "__main__":
    main()
