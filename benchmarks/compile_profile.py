"""Where a variant's cold compile time goes: a cProfile of its first calls.

``python benchmarks/compile_profile.py int8_weight_only/auto [--layers 32] [--phases decode,prefill]``
builds the variant as ``bench_e2e.py`` does (same model, same compile, Inductor's caches off), then
profiles the first call of each phase (decode: one batch-1 step; prefill: one 2048-token prompt),
each of which compiles a graph and runs qlinear_pass's pass on it.  For each phase it prints the
wall time, the pass's own seconds, and the functions that took most (cumulative, then own time),
so the part of a compile that belongs to kernel preparation (module loads, Triton compiles and
autotuning on the first call) can be told from Inductor's.  CUDA or CPU.
"""
from __future__ import annotations

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


def _print_stats(prof: cProfile.Profile, key: str, rows: int) -> None:
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(key).print_stats(rows)
    text = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(text) if line.lstrip().startswith("ncalls")), 0)
    print("\n".join(line[:180] for line in text[start:start + rows + 1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", help="a bench_e2e.py variant, e.g. int8_weight_only/auto or bf16")
    ap.add_argument("--layers", default="32")
    ap.add_argument("--phases", default="decode,prefill", help="comma-separated: decode, prefill")
    ap.add_argument("--rows", type=int, default=30, help="profile rows to print per ordering")
    args = ap.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - {"decode", "prefill"}
    if unknown:
        ap.error(f"unknown phase(s) {', '.join(sorted(unknown))}; use decode and/or prefill")

    ctx = E.built_variant(args.variant, args.layers)
    settings, model = ctx.settings, ctx.model
    for phase in phases:
        passes_before = sum(r.pass_seconds for r in ctx.records)
        prof = cProfile.Profile()
        with torch.no_grad():
            if phase == "decode":
                E.set_cache(model, 1, E.ACT_DTYPE)
                run = E.Decode(ctx, 1)
                t = time.perf_counter()
                prof.enable()
                run.eager_body()
            else:
                E.set_cache(model, 1, E.ACT_DTYPE)
                tokens = torch.randint(model.shape.vocab, (1, settings.prefill_tokens), device=settings.device)
                t = time.perf_counter()
                prof.enable()
                ctx.prefill_fn(model, tokens)
            E._sync(settings.device)
            prof.disable()
        wall = time.perf_counter() - t
        pass_s = sum(r.pass_seconds for r in ctx.records) - passes_before
        print(f"\n== {args.variant}: first {phase} call {wall:.2f} s, of which the pass {pass_s:.2f} s "
              f"(profiled: cProfile adds its own overhead)", flush=True)
        print("-- by cumulative time")
        _print_stats(prof, "cumulative", args.rows)
        print("-- by own time")
        _print_stats(prof, "tottime", args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
