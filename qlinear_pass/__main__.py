"""python -m qlinear_pass backends|env|explain"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

DESCRIPTION = """\
qlinear_pass: run the quantized linears of a torch.compile-d model on the kernels of the
backend you choose.

  backends   which backend can run which scheme on this machine
  env        versions, devices, toolchains and the config in effect
  explain    compile a model and show which kernel runs each quantized linear, and why
"""

EXPLAIN_EPILOG = """\
MODEL is one of:
  module:function   an importable function returning (model, example_inputs); the model may
                    already be quantized, or pass --scheme to quantize its nn.Linear layers
  DIRECTORY         a local Hugging Face model directory (needs the transformers package);
                    it runs on --seq-len random token ids
  (nothing)         a small Llama-style block (--hidden wide) quantized with --scheme

examples:
  python -m qlinear_pass explain --scheme w4a16 --backend torch
  python -m qlinear_pass explain mypkg.models:build --backend triton
  python -m qlinear_pass explain ./llama-3.2-1b --scheme fp8_rowwise
"""


class CliError(Exception):
    """A problem with what was asked: printed as one line, exit status 2."""


def _backends(args) -> int:
    from . import available_backends
    from .config import SCHEMES
    from .spec import DeviceInfo

    dev = DeviceInfo.of(args.device)
    table = available_backends(dev)
    print(f"device: {dev}")
    if args.verbose:
        width = max(len(b) for b in table)
        for b, row in table.items():
            for s in SCHEMES:
                ok, why = row[s]
                print(f"  {b:<{width}}  {s:<16}  {'yes: ' + why if ok else 'no: ' + why}")
        return 0
    installed = {b: row for b, row in table.items() if any(why != "no kernels registered" for _, why in row.values())}
    absent = [b for b in table if b not in installed]
    width = max(len("backend"), *(len(b) for b in installed))
    print("backend".ljust(width) + "  " + "  ".join(SCHEMES))
    for b, row in installed.items():
        cells = []
        for s in SCHEMES:
            ok, why = row[s]
            cell = "yes" if ok else "-" if why == "no kernel for this scheme" else "no"
            cells.append(cell.ljust(len(s)))
        print(b.ljust(width) + "  " + "  ".join(cells).rstrip())
    print("yes: runs here   no: has a kernel, which cannot run here   -: no kernel for this scheme")
    if absent:
        print(f"no kernels in this installation: {', '.join(absent)}")
    reasons = []
    for b, row in installed.items():
        whys = sorted({why for ok, why in row.values() if not ok and why != "no kernel for this scheme"})
        if whys and not any(ok for ok, _ in row.values()):
            reasons.append(f"  {b}: {_first_reason(whys)}")
    if reasons:
        print("why not here:")
        print("\n".join(reasons))
    print("(--verbose: the reason for every backend and scheme)")
    return 0


def _first_reason(whys: list[str]) -> str:
    """One line per backend: its kernels usually fail for one reason; strip the kernel names."""
    parts = {w.split(": ", 1)[1] if ": " in w else w for why in whys for w in why.split("; ")}
    text = "; ".join(sorted(parts))
    return text if len(text) <= 100 else text[:97] + "..."


def _env(args) -> int:
    import torch

    from . import __version__
    from .spec import DeviceInfo

    print(f"qlinear_pass {__version__}")
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"torch {torch.__version__}")
    for mod in ("triton", "flashinfer"):
        try:
            m = importlib.import_module(mod)
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
    from .kernels import cuda_build

    print("CUDA kernel builds in " + str(cuda_build.cache_dir()) + ": "
          + (", ".join(f"{r['library']} {r['arch']} ({r['seconds']} s)" for r in cuda_build.built()) or "none yet"))
    print(f"device: {DeviceInfo.of(None)}")
    print(f"CUDA available: {torch.cuda.is_available()} (torch built with CUDA {torch.version.cuda})")
    from .config import ENV_VAR, EnvConfigError, resolve

    try:
        cfg, source = resolve()
    except EnvConfigError as exc:
        print(f"config in effect: PROBLEM: {exc}")
        return 1
    print(f"config in effect: {cfg.describe()} (from {source}; env var {ENV_VAR}={os.environ.get(ENV_VAR, '')!r})")
    return 0


def _load_callable(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import module {module_name!r} of {spec!r}: {exc}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise CliError(f"module {module_name!r} has no {attr!r} (from {spec!r})")
    if not callable(fn):
        raise CliError(f"{spec!r} is not callable")
    out = fn()
    if not (isinstance(out, tuple) and len(out) == 2):
        raise CliError(f"{spec} must return (model, example_inputs), got {type(out).__name__}")
    model, inputs = out
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    return model, tuple(inputs)


def _load_hf(path: str, dtype, seq_len: int):
    import torch

    try:
        import transformers
    except ImportError:
        raise CliError(f"{path} is a directory: explaining a Hugging Face model needs the transformers package "
                       "(pip install transformers)") from None
    if not os.path.exists(os.path.join(path, "config.json")):
        raise CliError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except TypeError:  # transformers before the dtype keyword
        model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    model.eval()
    vocab = int(getattr(model.config, "vocab_size", 1000))
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    return model, (ids,)


def _explain(args) -> int:
    import torch

    from . import explain, quantize

    dtype = getattr(torch, args.dtype)
    if args.model is None:
        from .examples_model import TinyBlock

        model = TinyBlock(args.hidden, args.hidden * 2).to(dtype)
        inputs = (torch.randn(2, 8, args.hidden).to(dtype),)
        scheme = args.scheme or "fp8_rowwise"
    elif os.path.isdir(args.model):
        model, inputs = _load_hf(args.model, dtype, args.seq_len)
        scheme = args.scheme
    elif ":" in args.model:
        model, inputs = _load_callable(args.model)
        scheme = args.scheme
    else:
        raise CliError(f"model {args.model!r} is neither a directory nor module:function")
    if scheme is not None:
        quantize(model, scheme, group_size=args.group_size)
    report = explain(model, *inputs, linear_backend=args.backend)
    if args.backend is not None:
        report.source = "--backend"
    print(report)
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parser() -> argparse.ArgumentParser:
    from .config import SCHEMES, backend_names
    from .registry import kernels
    from .schemes import GROUP_SIZES

    kernels()  # plug-ins add backend names

    p = argparse.ArgumentParser(prog="python -m qlinear_pass", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{backends,env,explain}")
    b = sub.add_parser("backends", help="which backend can run which scheme on this machine",
                       description="The backend x scheme table of this machine: yes, no (and why), or no kernel.",
                       formatter_class=_HelpFormatter)
    b.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if one is visible, else cpu)")
    b.add_argument("--verbose", "-v", action="store_true", help="the reason for every backend and scheme")
    b.set_defaults(fn=_backends)
    e = sub.add_parser("env", help="versions, devices, toolchains and the config in effect",
                       description="Versions, devices, toolchains and the config in effect (exit status 1 if "
                                   "the config cannot be read).")
    e.set_defaults(fn=_env)
    x = sub.add_parser("explain", help="which kernel runs each quantized linear of a model, and why",
                       description="Compile a model (without code generation) and show, for each quantized linear, "
                                   "the kernel chosen and why the others were not.",
                       epilog=EXPLAIN_EPILOG, formatter_class=_HelpFormatter)
    x.add_argument("model", nargs="?", default=None, help="module:function, a Hugging Face model directory, or nothing")
    x.add_argument("--scheme", type=_scheme, default=None, metavar="SCHEME",
                   help="quantize the model's nn.Linear layers with this scheme first (the built-in block: "
                        f"fp8_rowwise); one of {', '.join(SCHEMES)}")
    x.add_argument("--backend", type=_backend, default=None, metavar="BACKEND",
                   help="the linear backend (default: the config in effect: context, QLINEAR_PASS_LINEAR_BACKEND, "
                        f"auto); one of {', '.join(backend_names())}")
    x.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                   help="w4a16 group size (w4a16 only; None: 128)")
    x.add_argument("--hidden", type=int, default=256, help="width of the built-in block")
    x.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="activation dtype of the built-in block and of a Hugging Face model")
    x.add_argument("--seq-len", type=int, default=8, help="tokens fed to a Hugging Face model")
    x.set_defaults(fn=_explain)
    return p


def _scheme(name: str) -> str:
    from .config import normalize_scheme

    try:
        return normalize_scheme(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _backend(name: str) -> str:
    from .registry import kernels

    kernels()  # plug-ins add backend names
    from .config import normalize_backend

    try:
        return normalize_backend(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    from .config import EnvConfigError
    from .select import NoKernelError

    try:
        return args.fn(args)
    except (CliError, EnvConfigError) as exc:
        p.exit(2, f"{p.prog} {args.cmd}: error: {exc}\n")
    except NoKernelError as exc:
        p.exit(1, f"{p.prog} {args.cmd}: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
