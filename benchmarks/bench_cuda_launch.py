#!/usr/bin/env python3
"""The launch shape of our CUDA decode kernels (``qlinear_pass/kernels/cuda/``), each value of one knob
and the kernel's rule timed side by side with bf16 ``F.linear``: the measurement behind the rules.

* ``--knob warps``: CTAs of 8 warps, of 4, and as ``cuda_w4a16.warps_for`` / ``cuda_w8a8.warps_for``
  pick (4 warps serve one token in the w4a16 kernel, any M in the 8-bit one);
* ``--knob rows``: row tiles of 16, 32 and 48 channels (48 in the w4a16 kernel at 1-8 tokens, in
  the 8-bit one above 8 tokens with a scale per channel or per tensor) and as
  ``cuda_w4a16.w4a16_row_tiles`` / ``cuda_w8a8.w8_row_tiles`` pick.

Each cell is timed like ``bench_decode.py`` (CUDA graph replays over weight copies past L2) and
checked against the scheme's reference.  Writes ``bench_cuda_launch.json`` and
``bench_cuda_launch.log`` to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_decode import L2_BYTES, bf16_linear_time, copy_bandwidth, graph_time, serves_48_rows, tee  # noqa: E402
from qlinear_pass import schemes as S  # noqa: E402
from qlinear_pass.kernels import cuda_w4a16 as CW  # noqa: E402
from qlinear_pass.kernels import cuda_w8a8 as C8  # noqa: E402
from qlinear_pass.kernels import int4_layout  # noqa: E402

SCHEMES = ("w4a16", "int8_weight_only", "fp8_weight_only", "fp8_rowwise", "fp8_block")
SHAPES = [(4096, 14336), (14336, 4096), (4096, 6144), (4096, 28672), (4096, 4096), (4096, 1024)]
#: knob -> {label: the kernel's keyword argument, None: its rule}
KNOBS = {
    "warps": {"w8": 8, "w4": 4, "rule": None},
    "rows": {"r16": 1, "r32": 2, "r48": 3, "rule": None},
}


def kernel_call(scheme: str, x: torch.Tensor, **knobs):
    """A function of one weight copy (weight, scale) that runs the scheme's decode kernel on ``x``
    with ``knobs`` (``warps``, ``row_tiles``: the kernel's keyword arguments; fp8_rowwise: quantized
    here, once)."""
    if scheme == "w4a16":
        return lambda w, s: CW.w4a16_decode(x, w, s, None, None, 128, **knobs)
    if scheme == "fp8_rowwise":
        xq, sx = S.quantize_activation(scheme, x)
        return lambda w, s: C8.w8a8_decode(xq, sx, w, s, None, x.dtype, **knobs)
    if scheme == "fp8_block":
        return lambda w, s: C8.fp8_block_decode(x, w, s, None, **knobs)
    return lambda w, s: C8.w8a16_decode(x, w, s, None, **knobs)


def weight_copies(scheme: str, n: int, k: int) -> tuple[dict, list]:
    p = S.quantize_weight(scheme, torch.randn(n, k, device="cuda") * 0.02, group_size=128)
    w = int4_layout.to_mma16(p["weight"]) if scheme == "w4a16" else p["weight"]
    s = p["weight_scale"].float()
    s = s if scheme in ("w4a16", "fp8_block") else s.reshape(-1)
    s = s.contiguous()
    nbytes = w.numel() * w.element_size() + s.numel() * 4
    return p, [(w.clone(), s.clone()) for _ in range(int(2 * L2_BYTES // nbytes) + 1)]


class Cell(NamedTuple):
    """One timed case: a layer of SHAPES, M tokens, a scheme."""

    k: int
    n: int
    m: int
    scheme: str
    x: torch.Tensor
    bf16_us: float
    copies: list  # (weight, scale) copies, past L2 together
    ref: torch.Tensor
    weight_bytes: int

    def time(self, call) -> tuple[float, float]:
        """(relative error against the reference, us per call) of ``call`` (a function of one weight copy)."""
        err = S.relative_error(call(*self.copies[0]), self.ref)
        return err, graph_time([(lambda ws: (lambda: call(*ws)))(ws) for ws in self.copies]) * 1e6


def cells(ms: str, schemes):
    """Every (K, N) of SHAPES, M of ``ms`` ("1,8,16") and scheme, bf16 ``F.linear`` timed once per
    (K, N, M)."""
    for k, n in SHAPES:
        for m in (int(v) for v in ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = bf16_linear_time(x, n, k) * 1e6
            for scheme in schemes:
                p, copies = weight_copies(scheme, n, k)
                names = [name for name in S.get_scheme(scheme).param_names if p.get(name) is not None]
                w, s = copies[0]
                yield Cell(k, n, m, scheme, x, bf16, copies, S.reference(scheme, x, [p[name] for name in names], None),
                           w.numel() * w.element_size() + s.numel() * s.element_size())
                del copies


def command_line(name: str, doc: str, schemes: tuple, argv, add=None) -> Optional[tuple]:
    """What the kernel benchmarks ``benchmarks/bench_<name>.py`` share: --out (a folder, default
    ``benchmarks/results/<name>``), --ms and --schemes (checked against ``schemes``), and ``add``'s
    own arguments.  (args, the schemes asked for, the out folder, a ``say`` that also writes
    ``bench_<name>.log`` there), or None, said on stderr, without a CUDA GPU."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / name))
    ap.add_argument("--ms", default="1,8,16")
    ap.add_argument("--schemes", default=",".join(schemes))
    if add is not None:
        add(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_{name}.py needs a CUDA GPU", file=sys.stderr)
        return None
    asked = args.schemes.split(",")
    unknown = [s for s in asked if s not in schemes]
    if unknown:
        ap.error(f"unknown scheme {', '.join(unknown)} (known: {', '.join(schemes)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, asked, out, tee(out / f"bench_{name}.log")


def serves(knob: str, value: Optional[int], scheme: str, m: int) -> bool:
    """Whether the kernel takes this value of the knob here."""
    if knob == "warps":
        return value != 4 or scheme != "w4a16" or m == 1
    return value != 3 or serves_48_rows(scheme, m)


def main(argv=None) -> int:
    cli = command_line("cuda_launch", __doc__, SCHEMES, argv,
                       lambda ap: ap.add_argument("--knob", choices=sorted(KNOBS), default="warps"))
    if cli is None:
        return 2
    args, schemes, out, say = cli
    values = KNOBS[args.knob]
    keyword = {"warps": "warps", "rows": "row_tiles"}[args.knob]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth()
    say(f"# us per call, {torch.cuda.get_device_name()} ({sms} SMs), copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + "
        f"write); {args.knob}: " + ", ".join(f"{label} = {v}" for label, v in values.items())
        + " (-: not served here; rule: the kernel's own); % copy: weight bytes / the rule's time / the copy bandwidth; "
        "bf16: F.linear; w4a16 g128, the 8-bit schemes per channel (fp8_block per 128x128 block)")
    result = {"device": torch.cuda.get_device_name(), "sms": sms, "copy_bytes_per_s": copy_bw, "knob": args.knob,
              "cases": []}
    start = time.monotonic()
    for c in cells(args.ms, schemes):
        case = {"scheme": c.scheme, "k": c.k, "n": c.n, "m": c.m, "bf16_us": c.bf16_us, "weight_bytes": c.weight_bytes,
                "us": {}, "rel_err": {}}
        for label, value in values.items():
            if serves(args.knob, value, c.scheme, c.m):
                case["rel_err"][label], case["us"][label] = c.time(kernel_call(c.scheme, c.x, **{keyword: value}))
        result["cases"].append(case)
        tol = S.TOLERANCE[torch.bfloat16]
        say(f"{c.scheme:17s} K={c.k:5d} N={c.n:5d} M={c.m:2d}: " + " | ".join(
            f"{label} " + (f"{case['us'][label]:5.1f}" + ("" if case["rel_err"][label] <= tol else " WRONG")
                           if label in case["us"] else "    -") for label in values)
            + f" | {c.weight_bytes / (case['us']['rule'] * 1e-6) / copy_bw:4.0%} | bf16 {c.bf16_us:5.1f}")
        (out / "bench_cuda_launch.json").write_text(json.dumps(result, indent=1))
    say(f"# {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
