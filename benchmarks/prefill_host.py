"""Where the wall clock of one compiled prefill goes: host enqueue time against device time, and a
cProfile of one call (the host path behind the kernels).

``python benchmarks/prefill_host.py fp8_block/auto [--layers 32]``: builds the variant as
``bench_e2e.py`` does (same model, same compile), compiles only the prefill (a static M), warms it up
three times, then prints three timed calls and the profile.  ``--decode-first timed|profiled`` runs
the batch-1 decode phase of ``bench_e2e.py`` before (and its profiler session too), to time the
prefill in the state those leave.
CUDA only.
"""
import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e as E  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", help="a bench_e2e.py variant, e.g. fp8_block/auto")
    ap.add_argument("--layers", default="32")
    ap.add_argument("--rows", type=int, default=22, help="profile rows to print")
    ap.add_argument("--gaps", action="store_true",
                    help="also profile one call with torch.profiler: the GPU's busy time against its span, and "
                    "the kernels after which it waits longest for the next launch (where the host falls behind)")
    ap.add_argument("--decode-first", choices=("timed", "profiled"), default=None,
                    help="first run bench_e2e.py's batch-1 decode phase (compile, CUDA graph, timing), and with "
                    "'profiled' its decode profile too (a torch.profiler session), to time the prefill after them")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("prefill_host.py needs a CUDA GPU", file=sys.stderr)
        return 2
    ctx = E.built_variant(args.variant, args.layers)
    settings, model = ctx.settings, ctx.model
    if args.decode_first:
        ctx.decode(1)
        if args.decode_first == "profiled":
            ctx.profile_decode(1)
    E.set_cache(model, 1, E.ACT_DTYPE)
    tokens = torch.randint(model.shape.vocab, (1, settings.prefill_tokens), device="cuda")
    with torch.no_grad():
        for _ in range(3):
            ctx.prefill_fn(model, tokens)
        torch.cuda.synchronize()
        for _ in range(3):
            t = time.perf_counter()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            ctx.prefill_fn(model, tokens)
            end.record()
            host = time.perf_counter() - t
            end.synchronize()
            print(f"{args.variant}: host enqueue {host * 1e3:.1f} ms, events {start.elapsed_time(end):.1f} ms, "
                  f"wall {(time.perf_counter() - t) * 1e3:.1f} ms", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        ctx.prefill_fn(model, tokens)
        torch.cuda.synchronize()
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.rows)
    print("\n".join(line[:170] for line in out.getvalue().splitlines()[:args.rows + 40]))
    if args.gaps:
        gpu_gaps(args.variant, lambda: ctx.prefill_fn(model, tokens))
    return 0


def gpu_gaps(label: str, call, rows: int = 8) -> None:
    """One profiled ``call``: the GPU's busy time and span, the idle time after each kernel name (summed
    over its launches: the host was late with the next one), and the host's largest self times."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.elapsed_us() > 0),
                     key=lambda e: e.time_range.start)
    if not kernels:
        print(f"{label}: the profiler saw no GPU work")
        return
    idle, count = collections.defaultdict(float), collections.Counter()
    for a, b in zip(kernels, kernels[1:]):
        gap = b.time_range.start - a.time_range.end
        if gap > 0:
            idle[a.name[:60]] += gap
            count[a.name[:60]] += 1
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    print(f"{label} (profiled): GPU span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms, {len(kernels)} kernels")
    for name, gap in sorted(idle.items(), key=lambda t: -t[1])[:rows]:
        print(f"   idle after {name}: {gap / 1e3:.2f} ms over {count[name]}")
    host = sorted(((e.self_cpu_time_total, e.key[:70]) for e in prof.key_averages()), reverse=True)[:rows + 4]
    for t, key in host:
        print(f"   host self {t / 1e3:.2f} ms  {key}")


if __name__ == "__main__":
    sys.exit(main())
