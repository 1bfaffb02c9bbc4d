#!/usr/bin/env python3
"""Decode-sized linears (M = 1..16) at the memory roofline: every weight format, every launch
configuration of the decode kernel, beside bf16 ``F.linear`` and the earlier Triton path.

For each format, (K, N) and M this times, on the same data and in one run:

* the decode kernel (``qlinear_pass/kernels/triton_decode.py``) in every configuration of
  ``CONFIGS`` (``--sweep``) or only in the one ``decode_config`` picks;
* bf16 ``F.linear``; for M > 1 the Triton GEMMs that serve those sizes where the decode
  kernel does not; for fp8 rowwise ``torch._scaled_mm`` with the activation already quantized.

Each time is the median replay of a CUDA graph of many calls cycling over weight copies that
together exceed twice the L2, divided by the calls.  Bandwidth counts the weight bytes with their
scales (the activation and output are noise at M <= 16) against a device-to-device copy measured
in the same run (bytes read + written).  Every configuration is also checked against the
scheme's reference.  Writes ``bench_decode.json`` and ``summary.md`` to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qlinear_pass import schemes as S  # noqa: E402
from qlinear_pass.kernels import triton_decode as D  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (4096, 6144), (4096, 1024)]
MS = [1, 8, 16]
PREFILL_MS = [16, 32, 64, 128, 1024, 4096]
#: (label, scheme, group size, zero points)
FORMATS = [
    ("fp8_rowwise", "fp8_rowwise", 0, False),
    ("int8_rowwise", "int8_rowwise", 0, False),
    ("fp8_block", "fp8_block", 0, False),
    ("int8_weight_only", "int8_weight_only", 0, False),
    ("fp8_weight_only", "fp8_weight_only", 0, False),
    ("w4a16 g128", "w4a16", 128, False),
    ("w4a16 g128 zp", "w4a16", 128, True),
    ("w4a16 g32 zp", "w4a16", 32, True),
]
L2_BYTES = 50e6


def tee(path: Path):
    """A ``say(line)`` that prints ``line`` and appends it to the log file ``path`` (flushed each line)."""
    log = open(path, "w")

    def say(line: str) -> None:
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    return say


def captured_graph(calls, reps: int) -> torch.cuda.CUDAGraph:
    """One CUDA graph of ``reps`` calls cycling over ``calls`` (each run twice on a side stream
    first), replayed once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            calls[i % len(calls)]()
    g.replay()
    torch.cuda.synchronize()
    return g


def graph_time(calls, reps_target: int = 200, replays: int = 7) -> float:
    """Median seconds per call: one CUDA graph of many calls cycling over ``calls``."""
    reps = max(len(calls), reps_target)
    g = captured_graph(calls, reps)
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    del g
    return statistics.median(times)


def bf16_linear_time(x: torch.Tensor, n: int, k: int) -> float:
    """Seconds per bf16 ``F.linear`` of ``x`` with an [n, k] weight, copies of it rotated past L2
    (random weights: timed, not checked)."""
    wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(1, int(2 * L2_BYTES // (n * k * 2)) + 1))]
    return graph_time([(lambda ww: (lambda: F.linear(x, ww)))(ww) for ww in wb])


def copy_bandwidth() -> float:
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    t = graph_time([lambda: dst.copy_(src)], reps_target=20, replays=5)
    return 2 * src.numel() * 4 / t


def kinds(scheme: str, params: dict):
    sch = S.get_scheme(scheme)
    wk = {torch.int8: D.Weight.INT8, torch.uint8: D.Weight.INT4}.get(params["weight"].dtype, D.Weight.FP8)
    ws = {"tensor": D.Weight.TENSOR, "channel": D.Weight.CHANNEL, "block": D.Weight.BLOCK, "group": D.Weight.GROUP}[sch.weight_granularity]
    act = D.Act.FLOAT if sch.weight_only else {"tensor": D.Act.DYN_TENSOR, "token": D.Act.DYN_TOKEN, "group": D.Act.DYN_GROUP}[sch.act_granularity]
    return wk, ws, act, sch.act_dtype == torch.int8


def triton_gemm(scheme, x, ps, g):
    """The Triton GEMMs that serve M > 1 where the decode kernel does not (``DECODE_ABOVE_M1``):
    a quantize kernel and a split-K GEMM (fill, fp32 atomics, convert)."""
    from qlinear_pass.kernels import triton_gemm as T

    sch = S.get_scheme(scheme)
    m = x.shape[0]
    kind = {torch.int8: T.W_INT8, torch.uint8: T.W_INT4}.get(ps[0].dtype, T.W_FP8)
    ws = {"tensor": T.W_TENSOR, "channel": T.W_CHANNEL, "block": T.W_BLOCK, "group": 0}[sch.weight_granularity]
    z = ps[2] if len(ps) > 2 else None
    if sch.weight_only:
        return T.weight_only_gemm(x, ps[0], ps[1], z, None, torch.bfloat16, kind=kind, group_size=g)
    gran = sch.act_granularity
    xq, sa = T.quantize_activation(x, sch.act_dtype, group=128 if gran == "group" else 0)
    return T.w8a8_gemm(xq, ps[0], sa, ps[1], None, torch.bfloat16, a_scale=T.A_GROUP if gran == "group" else T.A_TOKEN, w_scale=ws)


def serves_48_rows(scheme: str, m: int) -> bool:
    """Whether our CUDA decode kernel takes 48-row tiles for ``scheme`` at M = ``m``: the w4a16 one at
    1-8 tokens, the 8-bit one above 8 tokens with a scale per channel or per tensor (not fp8_block)."""
    if scheme == "w4a16":
        return m <= 8
    return m > 8 and scheme != "fp8_block"


def bench_case(label, scheme, g, zp, k, n, m, sweep: bool, copy_bw: float) -> dict:
    sch = S.get_scheme(scheme)
    w = torch.randn(n, k, device="cuda") * 0.02
    p = S.quantize_weight(scheme, w, group_size=g or 128, zero_points=zp)
    names = sch.param_names
    params = [p.get(nm) for nm in names]
    wbytes = sum(t.numel() * t.element_size() for t in params if t is not None)
    copies = max(1, int(2 * L2_BYTES // wbytes) + 1)
    sets = [[None if t is None else t.clone() for t in params] for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = S.reference(scheme, x, params, None)
    wk, ws, act, a8 = kinds(scheme, p)
    out = {"format": label, "scheme": scheme, "k": k, "n": n, "m": m, "weight_bytes": wbytes, "copies": copies, "configs": []}

    def ours(cfg):
        def mk(ps):
            return lambda: D.decode_gemm(x, ps[0], ps[1], ps[2] if len(ps) > 2 else None, None, None, torch.bfloat16,
                                         w_kind=wk, w_scale=ws, act=act, act_int8=a8, group_size=g, config=cfg)
        return [mk(ps) for ps in sets]

    default = D.decode_config(wk, m, n, k, g, act=act)
    if sweep == "configs":
        cfgs = [c for c in D.CONFIGS if c.use_dot or m == 1]
    elif sweep == "splits":  # the chosen configuration with every split of K
        cfgs = [dataclasses.replace(default, split_k=sp) for sp in (1, 2, 4, 8) if sp != default.split_k]
    elif sweep == "rows":  # M == 1: the chosen configuration with row blocks of 4 / 8 / 16 and 2 / 4 warps
        cfgs = [dataclasses.replace(default, block_n=bn, warps=w) for bn in (4, 8, 16) for w in (2, 4)
                if (bn, w) != (default.block_n, default.warps)] if m == 1 else []
    else:
        cfgs = []
    for cfg in [default] + cfgs:
        try:
            y = ours(cfg)[0]()
            err = S.relative_error(y, ref)
            t = graph_time(ours(cfg))
            out["configs"].append({"config": str(cfg), "default": cfg is default, "time_us": t * 1e6,
                                   "gbps": wbytes / t / 1e9, "of_copy": wbytes / t / copy_bw, "rel_err": err})
        except Exception as exc:  # a configuration that does not compile or fit: recorded, not fatal
            out["configs"].append({"config": str(cfg), "default": cfg is default, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    timed = [c for c in out["configs"] if "time_us" in c]
    best = min(timed, key=lambda c: c["time_us"]) if timed else None
    out["best"] = best
    out["default"] = next((c for c in out["configs"] if c["default"]), None)

    # peers: bf16 F.linear, the kernel a compiled model ran before, _scaled_mm with a quantized activation
    peers = {}
    peers["bf16 F.linear"] = bf16_linear_time(x, n, k)
    try:
        if m > 1:
            peers["triton GEMM"] = graph_time([(lambda ps: (lambda: triton_gemm(scheme, x, ps, g)))(ps) for ps in sets])
    except Exception as exc:
        out["triton_gemm_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    cuda = _cuda_kernel(scheme)
    if cuda is not None:
        # our CUDA decode kernel, with 16- and 32-row tiles (and 48 where the 8-bit one takes them);
        # W8A8 with per-token / per-tensor scales is given the quantized activation, as in a compiled
        # model (where the quantization fuses into the kernel before); fp8_block quantizes it in the
        # kernel up to 8 tokens and is given it above, as the backend's rule does in a compiled model
        # (CudaW8A8.takes_quantized_activation)
        from qlinear_pass.backends.cuda import CudaW8A8
        from qlinear_pass.kernels import cuda_w4a16, cuda_w8a8, int4_layout

        if scheme == "w4a16":
            def fn(ps, rt):
                return cuda_w4a16.w4a16_decode(x, int4_layout.mma16_of(ps[0]), ps[1], ps[2] if len(ps) > 2 else None, None, g, row_tiles=rt)
        elif sch.weight_only:
            def fn(ps, rt):
                return cuda_w8a8.w8a16_decode(x, ps[0], ps[1], None, row_tiles=rt)
        elif scheme == "fp8_block" and m > CudaW8A8.BLOCK_QUANTIZED_ABOVE:
            xq_c, xs_c = S.quantize_activation(scheme, x)

            def fn(ps, rt):
                return cuda_w8a8.fp8_block_q_decode(xq_c, xs_c, ps[0], ps[1], None, torch.bfloat16, row_tiles=rt)
        elif scheme == "fp8_block":  # the kernel quantizes the activation itself
            def fn(ps, rt):
                return cuda_w8a8.fp8_block_decode(x, ps[0], ps[1], None, row_tiles=rt)
        else:
            xq_c, xs_c = S.quantize_activation(scheme, x)

            def fn(ps, rt):
                return cuda_w8a8.w8a8_decode(xq_c, xs_c, ps[0], ps[1], None, torch.bfloat16, row_tiles=rt)
        for rt in (1, 2, 3) if serves_48_rows(scheme, m) else (1, 2):
            out.setdefault("cuda_rel_err", {})[f"r{rt}"] = S.relative_error(fn(sets[0], rt), ref)
            peers[f"{cuda} r{rt}"] = graph_time([(lambda ps, rt=rt: (lambda: fn(ps, rt)))(ps) for ps in sets])
        if scheme == "fp8_block" and m > CudaW8A8.BLOCK_QUANTIZED_ABOVE:  # the form the rule passes over, beside
            for rt in (1, 2):
                peers[f"{cuda} quantizing r{rt}"] = graph_time([
                    (lambda ps, rt=rt: (lambda: cuda_w8a8.fp8_block_decode(x, ps[0], ps[1], None, row_tiles=rt)))(ps)
                    for ps in sets])
        out["cuda_kernel"] = cuda
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        out["cuda_row_tiles"] = (cuda_w4a16.w4a16_row_tiles(m, n, sms, group_size=g) if scheme == "w4a16"
                                 else cuda_w8a8.w8_row_tiles(m, n, sms, block=scheme == "fp8_block"))
    if scheme == "fp8_rowwise":
        xq, xs = S.quantize_activation(scheme, x)
        peers["_scaled_mm (x pre-quantized)"] = graph_time([
            (lambda ps: (lambda: torch._scaled_mm(xq, ps[0].t(), scale_a=xs, scale_b=ps[1].reshape(1, -1),
                                                   out_dtype=torch.bfloat16)))(ps) for ps in sets])
    out["peers_us"] = {k_: v * 1e6 for k_, v in peers.items()}
    del sets
    torch.cuda.empty_cache()
    return out


@functools.lru_cache(maxsize=None)
def _cuda_kernel(scheme: str):
    """The name of our CUDA decode kernel (kernels/cuda) for ``scheme`` if this machine can build and
    run it, else None."""
    from qlinear_pass import registry as R
    from qlinear_pass.spec import DeviceInfo

    device = DeviceInfo.of("cuda")
    for kernel in R.candidates(scheme, device):
        if kernel.backend == "cuda":
            ok, why = kernel.is_supported(device)
            if not ok:
                print(f"{kernel.name} not timed: {why}", flush=True)
            return kernel.name if ok else None
    return None


def bench_prefill(label, scheme, g, zp, k, n, m, only=None) -> dict:
    """Weight-only at M = 16 .. 4096: our CUTLASS kernel of the scheme in every tile configuration, the
    weight-stationary tensor-core GEMM, the Triton GEMM that dequantises every tile in its mainloop, one
    dequantising pass + cuBLAS (for w4a16 also from the MMA-fragment layout, the path of a layer holding
    it where CUTLASS cannot run), our CUDA decode kernels (cuda_w4a16, cuda_w8a16; M <= 128) and bf16
    F.linear; weights rotated as above.  ``auto`` records the kernel ``auto`` picks for a layer of this
    M (and, for CUTLASS, the tile configuration it runs), and ``us["auto"]`` that path's time."""
    from qlinear_pass.kernels import triton_gemm as T

    p = S.quantize_weight(scheme, torch.randn(n, k, device="cuda") * 0.02, group_size=g or 128, zero_points=zp)
    params = [p.get(nm) for nm in S.get_scheme(scheme).param_names]
    wbytes = sum(t.numel() * t.element_size() for t in params if t is not None)
    sets = [[None if t is None else t.clone() for t in params] for _ in range(max(1, int(2 * L2_BYTES // wbytes) + 1))]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    kind = {torch.int8: T.W_INT8, torch.uint8: T.W_INT4}.get(p["weight"].dtype, T.W_FP8)
    ref = S.reference(scheme, x, params, None)
    out = {"format": label, "k": k, "n": n, "m": m, "weight_bytes": wbytes, "us": {}, "rel_err": {}}

    def zero(ps):
        return ps[2] if len(ps) > 2 else None

    paths = {
        "weight-stationary": lambda ps: T.weight_only_gemm_t(x, ps[0], ps[1], zero(ps), None, torch.bfloat16,
                                                             kind=kind, group_size=g),
        "triton GEMM": lambda ps: T.weight_only_gemm(x, ps[0], ps[1], zero(ps), None, torch.bfloat16,
                                                     kind=kind, group_size=g),
        "dequant + cuBLAS": lambda ps: T.dequant_linear(x, ps[0], ps[1], zero(ps), None, torch.bfloat16,
                                                        kind=kind, group_size=g),
    }
    from qlinear_pass.kernels import int4_layout

    if scheme == "w4a16":
        paths["dequant (mma16) + cuBLAS"] = lambda ps: T.dequant_linear(
            x, int4_layout.mma16_of(ps[0]), ps[1], zero(ps), None, torch.bfloat16, kind=T.W_INT4_MMA16, group_size=g)
    cuda = _cuda_kernel(scheme) if m <= 128 else None
    if cuda is not None:
        from qlinear_pass.kernels import cuda_w4a16, cuda_w8a8

        paths[cuda] = ((lambda ps: cuda_w4a16.w4a16_decode(x, int4_layout.mma16_of(ps[0]), ps[1], zero(ps), None, g))
                       if scheme == "w4a16" else (lambda ps: cuda_w8a8.w8a16_decode(x, ps[0], ps[1], None)))
    cutlass = _cutlass_weight_only(scheme, g, zp, k, n)
    if cutlass is not None and not keeps_kernel(only, cutlass[0].name, list(paths)):
        cutlass = None  # --paths leaves it out: not built either (its first build takes minutes)
    if cutlass is not None:
        kernel, spec = cutlass
        for name in kernel.module().configs():
            paths[f"{kernel.name} {name}"] = (lambda name: lambda ps: kernel.run(spec, x, ps, None, config=name))(name)
    if only:  # --paths: the paths whose names contain one of these (bf16 F.linear always runs)
        paths = {nm: fn for nm, fn in paths.items() if any(o in nm for o in only)}
    reps = 20 if m >= 1024 else 100
    for name, fn in paths.items():
        try:
            out["rel_err"][name] = S.relative_error(fn(sets[0]), ref)
            out["us"][name] = graph_time([(lambda ps: (lambda: fn(ps)))(ps) for ps in sets], reps_target=reps, replays=5) * 1e6
        except Exception as exc:  # recorded, not fatal
            out.setdefault("errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    cut = {p_: t for p_, t in out["us"].items() if cutlass and p_.startswith(cutlass[0].name + " ")}
    if cut:
        name = min(cut, key=cut.get)
        out["us"][cutlass[0].name] = cut[name]  # the fastest configuration
        out["cutlass_config"] = name.split(" ", 1)[1]
        from qlinear_pass.backends.cutlass import tile_config

        out["cutlass_tile_config"] = tile_config(cutlass[0].family, m, n, k, g)  # what the kernel runs by default
    out["auto"] = _auto_kernel(scheme, g, zp, k, n, m)
    auto_path = (f"{out['auto']} {out['cutlass_tile_config']}" if cutlass and out["auto"] == cutlass[0].name
                 else out["auto"])
    if auto_path in out["us"]:
        out["us"]["auto"] = out["us"][auto_path]
    best = getattr(T._wo_t_kernel, "best_config", None)
    out["weight_stationary_config"] = str(best) if best is not None else None
    out["split_k"] = T.wt_split_k(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
    wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    out["us"]["bf16 F.linear"] = graph_time([(lambda ww: (lambda: F.linear(x, ww)))(ww) for ww in wb], reps_target=reps, replays=5) * 1e6
    del sets, wb
    torch.cuda.empty_cache()
    return out


def _auto_kernel(scheme: str, g: int, zp: bool, k: int, n: int, m: int) -> str:
    """The kernel ``auto`` runs a bf16 layer of this scheme and shape on with M fixed at ``m``, here."""
    from qlinear_pass import config as C
    from qlinear_pass import registry as R
    from qlinear_pass.select import select

    spec = R.LayerSpec(scheme, n, k, torch.bfloat16, torch.bfloat16, group_size=g or None, zero_points=zp,
                       act_input="none", device="cuda", m=m)
    return select(spec, C.LinearBackendConfig()).kernel.name


#: our CUTLASS weight-only kernel of each scheme (each configuration timed, the fastest reported)
CUTLASS_WEIGHT_ONLY = {"w4a16": "cutlass_w4a16", "int8_weight_only": "cutlass_int8_weight_only",
                       "fp8_weight_only": "cutlass_fp8_weight_only"}
PREFILL_PATHS = ("auto", *CUTLASS_WEIGHT_ONLY.values(), "weight-stationary", "triton GEMM", "dequant + cuBLAS",
                 "dequant (mma16) + cuBLAS", "cuda_w4a16", "cuda_w8a16")


def keeps_kernel(only, kernel: str, others) -> bool:
    """Whether --paths ``only`` (parts of path names; empty: every path) may keep a path of ``kernel``,
    whose paths are named "<kernel> <tile configuration>" (known once it is built): a part that names
    the kernel, or one that is part of none of the ``others`` paths (it may name a configuration)."""
    return not only or any(o in kernel or kernel in o or not any(o in nm for nm in others) for o in only)


@functools.lru_cache(maxsize=None)
def _cutlass_weight_only(scheme: str, g: int, zp: bool, k: int, n: int):
    """(our CUTLASS kernel of a weight-only scheme, a layer spec) where it runs this layer here, else None."""
    from qlinear_pass import registry as R
    from qlinear_pass.spec import DeviceInfo

    kernel = R.get_kernel(CUTLASS_WEIGHT_ONLY[scheme])
    spec = R.LayerSpec(scheme, n, k, torch.bfloat16, torch.bfloat16, group_size=g or None, zero_points=zp,
                       act_input="none", device="cuda")
    for ok, why in (kernel.is_supported(DeviceInfo.of("cuda")), kernel.can_implement(spec)):
        if not ok:
            print(f"{kernel.name} not timed: {why}", flush=True)
            return None
    return kernel, spec


def barh_png(path: Path, labels: list, values: list, xlabel: str, title: str) -> bool:
    """One horizontal bar a value, top to bottom in the given order, each labelled with its value;
    False without matplotlib (the JSON and summary.md still hold every number) or values."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not values:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(labels) + 1.2))
    ax.barh(labels[::-1], values[::-1], color="tab:blue")
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_prefill(res: dict, path: Path) -> bool:
    """One panel per (K, N): each path's speed relative to bf16 F.linear (bf16 time / path time) by M."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # no matplotlib: the JSON and summary.md still hold every number
        print(f"plot skipped: {exc}", flush=True)
        return False
    shapes = sorted({(c["format"], c["k"], c["n"]) for c in res["cases"]})
    if not shapes:
        return False
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.6 * len(shapes), 4.0), squeeze=False)
    for ax, (fmt, k, n) in zip(axes[0], shapes):
        cases = sorted((c for c in res["cases"] if (c["format"], c["k"], c["n"]) == (fmt, k, n)), key=lambda c: c["m"])
        for name in PREFILL_PATHS:
            pts = [(c["m"], c["us"]["bf16 F.linear"] / c["us"][name]) for c in cases if name in c["us"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.axhline(1.0, color="#777777", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("x bf16 F.linear (higher is faster)")
        ax.set_title(f"{fmt}, K={k} N={n}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Weight-only GEMMs, {res['device']}, torch {res['torch']}, Triton {res['triton']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def prefill_row(c: dict) -> str:
    u = c["us"]
    bf = u["bf16 F.linear"]
    cells = " | ".join(f"{u[p]:.1f} ({bf / u[p]:.2f}x)" if p in u else "-" for p in PREFILL_PATHS)
    return (f"| {c['format']} | {c['k']} | {c['n']} | {c['m']} | {bf:.1f} | {cells} | {c.get('auto', '-')} | "
            f"{c.get('cutlass_config', '-')} | {c['weight_stationary_config']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "decode"))
    ap.add_argument("--sweep", choices=["configs", "splits", "rows"], default=None,
                    help="also time every configuration in CONFIGS, or the chosen one with every split of K")
    ap.add_argument("--formats", default="", help="comma-separated labels (default: all)")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default="", help="KxN,... (default: Llama-3-8B decode shapes)")
    ap.add_argument("--prefill", action="store_true",
                    help="weight-only formats at M = 16 .. 4096 (PREFILL_MS): every weight-only GEMM path vs bf16")
    ap.add_argument("--paths", default="",
                    help="with --prefill: comma-separated parts of path names to time (default: every path)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ms = [int(v) for v in args.ms.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    want = set(args.formats.split(",")) if args.formats else None
    import triton

    if args.prefill:
        res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "cases": []}
        lines = [f"# Weight-only GEMMs at M = 16 .. 4096, {res['device']}", "",
                 "us per call (x bf16 = bf16 time / path time), weights rotated past L2, one run; the CUTLASS columns "
                 "are the fastest tile configuration (named in 'cutlass tiles'; every one is in the JSON); 'auto' is the "
                 "kernel auto runs at this M (named in 'auto kernel'), in the tile configuration it runs.", "",
                 "| format | K | N | M | bf16 | " + " | ".join(PREFILL_PATHS) + " | auto kernel | cutlass tiles | weight-stationary config |",
                 "|---|---|---|---|---|" + "---|" * len(PREFILL_PATHS) + "---|---|---|"]
        for label, scheme, g, zp in FORMATS:
            if S.get_scheme(scheme).weight_only and (not want or label in want):
                for k, n in (shapes if args.shapes else [(4096, 14336), (14336, 4096), (4096, 6144)]):
                    for m in (ms if args.ms != ",".join(map(str, MS)) else PREFILL_MS):
                        c = bench_prefill(label, scheme, g, zp, k, n, m, [p_ for p_ in args.paths.split(",") if p_])
                        res["cases"].append(c)
                        lines.append(prefill_row(c))
                        print(lines[-1], c.get("errors", ""), flush=True)
                        (out_dir / "bench_prefill.json").write_text(json.dumps(res, indent=1))
        (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
        plot_prefill(res, out_dir / "bench_prefill.png")
        return 0
    copy_bw = copy_bandwidth()

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(), "copy_bytes_per_s": copy_bw, "sweep": args.sweep, "cases": []}
    print(f"{result['device']}: copy {copy_bw / 1e9:.0f} GB/s", flush=True)
    t0 = time.monotonic()
    for label, scheme, g, zp in FORMATS:
        if want and label not in want:
            continue
        for k, n in shapes:
            for m in ms:
                case = bench_case(label, scheme, g, zp, k, n, m, args.sweep, copy_bw)
                result["cases"].append(case)
                b, d = case["best"], case["default"]
                peers = ", ".join(f"{k_} {v:.1f}" for k_, v in case["peers_us"].items())
                if b:
                    print(f"[{time.monotonic() - t0:5.0f}s] {label:17s} K={k:5d} N={n:5d} M={m:2d}: best {b['time_us']:6.1f} us "
                          f"{b['of_copy']:.0%} ({b['config']}), chosen {d.get('time_us', float('nan')):6.1f} us "
                          f"{d.get('of_copy', 0):.0%} | {peers} | err {b['rel_err']:.1e}", flush=True)
                else:
                    print(f"{label} K={k} N={n} M={m}: no configuration ran: {case['configs'][:2]}", flush=True)
                (out_dir / "bench_decode.json").write_text(json.dumps(result, indent=1))
    write_summary(result, out_dir / "summary.md")
    if plot_decode(result, out_dir / "bench_decode.png"):
        print(f"wrote {out_dir / 'bench_decode.png'}", flush=True)
    return 0


def write_summary(result: dict, path: Path) -> None:
    lines = [f"# Decode kernel, {result['device']} (torch {result['torch']}, Triton {result['triton']})", "",
             f"Copy bandwidth {result['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write).  us per call; "
             "% = weight bytes / time / copy bandwidth.", "",
             "| format | K | N | M | chosen us | % copy | best us | best config | bf16 us | Triton GEMM us | x bf16 | x Triton GEMM "
             "| CUDA kernel us (rule) | % copy | x bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        d, b, p = c["default"] or {}, c["best"] or {}, c["peers_us"]
        t = d.get("time_us")
        bf = p.get("bf16 F.linear")
        prev = p.get("triton GEMM")
        lines.append(f"| {c['format']} | {c['k']} | {c['n']} | {c['m']} | {t:.1f} | {d.get('of_copy', 0):.0%} | "
                     f"{b.get('time_us', float('nan')):.1f} | {b.get('config', '')} | {bf:.1f} | "
                     f"{prev if prev is None else round(prev, 1)} | {bf / t:.2f} | {'' if prev is None else f'{prev / t:.2f}'} |"
                     + _cuda_cells(c, bf, result["copy_bytes_per_s"])
                     if t else f"| {c['format']} | {c['k']} | {c['n']} | {c['m']} | failed | | | | | | | |")
    path.write_text("\n".join(lines) + "\n")


def _cuda_us(case: dict):
    """Our CUDA kernel's name, the row tiles its rule picks and its us with them (None: not timed)."""
    rt = case.get("cuda_row_tiles")
    name = case.get("cuda_kernel", "cuda_w4a16")
    return name, rt, case["peers_us"].get(f"{name} r{rt}") if rt else None


def _cuda_cells(case: dict, bf16_us: float, copy_bw: float) -> str:
    """Our CUDA kernel's cells: its time with the row tiles its rule picks, % of copy, x bf16."""
    name, rt, t = _cuda_us(case)
    if t is None:
        return "  |  |  |"
    return f" {name} {t:.1f} (r{rt}) | {case['weight_bytes'] / (t * 1e-6) / copy_bw:.0%} | {bf16_us / t:.2f} |"


def plot_decode(result: dict, path: Path) -> bool:
    """A bar per case: our CUDA kernel's weight bytes per second (its rule's row tiles) as % of the
    measured copy bandwidth; False without matplotlib or such cases."""
    labels, values = [], []
    for c in result["cases"]:
        _, _, t = _cuda_us(c)
        if t:
            labels.append(f"{c['format']} {c['k']}x{c['n']} M={c['m']}")
            values.append(100 * c["weight_bytes"] / (t * 1e-6) / result["copy_bytes_per_s"])
    return barh_png(path, labels, values, "% of the copy bandwidth (weight bytes / time)",
                    f"Decode kernels (the rule's tiles), {result['device']}, copy "
                    f"{result['copy_bytes_per_s'] / 1e12:.2f} TB/s read + write")


if __name__ == "__main__":
    sys.exit(main())
