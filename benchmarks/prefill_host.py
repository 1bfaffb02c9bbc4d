"""Where the wall clock of one compiled prefill goes: host enqueue time against device time, and a
cProfile of one call (the host path behind the kernels).

``python benchmarks/prefill_host.py fp8_block/auto [--layers 32]``: builds the variant as
``bench_e2e.py`` does (same model, same compile), compiles only the prefill (a static M), warms it up
three times, then prints three timed calls and the profile.  CUDA only.
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
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("prefill_host.py needs a CUDA GPU", file=sys.stderr)
        return 2
    eargs = E.parse_args(["--quick", "--layers", args.layers, "--variants", args.variant])
    settings = E.settings_from(eargs)
    E.disable_compile_caches()
    ctx = E.VariantRun(E.Variant.parse(args.variant), settings, {"errors": {}}, lambda: None)
    ctx.build()
    model = ctx.model
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
