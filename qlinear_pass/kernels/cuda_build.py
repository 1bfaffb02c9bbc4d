"""Building our own CUDA kernels (``kernels/cuda/*.cu``) on first use.

Each source is a CUDA C++ file (no torch or CUTLASS headers; ``common.cuh`` holds what they share)
that exports plain C functions.  The first time a kernel runs on a machine its source is compiled by this machine's
nvcc for this GPU's architecture into a shared library (seconds), which Python loads with
``ctypes``; launches go to the caller's CUDA stream, so CUDA graphs capture them.

* Builds are cached under ``$QLINEAR_PASS_CACHE_DIR/cuda`` (default ``~/.cache/qlinear_pass/cuda``),
  one folder per library and key; the key hashes the source (and the shared ``*.cuh`` headers),
  the flags, the architecture and nvcc's version, so a change rebuilds and nothing stale is loaded.
* A file lock per build folder: a second process waits for the first one's build.
* The build says so on stderr when it starts and ends (with the seconds, also in ``build.json``).

``python -m qlinear_pass.kernels.cuda_build [--compile-only] [--arch sm_90] [LIBRARY ...]``
builds ahead of time; ``--compile-only`` compiles without a GPU (the CPU CI check).
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from .cutlass_build import _heartbeat, _locked, _say, cache_root, nvcc

SOURCE_DIR = Path(__file__).with_name("cuda")
#: library -> its source
LIBRARIES = {"w4a16_decode": "w4a16_decode.cu", "w8a8_decode": "w8a8_decode.cu"}
#: mma.sync with bf16 operands, __grid_constant__: CUDA 11.7 or newer
MIN_NVCC = (11, 7)
FLAGS = ("-O3", "-std=c++17", "--shared", "-Xcompiler", "-fPIC", "-DNDEBUG")


def cache_dir() -> Path:
    return cache_root() / "cuda"


def arch_flag(capability: tuple[int, int]) -> str:
    major, minor = capability
    return f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"


def toolchain(minimum: tuple[int, int] = MIN_NVCC) -> tuple[Optional[str], str]:
    """(nvcc's path, "") or (None, why not): an nvcc of version ``minimum`` or newer."""
    path, _, why = nvcc(minimum, "qlinear_pass's CUDA kernels")
    return path, why


def build_key(library: str, capability: tuple[int, int]) -> str:
    _, version, _ = nvcc(MIN_NVCC, "qlinear_pass's CUDA kernels")
    h = hashlib.sha256()
    h.update((SOURCE_DIR / LIBRARIES[library]).read_bytes())
    for header in sorted(SOURCE_DIR.glob("*.cuh")):  # what the sources include
        h.update(header.name.encode() + header.read_bytes())
    h.update(repr((FLAGS, capability, version)).encode())
    return h.hexdigest()[:16]


def _command(path: str, library: str, capability: tuple[int, int], out: Path) -> list[str]:
    return [path, *FLAGS, arch_flag(capability), "-o", str(out), str(SOURCE_DIR / LIBRARIES[library])]


_loaded: dict = {}
_load_lock = threading.Lock()


def load(library: str, capability: tuple[int, int]) -> ctypes.CDLL:
    """The shared library ``library`` for a GPU of compute ``capability``, built first if this
    machine has not built it yet."""
    if library not in LIBRARIES:
        raise ValueError(f"unknown CUDA library {library!r} (known: {', '.join(LIBRARIES)})")
    key = (library, tuple(capability))
    with _load_lock:
        if key in _loaded:
            return _loaded[key]
        path, why = toolchain()
        if path is None:
            raise RuntimeError(f"qlinear_pass cannot build its CUDA {library} kernels: {why}")
        folder = cache_dir() / f"{library}-sm{capability[0]}{capability[1]}-{build_key(library, capability)}"
        so = folder / f"libqlp_{library}.so"
        what = f"the CUDA {library} kernels"
        with _locked(folder.with_suffix(".lock"), what):
            if not (folder / "build.json").is_file():
                _build(path, library, capability, folder, so, what)
        lib = ctypes.CDLL(str(so))
        _loaded[key] = lib
        return lib


def library_for(library: str, device, prepare: Callable[[ctypes.CDLL], ctypes.CDLL]) -> ctypes.CDLL:
    """``library`` built for the architecture of the CUDA ``device`` (a torch.device) and passed
    through ``prepare`` (the caller's :func:`bind`): looked up once per GPU."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return _library_for(library, index, prepare)


@functools.lru_cache(maxsize=None)
def _library_for(library: str, index: int, prepare) -> ctypes.CDLL:
    import torch

    cap = torch.cuda.get_device_capability(index)
    return prepare(load(library, (int(cap[0]), int(cap[1]))))


def bind(lib: ctypes.CDLL, prefix: str, params: type, max_segments: int, abi_version: int, argtypes: list,
         also: tuple = ()) -> ctypes.CDLL:
    """Check that a built library's ``qlp_<prefix>_abi()`` matches the caller's ctypes ``params``
    struct (its size, ``max_segments`` and ``abi_version``) and declare ``qlp_<prefix>_decode(params*,
    *argtypes, stream, err, err_len)``, and ``qlp_<name>_decode`` alike for each name in ``also``;
    once per library."""
    if not getattr(lib, "_qlp_ready", False):
        abi = getattr(lib, f"qlp_{prefix}_abi")
        abi.restype = ctypes.c_int
        want = ctypes.sizeof(params) * 1000 + max_segments * 10 + abi_version
        if abi() != want:
            raise RuntimeError(f"the built {prefix} decode library does not match this module (ABI {abi()} != {want}); "
                               "its build cache is stale or from another version")
        for name in (prefix, *also):
            run = getattr(lib, f"qlp_{name}_decode")
            run.restype = ctypes.c_int
            run.argtypes = [ctypes.POINTER(params), *argtypes, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
        lib._qlp_ready = True
    return lib


def _build(path: str, library: str, capability: tuple[int, int], folder: Path, so: Path, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _say(f"building {what} for sm_{capability[0]}{capability[1]} with nvcc (first use on this machine only, "
         f"a minute or two; cached under {folder})")
    start = time.monotonic()
    tmp = so.with_suffix(".tmp.so")
    cmd = _command(path, library, capability, tmp)
    with _heartbeat(what):
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"building {what} failed:\n$ {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-6000:]}")
    os.replace(tmp, so)
    seconds = time.monotonic() - start
    (folder / "build.json").write_text(json.dumps({
        "library": library, "arch": f"sm_{capability[0]}{capability[1]}", "seconds": round(seconds, 1),
        "nvcc": ".".join(map(str, nvcc(MIN_NVCC, "qlinear_pass's CUDA kernels")[1])),
    }, indent=1))
    _say(f"built {what} in {seconds:.0f} s")


def built() -> list[dict]:
    """What ``build.json`` says of every library built on this machine (any architecture or key)."""
    out = []
    for record in sorted(cache_dir().glob("*/build.json")):
        try:
            out.append(json.loads(record.read_text()))
        except (OSError, ValueError):
            continue
    return out


def compile_only(libraries=tuple(LIBRARIES), capability: tuple[int, int] = (9, 0), keep: Optional[Path] = None) -> dict:
    """Compile every library for ``capability`` with nvcc, without a GPU; {library: seconds}.
    The shared libraries go to ``keep`` (as ``lib<library>.so``) when given, else are thrown away."""
    path, why = toolchain()
    if path is None:
        raise RuntimeError(why)
    times = {}
    with tempfile.TemporaryDirectory(prefix="qlp_cuda_check_") as tmp:
        for library in libraries:
            t0 = time.monotonic()
            cmd = _command(path, library, capability, Path(keep or tmp) / f"lib{library}.so")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"nvcc failed on {library}:\n$ {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-6000:]}")
            times[library] = round(time.monotonic() - t0, 1)
            _say(f"compiled {library} for sm_{capability[0]}{capability[1]} in {times[library]:.0f} s")
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlinear_pass.kernels.cuda_build",
                                 description="Build (or with --compile-only, just compile) qlinear_pass's CUDA kernels.")
    ap.add_argument("libraries", nargs="*", metavar="LIBRARY", help=f"any of {', '.join(LIBRARIES)} (default: all)")
    ap.add_argument("--compile-only", action="store_true", help="compile without a GPU")
    ap.add_argument("--arch", default=None, help="sm_XY (default: this GPU's, or sm_90 with --compile-only)")
    args = ap.parse_args(argv)
    libraries = args.libraries or list(LIBRARIES)
    unknown = [x for x in libraries if x not in LIBRARIES]
    if unknown:
        ap.error(f"unknown library {', '.join(unknown)} (known: {', '.join(LIBRARIES)})")
    if args.arch:
        digits = args.arch.removeprefix("sm_")
        if not digits.isdigit() or len(digits) < 2:
            ap.error(f"--arch takes sm_XY, got {args.arch!r}")
        capability = (int(digits[:-1]), int(digits[-1]))
    elif args.compile_only:
        capability = (9, 0)
    else:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA GPU here: pass --arch, or --compile-only")
        capability = torch.cuda.get_device_capability()
    if args.compile_only:
        print(json.dumps(compile_only(libraries, capability), indent=1))
        return 0
    for library in libraries:
        load(library, capability)
        print(f"{library}: loaded for sm_{capability[0]}{capability[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
