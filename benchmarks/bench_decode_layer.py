#!/usr/bin/env python3
"""Where a batch-1 decode step's w4a16 linear time goes: the four launches of a Llama-3-8B-shaped
layer (q/k/v with its RMSNorm, o_proj with its residual add, gate/up with its RMSNorm, down_proj
with SwiGLU and its residual add), as the compiled model calls ``cuda_w4a16``, timed

* ``sequence``: the four calls of each of --layers layers (distinct weights, so they stream from
  HBM as in the model) one after another in one CUDA graph, as a step runs them (less attention);
* ``alone``: each call on its own, the --layers copies of it back to back in one graph;
* ``plain``: the same without its prologue and residual (what the fusions cost);
* ``merged``: o_proj, gate and up as one launch of three segments on one activation (not the
  layer's arithmetic: o_proj's output feeds gate/up), against o_proj and gate/up launched apart,
  both plain: the most that putting two launches into one can save;

and, under ``torch.profiler``, each kernel's device time inside one replay of the sequence.  Microseconds per
layer; the bytes are the weights with their scales.  Writes ``bench_decode_layer.json``,
``bench_decode_layer.png`` and ``bench_decode_layer.log`` to --out.

Instead of that, ``--set NAME`` builds the kernel variants of ``bench_cuda_ring.py``'s set NAME
(tuning defines, and the calls' programmatic dependent launch) and times the fused sequence and each
fused call alone with each; ``--configs`` times the fused sequence and q/k/v or gate/up alone with
those two calls in other row tiles / warps (``CONFIGS``).  Two rounds each, the variants interleaved.

    python benchmarks/bench_decode_layer.py --out /tmp/layer
    python benchmarks/bench_decode_layer.py --out /tmp/layer --set trigger
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_decode import barh_png, captured_graph, copy_bandwidth, graph_time, tee  # noqa: E402
from qlinear_pass.kernels import cuda_w4a16 as CW  # noqa: E402

HIDDEN, INTER, Q, KV = 4096, 14336, 4096, 1024
GROUP = 128
EPS = 1e-5


def int4_layer(n: int, k: int, gen: torch.Generator) -> CW.Layer:
    """Random int4 weights in the kernel's layout with scales small enough to keep outputs finite
    (timed, not checked: the kernel's tests check it against the reference)."""
    w = torch.randint(0, 256, (n // 16, k // 16, 128), dtype=torch.uint8, generator=gen, device="cuda")
    s = torch.rand((n, k // GROUP), generator=gen, device="cuda") * 2e-3 + 1e-3
    return CW.Layer(w, s)


class DecoderLinears:
    """One layer's w4a16 linears (q/k/v, o_proj, gate/up, down_proj)."""

    def __init__(self, gen: torch.Generator):
        self.qkv = [int4_layer(n, HIDDEN, gen) for n in (Q, KV, KV)]
        self.o = int4_layer(HIDDEN, Q, gen)
        self.gate_up = [int4_layer(INTER, HIDDEN, gen) for _ in range(2)]
        self.down = int4_layer(HIDDEN, INTER, gen)

    def bytes(self) -> dict:
        def b(layers):
            return sum(t.w.numel() + t.s.numel() * 4 for t in layers)

        return {"qkv": b(self.qkv), "o_proj": b([self.o]), "gate_up": b(self.gate_up), "down": b([self.down])}


class Activations:
    """What the calls read besides weights: the layer input, attention's output, the two norms'
    weights, SwiGLU's gate and up halves (one token, bf16)."""

    def __init__(self, gen: torch.Generator):
        def t(*shape):
            return torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16)

        self.x, self.attn = t(1, HIDDEN), t(1, Q)
        self.norm1, self.norm2 = (t(HIDDEN) * 0.1 + 1.0), (t(HIDDEN) * 0.1 + 1.0)
        self.gate, self.up = t(1, INTER), t(1, INTER)


CALLS = ("qkv", "o_proj", "gate_up", "down")
#: --configs: (call, row_tiles, warps) a sequence of fused calls is timed with besides the kernel's
#: rules (None, None): q/k/v and gate/up, the calls whose RMSNorm every CTA computes on the whole row
CONFIGS = (("qkv", 2, 8), ("qkv", 2, 4), ("qkv", 1, 8), ("qkv", 1, 4),
           ("gate_up", 2, 8), ("gate_up", 1, 4))


def calls(lin: DecoderLinears, a: Activations, fused: bool, pdl=None, config: dict = None) -> dict:
    """name -> a function running that call of ``lin`` (fused as the compiled model runs it, or
    plain; ``pdl``: the kernel's programmatic dependent launch, None its default rule; ``config``:
    name -> (row_tiles, warps) for the calls not left to the kernel's rules)."""
    config = config or {}

    def g(name, *args, **kw):
        row_tiles, warps = config.get(name, (None, None))
        return CW.w4a16_decode_group(*args, row_tiles=row_tiles, warps=warps, pdl=pdl, **kw)

    if fused:
        return {
            "qkv": lambda: g("qkv", a.x, lin.qkv, GROUP, prologue="rmsnorm", norm_weight=a.norm1, eps=EPS),
            "o_proj": lambda: g("o_proj", a.attn, [lin.o], GROUP, residuals=[a.x]),
            "gate_up": lambda: g("gate_up", a.x, lin.gate_up, GROUP, prologue="rmsnorm", norm_weight=a.norm2, eps=EPS),
            "down": lambda: g("down", a.gate, [lin.down], GROUP, prologue="silu_mul", x2=a.up, residuals=[a.x]),
        }
    return {
        "qkv": lambda: g("qkv", a.x, lin.qkv, GROUP),
        "o_proj": lambda: g("o_proj", a.attn, [lin.o], GROUP),
        "gate_up": lambda: g("gate_up", a.x, lin.gate_up, GROUP),
        "down": lambda: g("down", a.gate, [lin.down], GROUP),
    }


def sequence(layer_calls: dict, names=CALLS):
    def run():
        for name in names:
            layer_calls[name]()

    return run


def time_us(runs) -> float:
    """Median us per run of ``runs`` (a list of functions), each replayed twice in one CUDA graph."""
    return graph_time(runs, reps_target=2 * len(runs)) * 1e6


def decoder_layers(layers: int, say):
    """``layers`` layers' linears of distinct weights (seed 0, progress said every 8) and the activations."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    lins = []
    for i in range(layers):
        lins.append(DecoderLinears(gen))
        if (i + 1) % 8 == 0:
            say(f"  weights of {i + 1} / {layers} layers made")
    return lins, Activations(gen)


def profile_kernels(runs, say) -> dict:
    """Mean device us per launch of each kernel over a replay of one CUDA graph of ``runs``."""
    from torch.profiler import ProfilerActivity, profile

    graph = captured_graph(runs, len(runs))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    times: dict = {}
    for e in prof.events():
        if e.device_type.name == "CUDA" and "w4a16_kernel" in e.name:
            times.setdefault(e.name, []).append(e.device_time_total)
    res = {}
    for name, ts in times.items():
        res[name] = {"launches": len(ts), "mean_us": statistics.mean(ts), "median_us": statistics.median(ts)}
        say(f"  {len(ts):4d} x {statistics.mean(ts):7.2f} us  {name[:110]}")
    return res


def time_variants(lins, a, set_name: str, say, rounds: int = 2) -> dict:
    """us of the fused sequence and of each fused call alone (``CALLS``), built as each variant of
    ``bench_cuda_ring.SETS[set_name]`` (its ``config``: call -> (row_tiles, warps), as :func:`calls`
    takes it): variant -> what -> one value a round.  Each variant's outputs are checked against the
    first variant's before the timing."""
    import tempfile

    from bench_cuda_ring import SETS, build_all

    variants = SETS[set_name]
    with tempfile.TemporaryDirectory(prefix="qlp_layer_") as tmp:
        say(f"building {len(variants)} variants of set {set_name!r} ...")
        libs = build_all(variants, Path(tmp))
    fused = {n: [calls(lin, a, True, pdl=variants[n].get("pdl"), config=variants[n].get("config")) for lin in lins]
             for n in variants}
    original, res = CW._library, {}
    try:
        # every variant computes what the first does (the first layer's calls, fp32 sums in another order)
        outs = {}
        for n, lib in libs.items():
            CW._library = lambda device, lib=lib: lib
            outs[n] = {what: [o.float() for o in fused[n][0][what]()] for what in CALLS}
        first = next(iter(outs))
        for n in outs:
            err = max(((o - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()
                      for what in CALLS for o, r in zip(outs[n][what], outs[first][what]))
            say(f"  {n}: largest difference from {first} {err:.2e} of the output's largest value")
            if not err < 2e-2:
                raise RuntimeError(f"variant {n} disagrees with {first}: {err:.2e}")
        for r in range(rounds):
            for what in ("sequence", *CALLS):
                for n, lib in libs.items():
                    CW._library = lambda device, lib=lib: lib
                    runs = [sequence(c) for c in fused[n]] if what == "sequence" else [c[what] for c in fused[n]]
                    res.setdefault(n, {}).setdefault(what, []).append(time_us(runs))
            for n in libs:
                say(f"round {r} {n:10s} " + "  ".join(f"{w} {res[n][w][-1]:6.2f}" for w in res[n]))
    finally:
        CW._library = original
    return {"set": set_name, "variants": variants, "us": res}


def time_configs(lins, a, say, rounds: int = 2) -> dict:
    """us of the fused sequence and of the call alone, for the kernel's rules and each of ``CONFIGS``:
    "call row_tiles/warps" -> [(alone, sequence)] one a round."""
    res: dict = {}
    for r in range(rounds):
        for name, row_tiles, warps in (("qkv", None, None), ("gate_up", None, None), *CONFIGS):
            key = f"{name} {'rule' if row_tiles is None else f'{row_tiles}x16 rows, {warps} warps'}"
            cs = [calls(lin, a, True, config={name: (row_tiles, warps)}) for lin in lins]
            alone = time_us([c[name] for c in cs])
            seq = time_us([sequence(c) for c in cs])
            res.setdefault(key, []).append((alone, seq))
            say(f"round {r} {key:32s} alone {alone:6.2f}  sequence {seq:6.2f}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "decode_layer"))
    ap.add_argument("--layers", type=int, default=32, help="layers of distinct weights (default: 32, as Llama-3-8B)")
    ap.add_argument("--set", default=None, help="time the variants of this bench_cuda_ring.py set instead")
    ap.add_argument("--configs", action="store_true", help="time q/k/v and gate/up in other tiles / warps instead")
    args = ap.parse_args(argv)
    if args.set is not None:
        from bench_cuda_ring import SETS

        if args.set not in SETS:
            ap.error(f"--set: no set {args.set!r} (there are {', '.join(sorted(SETS))})")
        if any("warps" in d or "row_tiles" in d for d in SETS[args.set].values()):
            ap.error(f"--set {args.set}: its variants set every call's warps or row tiles; time it with "
                     f"bench_cuda_ring.py --set {args.set} (here a variant sets a call's through its config)")
    if not torch.cuda.is_available():
        print("bench_decode_layer.py times CUDA kernels: no GPU here", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = tee(out / "bench_decode_layer.log")
    card = torch.cuda.get_device_name()
    say(f"{card}, torch {torch.__version__}; {args.layers} layers, M = 1, w4a16 g{GROUP}; us per layer")
    lins, a = decoder_layers(args.layers, say)
    if args.set is not None or args.configs:
        res = {"card": card, "torch": torch.__version__, "machine": platform.node(), "layers": args.layers}
        if args.set is not None:
            res["variants"] = time_variants(lins, a, args.set, say)
        else:
            res["configs"] = time_configs(lins, a, say)
        (out / "bench_decode_layer.json").write_text(json.dumps(res, indent=1))
        return 0
    CW.w4a16_decode_group(a.x, lins[0].qkv, GROUP)  # builds or loads the library
    bw = copy_bandwidth()
    nbytes = lins[0].bytes()
    say(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write); weight bytes a layer: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in nbytes.items()))
    res: dict = {"card": card, "torch": torch.__version__, "machine": platform.node(), "layers": args.layers,
                 "copy_bw": bw, "bytes": nbytes, "us": {}}
    fused = [calls(lin, a, True) for lin in lins]
    plain = [calls(lin, a, False) for lin in lins]

    def record(key: str, us: float, nbytes_: float = 0.0) -> None:
        res["us"][key] = us
        rate = f"  {nbytes_ / us / 1e6:.2f} TB/s" if nbytes_ else ""
        say(f"{key:28s} {us:8.2f}{rate}")

    total = sum(nbytes.values())
    record("sequence fused", time_us([sequence(c) for c in fused]), total)
    record("sequence plain", time_us([sequence(c) for c in plain]), total)
    for name in CALLS:
        record(f"alone fused {name}", time_us([c[name] for c in fused]), nbytes[name])
        record(f"alone plain {name}", time_us([c[name] for c in plain]), nbytes[name])
    g = CW.w4a16_decode_group
    merged = [(lambda lin: lambda: g(a.x, [lin.o, *lin.gate_up], GROUP))(lin) for lin in lins]
    record("merged o_proj+gate/up", time_us(merged), nbytes["o_proj"] + nbytes["gate_up"])
    record("apart o_proj, gate/up", time_us([sequence(c, ("o_proj", "gate_up")) for c in plain]),
           nbytes["o_proj"] + nbytes["gate_up"])
    say("kernels inside the fused sequence (torch.profiler, one graph replay):")
    res["profile_fused_sequence"] = profile_kernels([sequence(c) for c in fused], say)
    (out / "bench_decode_layer.json").write_text(json.dumps(res, indent=1))
    if plot(res, out / "bench_decode_layer.png"):
        say(f"wrote {out / 'bench_decode_layer.png'}")
    return 0


def plot(res: dict, path: Path) -> bool:
    """A bar per timing of ``res["us"]`` (us per layer), the card in the title; False without matplotlib."""
    return barh_png(path, list(res["us"]), list(res["us"].values()), "us per layer",
                    f"w4a16 g{GROUP} decode layer at M = 1, {res['layers']} layers, {res['card']}")


if __name__ == "__main__":
    sys.exit(main())
