#!/usr/bin/env python3
"""The CUDA w4a16 decode kernel (``qlinear_pass/kernels/cuda/w4a16_decode.cu``) built with other
values of its tuning defines (or called with other warps a CTA), timed side by side: the measurement
behind ``cuda_w4a16.warps_for`` and the defaults of ``QLP_SLOTS_R1`` / ``QLP_SLOTS_R2`` / ``QLP_SLOTS4_R1`` /
``QLP_SLOTS4_R2`` (``cp.async`` ring depths with 8 / 4 warps),
``QLP_SLOTS_XR8`` / ``QLP_SLOTS_XR8_G64`` / ``QLP_SLOTS_XR16`` (the ring depths where 8 / 16 tokens' activation rows stay in shared memory),
``QLP_HOIST_TOK`` (the tokens from which a chunk's weight words are all loaded first), ``QLP_MIN_CTAS`` (the register budget for M > 1), ``QLP_MAX_TOK`` (tokens a CTA) and ``QLP_L2_FETCH`` (the DRAM block
L2 fetches for a weight copy), of ``cuda_w4a16.w4a16_row_tiles`` (the ``rows`` set) and of programmatic
dependent launch (the ``pdl`` set; ``--producer`` puts a copy kernel that writes the activation before each
call, as a model's norm or SwiGLU kernel does).  ``--against FILE`` times
another version of the kernel's source beside them (e.g. ``git show REV:qlinear_pass/kernels/cuda/w4a16_decode.cu``),
built with its own defaults and the same call arguments as ``rule``.

Each variant is compiled with this machine's nvcc (the flags of ``kernels/cuda_build.py`` plus the
defines) and timed like ``bench_decode.py`` (CUDA graph replays over weight copies past L2), with the
row tiling the kernel's rule picks; every variant is also checked against the scheme's reference.
Writes ``bench_cuda_ring.json`` and ``bench_cuda_ring.log`` to --out.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_decode import L2_BYTES, bf16_linear_time, graph_time, tee  # noqa: E402
from qlinear_pass import schemes as S  # noqa: E402
from qlinear_pass.kernels import cuda_build as CB  # noqa: E402
from qlinear_pass.kernels import cuda_w4a16 as CW  # noqa: E402
from qlinear_pass.kernels import int4_layout  # noqa: E402

#: sets of variants (--set): name -> the defines it is built with (QLP_*; the others keep the source's
#: defaults) and the arguments of its calls (``warps``: a CTA's, 8 or 4, the latter at M = 1 only;
#: ``row_tiles``: 1, 2, or 3 at M <= 8 (8 warps at M = 1); ``pdl``: programmatic dependent launch; by default the kernel's rules;
#: ``config``: call of a decoder layer -> (row_tiles, warps), for bench_decode_layer.py --set only)
SETS = {
    "rule": {  # the source as it stands (with --against: beside another version of it)
        "rule": {},
    },
    "hoist": {  # every weight word of a chunk loaded before its first MMA: 16 tokens a CTA (the rule), 8 and 16, never
        "rule": {},
        "t8": {"QLP_HOIST_TOK": 8},
        "none": {"QLP_HOIST_TOK": 32},
    },
    "ring": {
        "s3s2": {"QLP_SLOTS_R2": 2},
        "s3s3": {},
        "s4s3": {"QLP_SLOTS_R1": 4},  # 4 slots for 32-row tiles do not fit 16 tokens' shared memory
        "w4s4s3": {"warps": 4},
        "w4s6s4": {"warps": 4, "QLP_SLOTS4_R1": 6, "QLP_SLOTS4_R2": 4},
    },
    "slots1": {  # one token: ring slots a warp, deeper rings keeping more weight bytes in flight while the prologue runs
        "rule": {},
        "w8r2s5": {"QLP_SLOTS1_R2": 5},
        "w8r2s7": {"QLP_SLOTS1_R2": 7},
        "w4r2s4": {"QLP_SLOTS4_R2": 4},
        "w4r1s6": {"QLP_SLOTS4_R1": 6},
    },
    "grid": {  # launches of more tiles than resident CTAs: CTAs a multiple of the SMs (each SM's tiles within one of the others')
        "rule": {},
        "g4": {"QLP_GRID_PER_SM": 4},
        "g3": {"QLP_GRID_PER_SM": 3},
    },
    "balance": {  # one token: each SM's share of q/k/v and gate/up within one 16-row block of another's
        "rule": {},
        # q/k/v as 130 tiles of 48 rows, one CTA an SM (the rule: 192 of 32, two CTAs on 60 SMs)
        "r3": {"config": {"qkv": (3, 8)}},
        # one CTA of 8 warps an SM walking its tiles (gate/up: 7 or 6 of 32 rows, where the rule's 448
        # CTAs of 4 warps leave 8 tiles on 52 SMs and 6 on 80), ring slots 3 (the rule's), 5, 7
        "g1": {"QLP_GRID_PER_SM": 1, "config": {"gate_up": (2, 8), "qkv": (1, 8)}},
        "g1s5": {"QLP_GRID_PER_SM": 1, "QLP_SLOTS1_R1": 5, "QLP_SLOTS1_R2": 5, "config": {"gate_up": (2, 8), "qkv": (1, 8)}},
        "g1s7": {"QLP_GRID_PER_SM": 1, "QLP_SLOTS1_R1": 7, "QLP_SLOTS1_R2": 7, "config": {"gate_up": (2, 8), "qkv": (1, 8)}},
    },
    "r3m1": {  # one token, no prologue: 16-row tiles in CTAs of 4 warps, 32 or 48 rows in CTAs of 8
        "rule": {},
        "r1w4": {"row_tiles": 1, "warps": 4},
        "r2w8": {"row_tiles": 2, "warps": 8},
        "r3w8": {"row_tiles": 3, "warps": 8},
    },
    "trigger": {  # programmatic dependent launch, the next kernel let start after the prologue or after the last copies
        "rule": {},
        "pdl": {"pdl": True},
        "pdl_late": {"pdl": True, "QLP_LATE_TRIGGER": 1},
    },
    "solo": {  # programmatic dependent launch with one CTA an SM (QLP_PDL_SOLO), so early CTAs share no SM
        "rule": {},
        "g8": {"config": {"gate_up": (2, 8)}},
        "pdl": {"pdl": True},
        "solo": {"pdl": True, "QLP_PDL_SOLO": 1, "config": {"gate_up": (2, 8)}},
        "solo_late": {"pdl": True, "QLP_PDL_SOLO": 1, "QLP_LATE_TRIGGER": 1, "config": {"gate_up": (2, 8)}},
    },
    "exit": {  # programmatic dependent launch with the next kernel let start only as each CTA exits
        "rule": {},
        "pdl_exit": {"pdl": True, "QLP_LATE_TRIGGER": 2},
    },
    "carveout": {  # one L1 / shared-memory split for every launch (the most shared memory) or the driver's per kernel
        "rule": {},
        "c100": {"QLP_CARVEOUT": 100},
    },
    "warps": {
        "w8": {"warps": 8},
        "w4": {"warps": 4},
        "rule": {},
    },
    "tokens": {
        "t16": {"QLP_MAX_TOK": 16},
        "t8": {"QLP_MAX_TOK": 8},
        "t16min2": {"QLP_MAX_TOK": 16, "QLP_MIN_CTAS": 2},
    },
    "rows": {
        "rule": {},
        "r1": {"row_tiles": 1},
        "r2": {"row_tiles": 2},
    },
    "pdl": {
        "plain": {"pdl": False},
        "pdl": {"pdl": True},
    },
    "xrow": {  # the resident rows of 8 / 16 tokens: ring slots a warp, and 16 tokens as two CTAs of 8
        "xr": {},
        "xr8s4": {"QLP_SLOTS_XR8": 4},
        "xr8s6": {"QLP_SLOTS_XR8": 6},
        "xr_t8": {"QLP_MAX_TOK": 8},
    },
    "xr8": {  # 8 tokens' resident rows with 2 slots a warp (the rule: two CTAs an SM at K = 4096, g128) or 3 (one)
        "rule": {},
        "xr8s3": {"QLP_SLOTS_XR8": 3},
    },
    "ctas8": {  # 8 tokens in the ring with 2 slots a warp (81 KB a CTA of 32-row tiles), and room for 2 CTAs an SM
        "rule": {},
        "ring_s2": {"QLP_XR_TOKENS": 0, "QLP_SLOTS_R1": 2, "QLP_SLOTS_R2": 2},
        "ring_s2_min2": {"QLP_XR_TOKENS": 0, "QLP_SLOTS_R1": 2, "QLP_SLOTS_R2": 2, "QLP_MIN_CTAS": 2},
        "ring_s3_min2": {"QLP_XR_TOKENS": 0, "QLP_MIN_CTAS": 2},
    },
    "l2": {
        "l2f0": {"QLP_L2_FETCH": 0},
        "l2f128": {"QLP_L2_FETCH": 128},
        "l2f256": {"QLP_L2_FETCH": 256},
    },
}
SHAPES = [(4096, 14336), (14336, 4096), (4096, 6144), (4096, 28672), (4096, 4096), (4096, 1024)]


def build(name: str, defines: dict, folder: Path, source: Optional[Path] = None, library: str = "w4a16_decode",
          prepare=CW.prepare) -> ctypes.CDLL:
    """``library``'s source (or ``source``) compiled with ``defines`` into ``folder``, loaded and checked by ``prepare``."""
    path, why = CB.toolchain()
    if path is None:
        raise RuntimeError(why)
    cap = torch.cuda.get_device_capability()
    out = folder / f"lib_{name}.so"
    # another version of the source finds this one's headers (common.cuh) through -I
    cmd = [path, *CB.FLAGS, CB.arch_flag(cap), f"-I{CB.SOURCE_DIR}", *(f"-D{k}={v}" for k, v in defines.items()),
           "-o", str(out), str(source or CB.SOURCE_DIR / CB.LIBRARIES[library])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"nvcc failed for {name}:\n{proc.stderr[-3000:]}")
    return prepare(ctypes.CDLL(str(out)))


def build_all(variants: dict, folder: Path, sources: Optional[dict] = None) -> dict:
    """Each variant (name -> its defines, of which the QLP_* ones are built, and call arguments)
    built into ``folder`` side by side, one nvcc each: name -> its loaded library.  ``sources``:
    name -> another w4a16_decode.cu to build that variant from."""
    sources = sources or {}
    # variants of the same defines and source share one build
    keys = {name: (tuple(sorted((k, v) for k, v in d.items() if k.startswith("QLP_"))), str(sources.get(name)))
            for name, d in variants.items()}
    first = {}
    for name, key in keys.items():
        first.setdefault(key, name)
    with ThreadPoolExecutor(max_workers=len(first)) as pool:
        built = {key: pool.submit(build, name, dict(key[0]), folder, sources.get(name)) for key, name in first.items()}
        return {name: built[key].result() for name, key in keys.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cuda_ring"))
    ap.add_argument("--ms", default="1,8,16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--set", choices=sorted(SETS), default="ring", help="which variants to build and time")
    ap.add_argument("--against", type=Path, default=None,
                    help="another w4a16_decode.cu (of this ABI), timed beside the variants as 'against'")
    ap.add_argument("--bf16", action="store_true", help="also time bf16 F.linear on each shape (as 'bf16')")
    ap.add_argument("--producer", action="store_true",
                    help="a copy kernel writes the activation before each call (timed with it)")
    args = ap.parse_args(argv)
    if any("config" in d for d in SETS[args.set].values()):  # per-call tiles of a layer's calls
        ap.error(f"--set {args.set}: its variants set the tiles of a layer's calls (config); "
                 f"time it with bench_decode_layer.py --set {args.set}")
    if not torch.cuda.is_available():
        print("bench_cuda_ring.py needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = tee(out / "bench_cuda_ring.log")

    variants = dict(SETS[args.set])
    if args.against is not None:
        if not args.against.is_file():
            print(f"--against: no file {args.against}", file=sys.stderr)
            return 2
        variants["against"] = {}
    say(f"# variants: " + "; ".join(f"{name} = {d}" for name, d in variants.items()))
    say(f"# us per call, w4a16 g{args.group_size}, {torch.cuda.get_device_name()}"
        + (", each after a copy kernel that writes its activation" if args.producer else ""))
    with tempfile.TemporaryDirectory(prefix="qlp_ring_") as tmp:
        t0 = time.monotonic()
        libs = build_all(variants, Path(tmp), {"against": args.against} if args.against else None)
        say(f"# built {len(libs)} variants in {time.monotonic() - t0:.0f} s")
        result = {"device": torch.cuda.get_device_name(), "group_size": args.group_size, "set": args.set, "variants": variants,
                  "against": str(args.against) if args.against else None, "producer": args.producer, "cases": []}
        original = CW._library
        try:
            for k, n in SHAPES:
                p = S.quantize_weight("w4a16", torch.randn(n, k, device="cuda") * 0.02, group_size=args.group_size)
                wbytes = p["weight"].numel() + p["weight_scale"].numel() * 4
                sets = [(p["weight"].clone(), p["weight_scale"].clone()) for _ in range(int(2 * L2_BYTES // wbytes) + 1)]
                for m in (int(v) for v in args.ms.split(",")):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    src = x.clone()
                    ref = S.reference("w4a16", x, [p["weight"], p["weight_scale"]], None)
                    case = {"k": k, "n": n, "m": m, "us": {}, "rel_err": {}}
                    for name, lib in libs.items():
                        CW._library = lambda device, lib=lib: lib
                        warps, row_tiles, pdl = (variants[name].get(a) for a in ("warps", "row_tiles", "pdl"))
                        if warps == 4 and m != 1:
                            continue  # 4 warps a CTA serve one token only

                        def call(ws):
                            if args.producer:
                                x.copy_(src)
                            return CW.w4a16_decode(x, int4_layout.mma16_of(ws[0]), ws[1], None, None, args.group_size,
                                                   row_tiles=row_tiles, warps=warps, pdl=pdl)
                        case["rel_err"][name] = S.relative_error(call(sets[0]), ref)
                        case["us"][name] = graph_time([(lambda ws: (lambda: call(ws)))(ws) for ws in sets]) * 1e6
                    if args.bf16:
                        case["us"]["bf16"] = bf16_linear_time(x, n, k) * 1e6
                    result["cases"].append(case)
                    say(f"K={k:5d} N={n:5d} M={m:2d}: " + " | ".join(
                        f"{name} {us:5.1f}" + ("" if case["rel_err"].get(name, 0.0) <= S.TOLERANCE[torch.bfloat16] else " WRONG")
                        for name, us in case["us"].items()))
                    (out / "bench_cuda_ring.json").write_text(json.dumps(result, indent=1))
        finally:
            CW._library = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
