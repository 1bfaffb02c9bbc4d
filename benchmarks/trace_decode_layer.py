#!/usr/bin/env python3
"""Where the time of a batch-1 decode layer's w4a16 launches goes, CTA by CTA.

``cuda_w4a16`` built with ``QLP_TRACE=1`` has every CTA write the GPU's global timer (ns) when it
starts, when its prologue is done (the activation row loaded, with the RMSNorm or SwiGLU), when its
warp 0 has its first chunk of weights, when it has stored each row tile and when it exits.  The four
launches of each of --layers layers (as ``bench_decode_layer.py`` makes them: distinct weights, so
they stream from HBM) run in one CUDA graph, fused as the compiled model runs them, plain, and fused
with programmatic dependent launch (each kernel's CTAs may start while the one before finishes);
and o_proj's and down_proj's launches alone, back to back.  One replay of each graph is traced.

For each launch: the gap from the last exit of the launch before to its first CTA's start, the
spread of its CTAs' starts, the CTAs' times from their start to the points of the prologue (set up,
first copies issued, the kernel before done, the RMSNorm's scale, prologue done) and to the first
chunk, each tile, the tail (the last exit after the median one), the span (first start to last
exit) and the SM clock; medians over the layers, in us.  ``--define`` builds the traced kernel with
other tuning defines, ``--runs`` picks the graphs.
Writes ``trace_decode_layer.json``, ``trace_decode_layer.png`` (one layer's CTAs on a time line) and
``trace_decode_layer.log`` to --out.

    python benchmarks/trace_decode_layer.py --out /tmp/trace
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

#: the kernel's marks (TRACE_MARKS in w4a16_decode.cu): start, prologue done, first chunk in,
#: tiles 0-7 stored, exit, and inside the prologue: set up, the first slots' copies issued, the
#: kernel before it done (grid_dependency_wait() returned), the RMSNorm's scale known; each a
#: (globaltimer ns, clock64) pair, then two words of what it ran
MARKS = 16
START, PROLOGUE, FIRST, TILE0, EXIT, SETUP, ISSUED, NORM, WAITED = 0, 1, 2, 3, 11, 12, 13, 14, 15
TILE_MARKS = EXIT - TILE0
WORDS = 2 * MARKS + 2
#: the graphs it can trace: the layer's four launches fused as the compiled model makes them,
#: plain, fused with programmatic dependent launch; o_proj's and down_proj's launches alone
RUNS = ("fused", "plain", "early", "o_proj", "down")
SM_ROWS = 256  # TRACE_SMS: the buffer's rows of records, one an SM
PROLOGUES = {0: "", 1: "rmsnorm", 2: "silu_mul"}


def decode(words) -> dict:
    """One CTA's record (WORDS integers) as a dict: ``t`` the marks' timer values in ns (None where
    not written), ``c`` their SM clock counts, ``sm``, ``block``, ``grid``, ``n`` (the first layer's
    N), ``k``, ``nseg``, ``prologue`` and ``ntiles``."""
    if len(words) != WORDS:
        raise ValueError(f"a trace record has {WORDS} words, not {len(words)}")
    t = [words[2 * i] or None for i in range(MARKS)]
    c = [words[2 * i + 1] if words[2 * i] else None for i in range(MARKS)]
    m1, m2 = words[2 * MARKS] & (2**64 - 1), words[2 * MARKS + 1] & (2**64 - 1)
    return {"t": t, "c": c, "sm": m1 & 0xFFFF, "block": (m1 >> 16) & 0xFFFF, "grid": m1 >> 32,
            "n": m2 & 0xFFFFF, "k": (m2 >> 20) & 0xFFFFF, "nseg": (m2 >> 40) & 0xF,
            "prologue": PROLOGUES.get((m2 >> 44) & 0xF, "?"), "ntiles": m2 >> 48}


def call_name(r: dict) -> str:
    """The layer's call a CTA belongs to, from its launch's shape (Llama-3-8B's names where they fit)."""
    if r["nseg"] == 3:
        return "qkv"
    if r["nseg"] == 2:
        return "gate_up"
    return {(4096, 4096): "o_proj", (4096, 14336): "down"}.get((r["n"], r["k"]), f"n{r['n']}_k{r['k']}")


def group_launches(records: list) -> list:
    """The decoded records grouped into launches, in the order they started: a launch is ``grid``
    CTAs of one shape; records of launches that overlap (programmatic dependent launch) are told
    apart by shape.  Raises ValueError where a launch lacks CTAs (a record lost or not finished)."""
    if any(r["t"][START] is None or r["t"][EXIT] is None for r in records):
        raise ValueError("a CTA's record has no start or no exit: the trace buffer was too small or a launch did not finish")
    open_: dict = {}
    done = []
    for r in sorted(records, key=lambda r: r["t"][START]):
        key = (r["n"], r["k"], r["nseg"], r["prologue"], r["grid"])
        open_.setdefault(key, []).append(r)
        if len(open_[key]) == r["grid"]:
            done.append(open_.pop(key))
    if open_:
        left = ", ".join(f"{len(v)} of {k[-1]} CTAs of {call_name(v[0])}" for k, v in open_.items())
        raise ValueError(f"launches with CTAs missing from the trace: {left}")
    return sorted(done, key=lambda cs: min(c["t"][START] for c in cs))


def _us(ns) -> float:
    return ns / 1e3


def launch_stats(ctas: list, prev_exit) -> dict:
    """One launch's times in us (see the module's doc); ``prev_exit``: the last exit of the launch
    before it in ns, or None."""
    t = [c["t"] for c in ctas]
    start = min(x[START] for x in t)
    exits = sorted(x[EXIT] for x in t)
    tiles = []
    for j in range(TILE_MARKS):
        d = [x[TILE0 + j] - (x[TILE0 + j - 1] if j else x[PROLOGUE]) for x in t
             if x[TILE0 + j] is not None and (j == 0 or x[TILE0 + j - 1] is not None)]
        if not d:
            break
        tiles.append(_us(statistics.median(d)))
    first = [x[FIRST] - x[START] for x in t if x[FIRST] is not None]

    def since_start(mark):
        d = [x[mark] - x[START] for x in t if x[mark] is not None]
        return _us(statistics.median(d)) if d else None

    mhz = [(c["c"][EXIT] - c["c"][START]) / (c["t"][EXIT] - c["t"][START]) * 1e3 for c in ctas
           if c["c"][EXIT] is not None and c["t"][EXIT] > c["t"][START]]
    ntiles = [c["ntiles"] for c in ctas]
    return {
        "call": call_name(ctas[0]), "ctas": len(ctas), "tiles_min": min(ntiles), "tiles_max": max(ntiles),
        "gap": None if prev_exit is None else _us(start - prev_exit),
        "start_spread": _us(max(x[START] for x in t) - start),
        "setup": since_start(SETUP), "issued": since_start(ISSUED), "waited": since_start(WAITED), "norm": since_start(NORM),
        "prologue": _us(statistics.median(x[PROLOGUE] - x[START] for x in t)),
        "first_chunk": _us(statistics.median(first)) if first else None,
        "first_chunk_max": _us(max(first)) if first else None,
        "tiles": tiles,
        "tail": _us(exits[-1] - statistics.median(exits)),
        "exit_spread": _us(exits[-1] - exits[0]),
        "span": _us(exits[-1] - start),
        "sm_mhz": statistics.median(mhz) if mhz else None,
    }


def summarize(launches: list) -> dict:
    """Per call name, the median of each launch statistic over its launches (the first launch of
    the trace, which has no launch before it, left out of the gap)."""
    stats, prev = [], None
    for cs in launches:
        stats.append(launch_stats(cs, prev))
        prev = max(c["t"][EXIT] for c in cs)
    out: dict = {}
    for name in dict.fromkeys(s["call"] for s in stats):
        ss = [s for s in stats if s["call"] == name]
        row = {"launches": len(ss), "ctas": ss[0]["ctas"], "tiles": f"{ss[0]['tiles_min']}-{ss[0]['tiles_max']}"}
        for key in ("gap", "start_spread", "setup", "issued", "waited", "norm", "prologue", "first_chunk", "first_chunk_max", "tail", "exit_spread", "span", "sm_mhz"):
            vals = [s[key] for s in ss if s[key] is not None]
            row[key] = statistics.median(vals) if vals else None
        width = max(len(s["tiles"]) for s in ss)
        row["tiles_us"] = [statistics.median(s["tiles"][j] for s in ss if len(s["tiles"]) > j) for j in range(width)]
        out[name] = row
    return {"launches": stats, "by_call": out}


def timer_step(records: list) -> float:
    """The smallest step (ns) between distinct start times: the global timer's resolution, or finer."""
    ts = sorted({r["t"][START] for r in records})
    steps = [b - a for a, b in zip(ts, ts[1:])]
    return float(min(steps)) if steps else 0.0


def table(summary: dict) -> list:
    """The per-call medians as text lines."""
    lines = ["call      CTAs tiles   gap starts  setup issued waited  norm prologue  1st chunk (max)  tiles"
             "                      tail  exits  span   MHz"]
    for name, r in summary["by_call"].items():
        def f(v):
            return "    -" if v is None else f"{v:5.2f}"
        tiles = " ".join(f"{v:5.2f}" for v in r["tiles_us"])
        mhz = "    -" if r["sm_mhz"] is None else f"{r['sm_mhz']:5.0f}"
        lines.append(f"{name:8s} {r['ctas']:5d} {r['tiles']:>5s} {f(r['gap'])} {f(r['start_spread'])} {f(r['setup'])}"
                     f"  {f(r['issued'])}  {f(r['waited'])} {f(r['norm'])}    {f(r['prologue'])}   {f(r['first_chunk'])} ({f(r['first_chunk_max'])})"
                     f"  {tiles:26s} {f(r['tail'])} {f(r['exit_spread'])} {f(r['span'])} {mhz}")
    return lines


def trace_replay(lib, graph, cap: int):
    """The decoded records of one replay of ``graph`` (cap: the most CTAs kept an SM)."""
    import torch

    buf = torch.zeros(SM_ROWS * cap * WORDS, dtype=torch.int64, device="cuda")
    if lib.qlp_w4a16_trace(ctypes.c_void_p(buf.data_ptr()), cap) != WORDS * 1000 + SM_ROWS:
        raise RuntimeError(f"the trace build's records are not {SM_ROWS} rows of {WORDS}-word records (or its buffer could not be set)")
    graph.replay()
    torch.cuda.synchronize()
    lib.qlp_w4a16_trace(None, 0)
    rows = buf.view(SM_ROWS, cap, WORDS).tolist()
    if any(row[-1][0] != 0 for row in rows):
        raise RuntimeError(f"an SM's {cap} trace records filled up; raise their number")
    return [decode(r) for row in rows for r in row if r[0] != 0]


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "trace_decode_layer"))
    ap.add_argument("--layers", type=int, default=32, help="layers of distinct weights (default: 32, as Llama-3-8B)")
    ap.add_argument("--define", action="append", default=[], metavar="QLP_NAME=VALUE",
                    help="build the traced kernel with this tuning define too (repeatable)")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"which graphs to trace (default: all of {', '.join(RUNS)})")
    args = ap.parse_args(argv)
    defines = {"QLP_TRACE": 1}
    for d in args.define:
        key, eq, value = d.partition("=")
        if not key.startswith("QLP_") or not eq or not value:
            ap.error(f"--define takes QLP_NAME=VALUE, not {d!r}")
        defines[key] = value
    runs_wanted = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs_wanted if r not in RUNS]
    if unknown:
        ap.error(f"--runs: no {', '.join(unknown)} (there are {', '.join(RUNS)})")
    if not torch.cuda.is_available():
        print("trace_decode_layer.py traces CUDA kernels: no GPU here", file=sys.stderr)
        return 2
    from bench_cuda_ring import build
    from bench_decode import captured_graph, tee
    from bench_decode_layer import GROUP, calls, decoder_layers, sequence, time_us
    from qlinear_pass.kernels import cuda_w4a16 as CW

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = tee(out / "trace_decode_layer.log")
    card = torch.cuda.get_device_name()
    say(f"{card}, torch {torch.__version__}; {args.layers} layers, M = 1, w4a16 g{GROUP}; us")
    with tempfile.TemporaryDirectory(prefix="qlp_trace_") as tmp:
        say("building cuda_w4a16 with QLP_TRACE=1 ...")
        lib = build("trace", defines, Path(tmp))
    lib.qlp_w4a16_trace.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.qlp_w4a16_trace.restype = ctypes.c_int
    original = CW._library
    CW._library = lambda device: lib
    res: dict = {"card": card, "torch": torch.__version__, "layers": args.layers, "defines": defines, "runs": {}}
    try:
        lins, a = decoder_layers(args.layers, say)
        fused = [calls(lin, a, True) for lin in lins]
        kinds = {
            "fused": lambda: [sequence(c) for c in fused],
            "plain": lambda: [sequence(calls(lin, a, False)) for lin in lins],
            "early": lambda: [sequence(calls(lin, a, True, pdl=True)) for lin in lins],
            "o_proj": lambda: [c["o_proj"] for c in fused],
            "down": lambda: [c["down"] for c in fused],
        }
        for kind in runs_wanted:
            runs = kinds[kind]()
            us = time_us(runs)
            graph = captured_graph(runs, len(runs))
            records = trace_replay(lib, graph, cap=64 * args.layers)
            del graph
            launches = group_launches(records)
            s = summarize(launches)
            s["us_per_run"] = us
            s["timer_step_ns"] = timer_step(records)
            per = len(launches) // args.layers  # launches a run
            mid = launches[per * (args.layers // 2): per * (args.layers // 2) + per]
            s["one_layer"] = [[{"block": c["block"], "sm": c["sm"], "t": c["t"]} for c in cs] for cs in mid]
            res["runs"][kind] = s
            say(f"\n{kind}: {us:.2f} us a run (the traced build, timed untraced in a graph); global timer step "
                f"{s['timer_step_ns']:.0f} ns or finer")
            for line in table(s):
                say(line)
    finally:
        CW._library = original
    (out / "trace_decode_layer.json").write_text(json.dumps(res, indent=1))
    if plot(res, out / "trace_decode_layer.png"):
        say(f"wrote {out / 'trace_decode_layer.png'}")
    return 0


def plot(res: dict, path: Path) -> bool:
    """One run's CTAs (a layer's, or one launch's) of each graph on a time line: a line from start to exit, dots at the prologue's
    end, the first chunk and each tile's store.  False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = list(res["runs"].items())
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 3.2 * len(runs)), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, (kind, s) in zip(axes[:, 0], runs):
        layer = s["one_layer"]
        t0 = min(c["t"][START] for cs in layer for c in cs)
        y = 0
        for li, cs in enumerate(layer):
            for c in sorted(cs, key=lambda c: c["block"]):
                t = [None if v is None else (v - t0) / 1e3 for v in c["t"]]
                ax.plot([t[START], t[EXIT]], [y, y], color=colors[li % 4], lw=0.4)
                ax.plot([v for v in t[TILE0:EXIT] if v is not None], [y] * sum(v is not None for v in t[TILE0:EXIT]),
                        "|", color="k", ms=2)
                if t[FIRST] is not None:
                    ax.plot([t[FIRST]], [y], ".", color="m", ms=1.5)
                y += 1
        ax.set_title(f"{kind}: the launches of one run ({', '.join(x['call'] for x in s['launches'][:len(layer)])}), "
                     f"{s['us_per_run']:.1f} us a run")
        ax.set_xlabel("us from the layer's first CTA start (|: a tile stored; .: first chunk in)")
        ax.set_ylabel("CTA")
    fig.suptitle(res["card"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
