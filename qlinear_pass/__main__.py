"""``python -m qlinear_pass backends|env|explain``."""
from __future__ import annotations

import argparse
import platform
import sys


def _backends(args) -> int:
    from . import available_backends
    from .config import SCHEMES
    from .registry import DeviceInfo

    dev = DeviceInfo.of(args.device)
    table = available_backends(dev)
    print(f"device: {dev}")
    width = max(len(b) for b in table)
    print("backend".ljust(width) + "  " + "  ".join(s.ljust(16) for s in SCHEMES))
    for b, row in table.items():
        cells = [("yes" if ok else "no").ljust(16) for ok, _ in (row[s] for s in SCHEMES)]
        print(b.ljust(width) + "  " + "  ".join(cells))
    print()
    print("reasons:")
    for b, row in table.items():
        for s in SCHEMES:
            ok, why = row[s]
            print(f"  {b:<{width}} {s:<16} {'ok: ' + why if ok else why}")
    return 0


def _env(args) -> int:
    import torch

    from . import __version__
    from .registry import DeviceInfo

    print(f"qlinear_pass {__version__}")
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"torch {torch.__version__}")
    for mod in ("triton", "flashinfer"):
        try:
            m = __import__(mod)
            print(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as exc:
            print(f"{mod}: not available ({type(exc).__name__})")
    from .kernels import cutlass_build as B

    inc, why = B.cutlass_include()
    print(f"CUTLASS headers: {B.cutlass_version(inc)} at {inc}" if inc else f"CUTLASS headers: {why}")
    path, version, why = B.nvcc()
    print(f"nvcc: {'.'.join(map(str, version))} at {path}" if path else f"nvcc: {why}")
    built = {f: B.build_record(f) for f in B.FAMILIES}
    print("CUTLASS builds in " + str(B.cache_dir()) + ": "
          + (", ".join(f"{f} ({r['seconds']} s)" for f, r in built.items() if r) or "none yet"))
    print(f"device: {DeviceInfo.of(None)}")
    print(f"CUDA available: {torch.cuda.is_available()} (torch built with CUDA {torch.version.cuda})")
    from .config import ENV_VAR, resolve

    cfg, source = resolve()
    print(f"config in effect: {cfg} (from {source}; env var {ENV_VAR})")
    return 0


def _explain(args) -> int:
    import torch

    from . import explain, quantize
    from .examples_model import TinyBlock

    model = TinyBlock(args.hidden, args.hidden * 2)
    quantize(model, args.scheme, group_size=args.group_size)
    x = torch.randn(2, 8, args.hidden)
    print(explain(model, x, linear_backend=args.backend))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qlinear_pass", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backends", help="the backend x scheme table for this machine, with reasons")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    b.set_defaults(fn=_backends)
    e = sub.add_parser("env", help="versions and device")
    e.set_defaults(fn=_env)
    x = sub.add_parser("explain", help="quantize a small block and show which kernel runs each linear")
    x.add_argument("--scheme", default="fp8_rowwise")
    x.add_argument("--backend", default=None)
    x.add_argument("--hidden", type=int, default=256)
    x.add_argument("--group-size", type=int, default=128)
    x.set_defaults(fn=_explain)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
