#!/usr/bin/env python3
"""Decode attention alone: bench_e2e.py's attention against the fused ones PyTorch offers.

``bench_e2e.py`` decodes through two batched matmuls and a float32 softmax over the whole static
cache (:func:`bench_e2e.decode_attention`).  This times that path beside SDPA under the same mask
and ``flex_attention`` (the mask as a ``score_mod``, grouped-query, compiled by Inductor into its
split-KV decoding kernel; "flex autotune" lets Inductor pick among its kernel configurations) on
Llama-3-8B's attention (32 query heads, 8 KV heads of 128), batch 1 and 8, one query token at
position ``--position`` of a cache of ``--slots`` slots, ``--layers`` layers of distinct caches
(past L2).  Each path is compiled alone, its calls over the layers replayed in one CUDA graph.
Reports us per layer, the KV-cache bytes a layer reads over that time, the kernels one call
launches and the largest error against float32 SDPA on the repeated KV heads.

Writes ``bench_decode_attention.json``, ``summary.md`` and ``bench_decode_attention.png`` to --out
(default ``benchmarks/results/<card>/decode_attention``).  ``--device cpu`` runs small shapes
eagerly, anywhere: the same paths checked against the reference, no timing.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import decode_attention, grouped_mask, sdpa_decode_attention  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _grouped(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``fn`` (bench_e2e's form) with each KV head's query heads folded into rows, under its mask:
    q [B, H, 1, D], caches [B, KV, S, D] -> [B, H, 1, D]."""
    b, h, _, d = q.shape
    rep = h // k.shape[1]
    mask = grouped_mask(rep, torch.arange(k.shape[2], device=q.device), pos)
    return fn(q.reshape(b, k.shape[1], rep, d), k, v, mask).reshape(b, h, 1, d)


def matmul_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """bench_e2e.py's decode attention."""
    return _grouped(decode_attention, q, k, v, pos)


def sdpa_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the same grouped query rows and mask."""
    return _grouped(sdpa_decode_attention, q, k, v, pos)


def flex_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``flex_attention`` over the whole cache, slots past the position masked by a score_mod."""
    from torch.nn.attention.flex_attention import flex_attention

    def mask_after(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx <= pos[q_idx], score, -float("inf"))

    return flex_attention(q, k, v, score_mod=mask_after, enable_gqa=True)


#: name -> (function, torch.compile keyword arguments on a GPU)
PATHS: dict[str, tuple[Callable, dict]] = {
    "matmul (bench_e2e)": (matmul_path, {}),
    "sdpa": (sdpa_path, {}),
    "flex": (flex_path, {}),
    "flex autotune": (flex_path, {"mode": "max-autotune-no-cudagraphs"}),
}


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """float32 SDPA with each KV head repeated for its query heads."""
    rep = q.shape[1] // k.shape[1]
    m = torch.arange(k.shape[2], device=q.device)[None, :] <= pos[:, None]
    kk, vv = (t.float().repeat_interleave(rep, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=m[None, None])


def make_inputs(batch: int, layers: int, heads: int, kv_heads: int, slots: int, head_dim: int, position: int,
                device: str, dtype: torch.dtype, seed: int = 0):
    """(q [B, H, 1, D], [(k, v) caches [B, KV, S, D] of each layer], pos [1])."""
    if not 0 <= position < slots:
        raise ValueError(f"--position must be in [0, --slots): {position} for {slots} slots")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of the KV heads ({kv_heads})")
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    q = rnd(batch, heads, 1, head_dim)
    caches = [(rnd(batch, kv_heads, slots, head_dim), rnd(batch, kv_heads, slots, head_dim)) for _ in range(layers)]
    return q, caches, torch.tensor([position], device=device)


def kernels_of(fn: Callable) -> list:
    """[(kernel name, device us)] of one call of ``fn`` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [(e.key, round(e.device_time_total, 2)) for e in prof.key_averages() if e.device_time_total > 0]


def run_path(name: str, q, caches, pos, cuda: bool, say) -> dict:
    """One path: its error against the reference and, on a GPU, its compile seconds, us per layer
    (its calls over every layer in one CUDA graph) and kernels."""
    fn, options = PATHS[name]
    ref = reference(q, *caches[0], pos)
    out: dict = {}
    if cuda:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        fn = torch.compile(fn, dynamic=False, **options)
        first = fn(q, *caches[0], pos)
        torch.cuda.synchronize()
        out["compile_s"] = time.perf_counter() - t0
    else:
        first = fn(q, *caches[0], pos)
    out["max_abs_err"] = (first.float() - ref).abs().max().item()
    out["ref_max_abs"] = ref.abs().max().item()
    if cuda:
        from bench_decode import graph_time

        calls = [(lambda kv: lambda: fn(q, *kv, pos))(kv) for kv in caches]
        out["us_per_layer"] = graph_time(calls, reps_target=2 * len(calls), replays=7) * 1e6
        kv_bytes = sum(t.numel() * t.element_size() for t in caches[0])
        out["kv_bytes"] = kv_bytes
        out["kv_tb_s"] = kv_bytes / out["us_per_layer"] / 1e6
        out["kernels"] = kernels_of(lambda: fn(q, *caches[1 % len(caches)], pos))
        say(f"  {name:20s} {out['us_per_layer']:8.2f} us a layer  {out['kv_tb_s']:5.2f} TB/s of KV cache  "
            f"max err {out['max_abs_err']:.2e}  {len(out['kernels'])} kernels  (compile {out['compile_s']:.1f} s)")
    else:
        say(f"  {name:20s} max err {out['max_abs_err']:.2e} (reference max {out['ref_max_abs']:.2f})")
    return out


def summary_md(res: dict) -> str:
    lines = [f"# Decode attention alone ({res['card']}, torch {res['torch']})", "",
             f"{res['heads']} query heads, {res['kv_heads']} KV heads of {res['head_dim']}, a cache of {res['slots']} slots, "
             f"the query at position {res['position']}, {res['layers']} layers of distinct caches; "
             "us per layer (calls over the layers in one CUDA graph), the KV cache bytes a layer reads over that "
             "time, kernels one call launches, largest error against float32 SDPA.", "",
             "| batch | path | us a layer | KV TB/s | kernels | max abs err |", "|---:|---|---:|---:|---:|---:|"]
    for b, paths in res["batches"].items():
        for name, r in paths.items():
            if "error" in r:
                lines.append(f"| {b} | {name} | failed: {r['error'][:80]} | | | |")
            elif "us_per_layer" in r:
                lines.append(f"| {b} | {name} | {r['us_per_layer']:.2f} | {r['kv_tb_s']:.2f} | {len(r['kernels'])} | "
                             f"{r['max_abs_err']:.1e} |")
            else:
                lines.append(f"| {b} | {name} | - | - | - | {r['max_abs_err']:.1e} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> bool:
    """Bars of us per layer, path by batch; False without matplotlib or timings."""
    from bench_decode import barh_png

    rows = [(f"b{b} {name}", r["us_per_layer"]) for b, paths in res["batches"].items()
            for name, r in paths.items() if "us_per_layer" in r]
    return barh_png(path, [n for n, _ in rows], [u for _, u in rows], "us per layer",
                    f"decode attention, {res['slots']} cache slots, {res['card']}")


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: benchmarks/results/<card>/decode_attention)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda if available")
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="comma-separated (default: 1,8)")
    ap.add_argument("--layers", type=int, default=None, help="layers of distinct caches (default: 32; CPU 2)")
    ap.add_argument("--slots", type=int, default=None,
                    help="cache slots a layer (default: 2176, bench_e2e.py --quick's cache; CPU 64)")
    ap.add_argument("--position", type=int, default=None,
                    help="the query's position (default: 2060; CPU 40)")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated (default: all)")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU here")
    cuda = device == "cuda"
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        ap.error(f"--paths: unknown {', '.join(unknown)} (there are {', '.join(PATHS)})")
    heads, kv_heads, head_dim = (32, 8, 128) if cuda else (8, 2, 32)
    layers = args.layers if args.layers is not None else (32 if cuda else 2)
    slots = args.slots if args.slots is not None else (2176 if cuda else 64)
    position = args.position if args.position is not None else (2060 if cuda else 40)
    batches = args.batch_sizes or [1, 8]
    if layers < 1 or any(b < 1 for b in batches):
        ap.error("--layers and --batch-sizes must be >= 1")
    if not 0 <= position < slots:
        ap.error(f"--position must be in [0, --slots): {position} for {slots} slots")
    card = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    out = args.out or REPO / "benchmarks" / "results" / ("h200" if "H200" in card else "h100" if "H100" in card
                                                         else "cpu") / "decode_attention"
    out.mkdir(parents=True, exist_ok=True)
    res = {"card": card, "torch": torch.__version__, "machine": platform.node(), "heads": heads, "kv_heads": kv_heads,
           "head_dim": head_dim, "slots": slots, "position": position, "layers": layers, "batches": {}}
    say = print
    say(f"{card}: decode attention, {heads} / {kv_heads} heads of {head_dim}, {slots} slots, position {position}, "
        f"{layers} layers")
    dtype = torch.bfloat16
    for b in batches:
        say(f"batch {b}:")
        q, caches, pos = make_inputs(b, layers, heads, kv_heads, slots, head_dim, position, device, dtype)
        res["batches"][str(b)] = {}
        for name in paths:
            try:
                res["batches"][str(b)][name] = run_path(name, q, caches, pos, cuda, say)
            except Exception as exc:  # recorded, the other paths still run
                res["batches"][str(b)][name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                say(f"  {name:20s} failed: {type(exc).__name__}: {str(exc)[:200]}")
            (out / "bench_decode_attention.json").write_text(json.dumps(res, indent=1))
        del q, caches
    (out / "summary.md").write_text(summary_md(res))
    if plot(res, out / "bench_decode_attention.png"):
        say(f"wrote {out / 'bench_decode_attention.png'}")
    say(f"wrote {out / 'bench_decode_attention.json'} and summary.md")
    failed = [f"b{b} {n}" for b, ps in res["batches"].items() for n, r in ps.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
