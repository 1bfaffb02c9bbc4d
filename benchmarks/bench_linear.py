#!/usr/bin/env python3
"""Time qlinear_pass's kernels against their peers on the linear shapes of Llama-3-8B.

For every scheme, shape (K x N) and M this times, in one run and on the same data:

* our kernels: every registered kernel of the scheme that runs behind the custom op
  (``opaque``), is supported on this device and can implement the layer; W8A8 schemes
  in two variants, ``dynamic`` (bf16 activation in, the kernel quantizes it) and
  ``static`` (already-quantized activation and its scale in);
* peers: bf16 ``F.linear``; ``torch._scaled_mm`` (fp8_tensor, fp8_rowwise) with the
  activation already quantized and with eager quantization in front; ``torch._int_mm``
  with an eager epilogue (int8_rowwise, M > 16); tinygemm and gemlite (w4a16).

Each measurement captures one CUDA graph that calls the kernel R times, cycling over
enough copies of the weights that they do not fit in L2, and reports the median replay
time / R.  Writes ``bench_linear.json``, ``bench_linear.png`` and ``summary.md`` to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from qlinear_pass import registry  # noqa: E402
from qlinear_pass import schemes as S  # noqa: E402
from qlinear_pass.config import SCHEMES, normalize_scheme  # noqa: E402
from qlinear_pass.registry import DeviceInfo, LayerSpec  # noqa: E402

#: (K, N) of the linears of Llama-3-8B: qkv, o, gate+up, down
LLAMA3_8B_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
MS = [1, 16, 128, 1024, 4096]
DRY_SHAPES = [(256, 512), (512, 256)]
DRY_MS = [1, 16, 32]
#: the shape plotted and summarised when it was measured
FOCUS_SHAPE = (4096, 28672)

W8A8 = ("fp8_tensor", "fp8_rowwise", "fp8_block", "int8_rowwise")
GROUP_SIZE = 128
OUT_DTYPE = torch.bfloat16

L2_BYTES = 50e6
MAX_COPIES = 64
COPY_MEMORY_BYTES = 20e9


# --- settings --------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    device: str
    graphs: bool
    dry_run: bool
    #: wall time a CUDA graph replay should take, and the replay count bounds
    replay_target_s: float
    min_replays: int
    max_replays: int
    #: eager calls per measurement when a graph cannot be used
    event_iters: int
    deadline: float
    start: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def log(msg: str) -> None:
    print(msg, flush=True)


# --- (a) inputs ------------------------------------------------------------------------


@dataclasses.dataclass
class Weights:
    """One scheme's weights for one shape: the bf16 original and its canonical quantized params."""

    scheme: str
    k: int
    n: int
    w: torch.Tensor
    params: list  # ordered as schemes.get_scheme(scheme).param_names


@dataclasses.dataclass
class Activation:
    """One M's activation: bf16, and for W8A8 schemes its quantized form and scale."""

    m: int
    x: torch.Tensor
    xq: Optional[torch.Tensor] = None
    xs: Optional[torch.Tensor] = None


def make_weights(scheme: str, k: int, n: int, device: str) -> Weights:
    w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
    q = S.quantize_weight(scheme, w, group_size=GROUP_SIZE)
    params = [q.get(name) for name in S.get_scheme(scheme).param_names]
    return Weights(scheme, k, n, w, params)


def make_activation(scheme: str, m: int, k: int, device: str) -> Activation:
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    if scheme not in W8A8:
        return Activation(m, x)
    xq, xs = S.quantize_activation(scheme, x)
    return Activation(m, x, xq, xs)


def nbytes(tensors: Sequence[Optional[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def clone_all(tensors: Sequence[Optional[torch.Tensor]]) -> list:
    return [None if t is None else t.clone() for t in tensors]


def n_copies(weight_bytes: int, dry_run: bool) -> int:
    """Weight copies to cycle over: together more than 2x L2, at most 64, within the memory budget."""
    if dry_run:
        return 2
    per_copy = max(weight_bytes, 1)
    need = int(2 * L2_BYTES // per_copy) + 1
    fits = max(1, int(COPY_MEMORY_BYTES // per_copy))
    return max(1, min(need, MAX_COPIES, fits))


def layer_spec(scheme: str, k: int, n: int, m: int, variant: str, act_dtype: torch.dtype, device: str) -> LayerSpec:
    return LayerSpec(
        scheme=scheme,
        n=n,
        k=k,
        act_dtype=act_dtype,
        out_dtype=OUT_DTYPE,
        group_size=GROUP_SIZE if scheme == "w4a16" else None,
        act_input=variant,
        device=device,
        weights_constant=True,
        m=m,
    )


# --- (b) the timer ---------------------------------------------------------------------


class Timer:
    """Median time of one call, given one call per weight copy."""

    def __init__(self, settings: Settings):
        self.s = settings

    def time(self, calls: Sequence[Callable[[], object]]) -> dict:
        if self.s.cuda:
            calls[0]()  # compile / autotune / repack
            first = self._events(calls[:1], 1)
            if first > 5e-3:  # a very slow kernel: three timed calls say enough
                return {"time_s": self._events(calls[:1], 3), "timing": "events (slow kernel)"}
        self._warm_up(calls)
        if not self.s.cuda:
            return {"time_s": self._wall(calls), "timing": "wall"}
        if not self.s.graphs:
            return {"time_s": self._events(calls, self.s.event_iters), "timing": "events"}
        estimate = self._events(calls, max(3, min(len(calls), 16)))
        try:
            return self._graph(calls, estimate)
        except Exception as exc:  # capture is not possible for every kernel
            self._sync_quietly()
            return {
                "time_s": self._events(calls, self.s.event_iters),
                "timing": "events",
                "graph_error": _short(exc),
            }

    def _warm_up(self, calls) -> None:
        """Compile, autotune and repack outside any capture: every copy runs twice."""
        if self.s.cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    for call in calls:
                        call()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
        else:
            for call in calls:
                call()

    def _graph(self, calls, estimate_s: float) -> dict:
        n = len(calls)
        rounds = max(1, math.ceil(self.s.replay_target_s / max(estimate_s * n, 1e-9)))
        reps = min(n * rounds, max(n, 4096))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                calls[i % n]()
        graph.replay()
        torch.cuda.synchronize()
        replay_s = max(estimate_s * reps, 1e-6)
        replays = int(min(self.s.max_replays, max(self.s.min_replays, 0.2 // replay_s)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        per_replay = statistics.median(start.elapsed_time(end) for start, end in events) / 1e3
        del graph
        return {"time_s": per_replay / reps, "timing": "graph", "calls_per_replay": reps, "replays": replays}

    def _events(self, calls, iters: int) -> float:
        n = len(calls)
        pairs = []
        for i in range(max(iters, n)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            calls[i % n]()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3

    def _wall(self, calls) -> float:
        times = []
        for i in range(max(self.s.event_iters, len(calls))):
            t0 = time.perf_counter()
            calls[i % len(calls)]()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def _sync_quietly(self) -> None:
        try:
            torch.cuda.synchronize()
        except Exception:
            pass


def measure_ceilings(settings: Settings) -> dict:
    """Device copy bandwidth and dense bf16 / fp8 GEMM rates: the roofline's ceilings."""
    timer = Timer(dataclasses.replace(settings, graphs=False, event_iters=20 if settings.cuda else 3))
    copy_bytes = (16 << 20) if settings.dry_run else (1 << 30)
    size = 256 if settings.dry_run else 8192
    out: dict = {"copy_bytes": copy_bytes, "gemm_size": size}
    probes = (
        ("copy_bytes_per_s", lambda: _copy_rate(timer, settings.device, copy_bytes)),
        ("bf16_flops_per_s", lambda: _bf16_rate(timer, settings.device, size)),
        ("fp8_flops_per_s", lambda: _fp8_rate(timer, settings.device, size)),
    )
    for key, probe in probes:
        try:
            out[key] = probe()
        except Exception as exc:
            out[key.split("_")[0] + "_error"] = _short(exc)
        _free()
    return out


def _copy_rate(timer: Timer, device: str, copy_bytes: int) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * copy_bytes / timer.time([lambda: dst.copy_(src)])["time_s"]


def _bf16_rate(timer: Timer, device: str, size: int) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    return 2.0 * size**3 / timer.time([lambda: torch.mm(a, b)])["time_s"]


def _fp8_rate(timer: Timer, device: str, size: int) -> float:
    a = torch.randn(size, size, device=device).to(S.FP8)
    b = torch.randn(size, size, device=device).to(S.FP8).t()
    one = torch.ones((), device=device)
    call = lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)  # noqa: E731
    return 2.0 * size**3 / timer.time([call])["time_s"]


# --- contestants -----------------------------------------------------------------------


@dataclasses.dataclass
class Contestant:
    """One thing to time: ``make_call()`` builds a fresh weight copy and returns a call on it."""

    name: str
    kind: str  # "ours" or "peer"
    variant: str  # "dynamic", "static" or "none"
    compute: str  # dense rate the roofline uses: "bf16" or "fp8"
    weight_bytes: int
    act_bytes: int
    make_call: Callable[[], Callable[[], object]]


def _compute(scheme: str) -> str:
    return "fp8" if scheme in W8A8 else "bf16"


# --- (c) peers ---------------------------------------------------------------------------


def peers(wt: Weights, act: Activation, settings: Settings, unavailable: dict) -> list[Contestant]:
    scheme, x = wt.scheme, act.x
    out = [_bf16_peer(wt, x)]
    if scheme in ("fp8_tensor", "fp8_rowwise"):
        out += _scaled_mm_peers(wt, act)
    if scheme == "int8_rowwise" and act.m > 16:
        out.append(_int_mm_peer(wt, act))
    if scheme == "w4a16":
        out.append(_tinygemm_peer(wt, x, settings))
        gemlite = _gemlite_peer(wt, x, settings, unavailable)
        if gemlite is not None:
            out.append(gemlite)
    return out


def _bf16_peer(wt: Weights, x: torch.Tensor) -> Contestant:
    def make_call():
        w = wt.w.clone()
        return lambda: F.linear(x, w)

    return Contestant("bf16", "peer", "none", "bf16", nbytes([wt.w]), nbytes([x]), make_call)


def _scaled_mm_scales(scheme: str, xs: torch.Tensor, sw: torch.Tensor):
    if scheme == "fp8_rowwise":
        return xs.float().reshape(-1, 1), sw.float().reshape(1, -1)
    return xs.float().reshape(()), sw.float().reshape(())


def _scaled_mm_peers(wt: Weights, act: Activation) -> list[Contestant]:
    scheme = wt.scheme
    wq, sw = wt.params[0], wt.params[1]
    sa, _ = _scaled_mm_scales(scheme, act.xs, sw)

    def make_static():
        w, s = wq.clone(), sw.clone()
        _, sb = _scaled_mm_scales(scheme, act.xs, s)
        return lambda: torch._scaled_mm(act.xq, w.t(), sa, sb, out_dtype=OUT_DTYPE)

    def make_dynamic():
        w, s = wq.clone(), sw.clone()

        def call():
            xq, xs = S.quantize_activation(scheme, act.x)
            a, b = _scaled_mm_scales(scheme, xs, s)
            return torch._scaled_mm(xq, w.t(), a, b, out_dtype=OUT_DTYPE)

        return call

    wbytes = nbytes([wq, sw])
    return [
        Contestant("scaled_mm", "peer", "static", "fp8", wbytes, nbytes([act.xq, act.xs]), make_static),
        Contestant("eager_quant+scaled_mm", "peer", "dynamic", "fp8", wbytes, nbytes([act.x]), make_dynamic),
    ]


def _int_mm_peer(wt: Weights, act: Activation) -> Contestant:
    wq, sw = wt.params[0], wt.params[1]
    sx = act.xs.float().reshape(-1, 1)

    def make_call():
        w, s = wq.clone(), sw.float().reshape(1, -1).clone()

        def call():
            acc = torch._int_mm(act.xq, w.t())
            return (acc.float() * sx * s).to(OUT_DTYPE)

        return call

    return Contestant("int_mm+epilogue", "peer", "static", "fp8", nbytes([wq, sw]), nbytes([act.xq, act.xs]), make_call)


def _tinygemm_peer(wt: Weights, x: torch.Tensor, settings: Settings) -> Contestant:
    """torch's int4pack (tinygemm) op on weights converted once by TorchInt4Pack.prepack."""
    spec = layer_spec("w4a16", wt.k, wt.n, x.shape[0], "none", torch.bfloat16, settings.device)
    weight, scale, zero = wt.params
    packed, sz = registry.get_kernel("torch_int4pack").prepack(weight, scale, zero, spec)
    op = torch.ops.aten._weight_int4pack_mm if settings.cuda else torch.ops.aten._weight_int4pack_mm_for_cpu

    def make_call():
        p, s = packed.clone(), sz.clone()
        return lambda: op(x, p, GROUP_SIZE, s)

    return Contestant("tinygemm", "peer", "none", "bf16", nbytes([packed, sz]), nbytes([x]), make_call)


def _gemlite_peer(wt: Weights, x: torch.Tensor, settings: Settings, unavailable: dict) -> Optional[Contestant]:
    """gemlite's A16W4 Triton GEMM/GEMV, packed from our unpacked int4 values, scales and zero points.

    gemlite dequantizes as ``(W_q - zeros) * scales`` (HQQ's convention), ours as
    ``(q - z) * s`` with z = 8 for symmetric weights: the same numbers, passed as they are.
    """
    if not settings.cuda:
        unavailable.setdefault("gemlite", "gemlite's kernels need CUDA")
        return None
    try:
        import gemlite
        from gemlite import DType, GemLiteLinear
    except Exception as exc:
        unavailable.setdefault("gemlite", f"import gemlite failed: {_short(exc)}")
        return None
    unavailable.pop("gemlite", None)

    weight, scale, zero = wt.params
    w_q = S.unpack_int4(weight)  # [N, K] uint8, 0..15
    scales = scale.to(torch.bfloat16)  # [N, K/g]
    zeros = (zero.to(torch.bfloat16) if zero is not None else torch.full_like(scales, 8.0))

    def make_call():
        lin = GemLiteLinear(
            4,
            group_size=GROUP_SIZE,
            in_features=wt.k,
            out_features=wt.n,
            input_dtype=DType.BF16,
            output_dtype=DType.BF16,
        )
        lin.pack(w_q, scales, zeros, bias=None)
        return lambda: lin(x)

    name = f"gemlite {getattr(gemlite, '__version__', '')}".strip()
    return Contestant(name, "peer", "none", "bf16", weight.numel() + nbytes([scales, zeros]), nbytes([x]), make_call)


# --- (d) our kernels ---------------------------------------------------------------------


def _variants(scheme: str) -> tuple[str, ...]:
    return ("dynamic", "static") if scheme in W8A8 else ("none",)


def our_kernels(scheme: str, device: DeviceInfo) -> tuple[list, list]:
    """Registered kernels of ``scheme`` to time, and (name, reason) for those left out."""
    chosen, left_out = [], []
    for kernel in registry.kernels().values():
        if scheme not in kernel.schemes or kernel.backend == "emulation":
            continue
        if type(kernel).run is registry.Kernel.run:
            left_out.append((kernel.name, "no run(): it inlines ATen ops into the graph (timed as a peer)"))
            continue
        ok, why = kernel.is_supported(device)
        if ok:
            chosen.append(kernel)
        else:
            left_out.append((kernel.name, why))
    return chosen, left_out


def ours(kernel, wt: Weights, act: Activation, settings: Settings, skipped: list) -> list[Contestant]:
    out = []
    for variant in _variants(wt.scheme):
        if variant == "static":
            x, extra, act_dtype = act.xq, [act.xs], act.xq.dtype
        else:
            x, extra, act_dtype = act.x, [], act.x.dtype
        spec = layer_spec(wt.scheme, wt.k, wt.n, act.m, variant, act_dtype, settings.device)
        ok, why = kernel.can_implement(spec)
        if not ok:
            skipped.append(_skip_row(wt, act.m, kernel.name, variant, why))
            continue

        def make_call(spec=spec, x=x, extra=extra):
            params = clone_all(wt.params) + extra
            return lambda: kernel.run(spec, x, params, None)

        out.append(
            Contestant(
                kernel.name, "ours", variant, _compute(wt.scheme),
                nbytes(wt.params), nbytes([x, *extra]), make_call,
            )
        )
    return out


def _skip_row(wt: Weights, m: int, name: str, variant: str, why: str) -> dict:
    return {"scheme": wt.scheme, "kernel": name, "variant": variant, "K": wt.k, "N": wt.n, "M": m, "reason": why}


# --- measuring -------------------------------------------------------------------------


def measure(c: Contestant, wt: Weights, m: int, timer: Timer, ceilings: dict, settings: Settings) -> dict:
    row = {
        "scheme": wt.scheme, "kernel": c.name, "kind": c.kind, "variant": c.variant,
        "K": wt.k, "N": wt.n, "M": m, "weight_bytes": c.weight_bytes,
    }
    copies = row["copies"] = n_copies(c.weight_bytes, settings.dry_run)
    calls = []
    try:
        calls = [c.make_call() for _ in range(copies)]
        result = timer.time(calls)
    except Exception as exc:
        row["error"] = _short(exc)
        return row
    finally:
        del calls
        _free()
    t = result.pop("time_s")
    flops = 2.0 * m * wt.n * wt.k
    moved = c.weight_bytes + c.act_bytes + m * wt.n * torch.finfo(OUT_DTYPE).bits // 8
    row.update(
        time_us=t * 1e6,
        tflops=flops / t / 1e12,
        gbs=moved / t / 1e9,
        roofline=_roofline(c, flops, t, ceilings),
        **result,
    )
    return row


def _roofline(c: Contestant, flops: float, t: float, ceilings: dict) -> Optional[float]:
    bw = ceilings.get("copy_bytes_per_s")
    rate = ceilings.get(f"{c.compute}_flops_per_s") or ceilings.get("bf16_flops_per_s")
    if not bw or not rate:
        return None
    return max(c.weight_bytes / bw, flops / rate) / t


@dataclasses.dataclass
class Results:
    rows: list = dataclasses.field(default_factory=list)
    #: kernels not timed, with why
    skipped: list = dataclasses.field(default_factory=list)
    #: peers absent from this machine, with why
    unavailable: dict = dataclasses.field(default_factory=dict)
    stopped: Optional[str] = None

    def error(self, scheme: str, k: int, n: int, m: Optional[int], name: str, kind: str, exc: BaseException) -> None:
        row = {"scheme": scheme, "kernel": name, "kind": kind, "variant": "-", "K": k, "N": n, "M": m, "error": _short(exc)}
        self.rows.append(row)
        log(f"{scheme} {k}x{n} M={m} {name}: ERROR {row['error']}")


def contestants(wt: Weights, m: int, kernels: list, settings: Settings, res: Results) -> list[Contestant]:
    try:
        act = make_activation(wt.scheme, m, wt.k, settings.device)
    except Exception as exc:
        res.error(wt.scheme, wt.k, wt.n, m, "(activation)", "-", exc)
        return []
    out = []
    for kernel in kernels:
        try:
            out += ours(kernel, wt, act, settings, res.skipped)
        except Exception as exc:
            res.error(wt.scheme, wt.k, wt.n, m, kernel.name, "ours", exc)
    try:
        out += peers(wt, act, settings, res.unavailable)
    except Exception as exc:
        res.error(wt.scheme, wt.k, wt.n, m, "(peers)", "peer", exc)
    return out


def bench_layer(scheme: str, k: int, n: int, ms: list, timer: Timer, ceilings: dict, settings: Settings, res: Results) -> None:
    """Every contestant of one scheme and shape, for every M."""
    kernels, left_out = our_kernels(scheme, DeviceInfo.of(settings.device))
    for name, why in left_out:
        entry = {"scheme": scheme, "kernel": name, "reason": why}
        if entry not in res.skipped:
            res.skipped.append(entry)
    try:
        wt = make_weights(scheme, k, n, settings.device)
    except Exception as exc:
        res.error(scheme, k, n, None, "(weights)", "-", exc)
        return
    for m in ms:
        for c in contestants(wt, m, kernels, settings, res):
            if settings.out_of_time():
                res.stopped = f"time budget reached before {scheme} {k}x{n} M={m} {c.name} ({c.variant})"
                return
            row = measure(c, wt, m, timer, ceilings, settings)
            res.rows.append(row)
            log(_progress(row, settings))


def run(settings: Settings, scheme_names: list, shapes: list, ms: list, out_dir: Path) -> None:
    log(f"device: {DeviceInfo.of(settings.device)}; torch {torch.__version__}; triton {_triton_version()}")
    ceilings = measure_ceilings(settings)
    log("ceilings: " + _describe_ceilings(ceilings))

    timer = Timer(settings)
    res = Results()
    order = sorted(shapes, key=lambda s: s != FOCUS_SHAPE)  # the summarised shape first
    for k, n in order:
        for scheme in scheme_names:
            bench_layer(scheme, k, n, ms, timer, ceilings, settings, res)
            _free()
            write_json(out_dir, settings, ceilings, res)
            if res.stopped:
                break
        if res.stopped:
            break

    if res.stopped:
        log(f"stopped early: {res.stopped}")
    rows = res.rows
    add_ratios(rows)
    write_json(out_dir, settings, ceilings, res)
    focus = FOCUS_SHAPE if FOCUS_SHAPE in shapes else shapes[0]
    written = [out_dir / "bench_linear.json", out_dir / "summary.md"]
    if plot(rows, focus, out_dir):
        written.append(out_dir / "bench_linear.png")
    table = summary(rows, focus)
    log("")
    log(table)
    (out_dir / "summary.md").write_text(table + "\n")
    log("wrote " + ", ".join(map(str, written)))


# --- (e) output ------------------------------------------------------------------------


def add_ratios(rows: list) -> None:
    """ratio_vs_best_peer = best peer time / our time, per (scheme, K, N, M); > 1: ours is faster."""
    best: dict = {}
    for r in rows:
        if r.get("kind") == "peer" and "time_us" in r:
            key = (r["scheme"], r["K"], r["N"], r["M"])
            if key not in best or r["time_us"] < best[key][0]:
                best[key] = (r["time_us"], r["kernel"])
    for r in rows:
        if r.get("kind") != "ours" or "time_us" not in r:
            continue
        hit = best.get((r["scheme"], r["K"], r["N"], r["M"]))
        if hit is not None:
            r["best_peer"] = hit[1]
            r["ratio_vs_best_peer"] = hit[0] / r["time_us"]


def write_json(out_dir: Path, settings: Settings, ceilings: dict, res: Results) -> None:
    doc = {
        "machine": torch.cuda.get_device_name() if settings.cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "settings": {
            "device": settings.device, "graphs": settings.graphs, "dry_run": settings.dry_run,
            "replay_target_s": settings.replay_target_s, "replays": [settings.min_replays, settings.max_replays],
            "l2_bytes": L2_BYTES, "max_copies": MAX_COPIES, "group_size": GROUP_SIZE,
        },
        "ceilings": ceilings,
        "stopped_early": res.stopped,
        "unavailable_peers": res.unavailable,
        "skipped": res.skipped,
        "rows": res.rows,
    }
    (out_dir / "bench_linear.json").write_text(json.dumps(doc, indent=1, default=str))


def _label(r: dict) -> str:
    return r["kernel"] if r["variant"] in ("none", "-") else f"{r['kernel']} ({r['variant']})"


def plot(rows: list, shape: tuple, out_dir: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        log(f"plot skipped: {_short(exc)}")
        return False
    k, n = shape
    done = [r for r in rows if "time_us" in r and (r["K"], r["N"]) == (k, n)]
    names = [s for s in SCHEMES if any(r["scheme"] == s for r in done)]
    if not names:
        log("plot skipped: nothing measured for the plotted shape")
        return False
    cols = min(4, len(names))
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.8 * rows_n), squeeze=False)
    for ax, scheme in zip(axes.flat, names):
        lines: dict = {}
        for r in done:
            if r["scheme"] == scheme:
                lines.setdefault((r["kind"], _label(r)), []).append((r["M"], r["tflops"]))
        for (kind, label), pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                    linestyle="-" if kind == "ours" else "--", linewidth=2 if kind == "ours" else 1, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(scheme)
        ax.set_xlabel("M")
        ax.set_ylabel("TFLOP/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"K={k}, N={n} (solid: ours, dashed: peers)")
    fig.tight_layout()
    fig.savefig(out_dir / "bench_linear.png", dpi=110)
    plt.close(fig)
    return True


def summary(rows: list, shape: tuple) -> str:
    k, n = shape
    done = [r for r in rows if "time_us" in r and (r["K"], r["N"]) == (k, n)]
    lines = [
        f"K={k} N={n} (times in us; ratio = best peer / best ours, > 1: ours is faster)",
        "",
        "| scheme | M | best ours | us | best peer | us | ratio |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for scheme in SCHEMES:
        for m in sorted({r["M"] for r in done if r["scheme"] == scheme}):
            here = [r for r in done if r["scheme"] == scheme and r["M"] == m]
            best_ours = min((r for r in here if r["kind"] == "ours"), key=lambda r: r["time_us"], default=None)
            best_peer = min((r for r in here if r["kind"] == "peer"), key=lambda r: r["time_us"], default=None)
            ratio = f"{best_peer['time_us'] / best_ours['time_us']:.2f}" if best_ours and best_peer else "-"
            lines.append(
                f"| {scheme} | {m} | {_label(best_ours) if best_ours else '-'} | {_us(best_ours)} "
                f"| {_label(best_peer) if best_peer else '-'} | {_us(best_peer)} | {ratio} |"
            )
    return "\n".join(lines)


def _us(r: Optional[dict]) -> str:
    return f"{r['time_us']:.1f}" if r else "-"


def _progress(r: dict, settings: Settings) -> str:
    head = f"[{settings.elapsed():6.1f}s] {r['scheme']:<16} {r['K']}x{r['N']:<6} M={str(r['M']):<5} {_label(r):<34}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    roof = f"{r['roofline']:.2f}" if r.get("roofline") is not None else "-"
    return f"{head} {r['time_us']:10.1f} us {r['tflops']:8.2f} TFLOP/s {r['gbs']:8.1f} GB/s roof {roof} ({r['timing']})"


def _describe_ceilings(c: dict) -> str:
    parts = []
    if "copy_bytes_per_s" in c:
        parts.append(f"copy {c['copy_bytes_per_s'] / 1e9:.3g} GB/s")
    for dt in ("bf16", "fp8"):
        if f"{dt}_flops_per_s" in c:
            parts.append(f"{dt} {c[f'{dt}_flops_per_s'] / 1e12:.3g} TFLOP/s")
    errors = [f"{key}: {val[:80]}" for key, val in c.items() if key.endswith("_error")]
    return ", ".join(parts + errors)


# --- helpers -----------------------------------------------------------------------------


def _short(exc: BaseException, limit: int = 600) -> str:
    """One line: the exception's type, and the start and end of its message (where compilers say what failed)."""
    text = " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    if len(text) > limit:
        text = f"{text[: limit // 3]} ... {text[-(2 * limit) // 3:]}"
    return f"{type(exc).__name__}: {text}"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


# --- command line ----------------------------------------------------------------------


def _parse_shapes(text: str) -> list:
    shapes = []
    for item in text.split(","):
        k, n = item.lower().split("x")
        shapes.append((int(k), int(n)))
    return shapes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "h100", help="output folder (default: %(default)s)")
    p.add_argument("--schemes", type=lambda s: [normalize_scheme(x) for x in s.split(",")], default=list(SCHEMES),
                   help="comma-separated schemes (default: all)")
    p.add_argument("--ms", type=lambda s: [int(x) for x in s.split(",")], default=None, help=f"comma-separated M values (default: {MS})")
    p.add_argument("--shapes", type=_parse_shapes, default=None, help="comma-separated KxN (default: Llama-3-8B's four)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, no CUDA graphs: checks that every code path runs (CPU too)")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds after which no new measurement starts (default: %(default)s)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    cuda = torch.cuda.is_available()
    deadline = time.monotonic() + args.time_budget
    if args.dry_run:
        return Settings("cuda" if cuda else "cpu", graphs=False, dry_run=True, replay_target_s=0.0,
                        min_replays=1, max_replays=1, event_iters=3, deadline=deadline)
    if not cuda:
        raise SystemExit("bench_linear.py needs a CUDA device (or --dry-run)")
    if args.quick:
        return Settings("cuda", graphs=True, dry_run=False, replay_target_s=0.002,
                        min_replays=5, max_replays=5, event_iters=20, deadline=deadline)
    return Settings("cuda", graphs=True, dry_run=False, replay_target_s=0.005,
                    min_replays=5, max_replays=20, event_iters=50, deadline=deadline)


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = settings_from(args)
    shapes = args.shapes or (DRY_SHAPES if args.dry_run else LLAMA3_8B_SHAPES)
    ms = args.ms or (DRY_MS if args.dry_run else MS)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    run(settings, args.schemes, shapes, ms, args.out)


if __name__ == "__main__":
    main()
