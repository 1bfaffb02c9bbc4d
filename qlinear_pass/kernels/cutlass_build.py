"""Building the CUTLASS kernels (``kernels/cutlass/``) on first use.

We ship CUDA C++ sources, not binaries.  The first time a kernel family runs
on a machine it is compiled for ``sm_90a`` with ``torch.utils.cpp_extension``
and this machine's nvcc, against the CUTLASS headers of the ``nvidia-cutlass``
wheel (or of a checkout named by ``QLINEAR_PASS_CUTLASS_DIR``).

* A family is one extension module: ``bindings.cpp`` plus one ``.cu`` per
  output dtype (``fp8``: fp8_tensor and fp8_rowwise; ``int8``: int8_rowwise;
  ``fp8_block``; ``w4a16``, ``int8_wo``, ``fp8_wo``: the weight-only GEMMs).  Only the families a model uses are built.
* Builds are cached under ``$QLINEAR_PASS_CACHE_DIR/cutlass`` (default
  ``~/.cache/qlinear_pass/cutlass``), one folder per family and key; the key
  hashes the sources, the flags, the CUTLASS headers' version, nvcc's version
  and torch's version, so any change rebuilds and nothing stale is loaded.
* A file lock per build folder: a second process waits for the first one's
  build instead of compiling the same thing again.
* A build takes minutes, so it says so on stderr when it starts, every 30 s
  while it runs, and when it ends (with the seconds, also kept in
  ``build.json``).

``python -m qlinear_pass.kernels.cutlass_build [--compile-only] [FAMILY ...]``
builds ahead of time; ``--compile-only`` runs nvcc on every source without
linking against a CUDA torch (the CPU CI check).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

SOURCE_DIR = Path(__file__).with_name("cutlass")
#: family -> its CUDA translation units (one per output dtype)
FAMILIES = {
    "fp8": ("fp8_bf16.cu", "fp8_f16.cu"),
    "int8": ("int8_bf16.cu", "int8_f16.cu"),
    "fp8_block": ("fp8_block_bf16.cu", "fp8_block_f16.cu"),
    "w4a16": ("w4a16_bf16.cu", "w4a16_f16.cu"),
    "int8_wo": ("int8_wo_bf16.cu", "int8_wo_f16.cu"),
    "fp8_wo": ("fp8_wo_bf16.cu", "fp8_wo_f16.cu"),
}
HEADERS = ("qlp_gemm.h", "qlp_gemm.cuh", "bindings.cpp")
#: sm90a kernels with CUTLASS 3.x/4.x collectives need CUDA 12.3 or newer
MIN_NVCC = (12, 3)
ARCH_FLAG = "-gencode=arch=compute_90a,code=sm_90a"
#: torch.utils.cpp_extension adds the C++ standard its headers need (C++17 for torch 2.11, C++20 later)
NVCC_FLAGS = (
    "-O3", ARCH_FLAG, "-DNDEBUG", "--expt-relaxed-constexpr", "--expt-extended-lambda",
    # torch's defaults hide the half/bfloat16 operators that CUTLASS's numeric types use
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
)
CXX_FLAGS = ("-O3",)
#: the standards of the compile-only check: the sources' own, and the binding's under the newest torch
CHECK_STD_CU, CHECK_STD_CXX = "-std=c++17", "-std=c++20"
INSTALL_HEADERS = "pip install nvidia-cutlass, or set QLINEAR_PASS_CUTLASS_DIR to a CUTLASS checkout"
#: seconds between "still building" lines
HEARTBEAT_S = 30.0


def _say(msg: str) -> None:
    print(f"qlinear_pass: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """Where built kernels are kept: ``$QLINEAR_PASS_CACHE_DIR`` or ``~/.cache/qlinear_pass``."""
    return Path(os.environ.get("QLINEAR_PASS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "qlinear_pass"))


def cache_dir() -> Path:
    return cache_root() / "cutlass"


# --- what the build needs ------------------------------------------------------


def cutlass_include() -> tuple[Optional[Path], str]:
    """The CUTLASS include folder (holding ``cute/`` and ``cutlass/``), or None and why not."""
    override = os.environ.get("QLINEAR_PASS_CUTLASS_DIR")
    if override:
        candidates = [Path(override) / "include", Path(override)]
        where = f"QLINEAR_PASS_CUTLASS_DIR={override}"
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return None, f"the CUTLASS headers are not installed ({INSTALL_HEADERS})"
        candidates = [Path(p) / "source" / "include" for p in spec.submodule_search_locations]
        where = "the nvidia-cutlass package"
    needed = ("cute/tensor.hpp", "cutlass/gemm/collective/collective_builder.hpp",
              "cutlass/gemm/collective/sm90_mma_tma_gmma_ss_warpspecialized_fp8_blockwise_scaling.hpp")
    for inc in candidates:
        if all((inc / f).is_file() for f in needed):
            return inc, ""
    return None, (f"{where} has no CUTLASS 3.x headers with sm90 blockwise FP8 "
                  f"(looked for {needed[-1]} under {', '.join(map(str, candidates))}; {INSTALL_HEADERS})")


def cutlass_version(include: Path) -> str:
    text = (include / "cutlass" / "version.h").read_text(errors="replace") if (include / "cutlass" / "version.h").is_file() else ""
    parts = [re.search(rf"#define CUTLASS_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else "unknown"


def _cuda_home() -> Optional[str]:
    """The CUDA toolkit folder, looked up as torch.utils.cpp_extension does (CUDA_HOME, CUDA_PATH,
    nvcc on PATH, /usr/local/cuda), when it holds nvcc and the headers.  (Importing cpp_extension
    for its answer costs up to half a second of every compile; the build itself imports it.)"""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    found = shutil.which("nvcc")
    if found:
        candidates.append(str(Path(found).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


@functools.lru_cache(maxsize=None)
def nvcc(minimum: tuple[int, int] = MIN_NVCC, purpose: str = "sm90a CUTLASS kernels") -> tuple[Optional[str], Optional[tuple[int, int]], str]:
    """(path, (major, minor), why-not): the nvcc that torch.utils.cpp_extension will use, if it is
    at least ``minimum`` (the version ``purpose`` needs)."""
    home = _cuda_home()
    path = os.path.join(home, "bin", "nvcc") if home else None
    if not path or not os.path.isfile(path):
        return None, None, "nvcc was not found (install the CUDA toolkit, set CUDA_HOME or put nvcc on PATH)"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, None, f"{path} --version failed: {exc}"
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        return None, None, f"could not read the CUDA version from {path} --version"
    version = (int(m.group(1)), int(m.group(2)))
    if version < minimum:
        return None, version, (f"nvcc {version[0]}.{version[1]} at {path} is too old for {purpose} "
                               f"(needs {minimum[0]}.{minimum[1]} or newer)")
    return path, version, ""


def ninja_available() -> bool:
    """Is ninja on PATH? (What torch.utils.cpp_extension runs; a lookup, not a subprocess per layer.)"""
    return shutil.which("ninja") is not None


def toolchain_status() -> tuple[bool, str]:
    """Can this machine build the kernels? (Not: can it run them; that is the device's question.)"""
    import torch

    if torch.version.cuda is None:
        return False, f"this torch ({torch.__version__}) is built without CUDA"
    path, version, why = nvcc()
    if path is None:
        return False, why
    if str(version[0]) != torch.version.cuda.split(".")[0]:
        return False, (f"nvcc {version[0]}.{version[1]} does not match the CUDA {torch.version.cuda} this torch "
                       "was built with (torch.utils.cpp_extension refuses a different major version)")
    inc, why = cutlass_include()
    if inc is None:
        return False, why
    if not ninja_available():
        return False, "ninja is not installed (pip install ninja); torch.utils.cpp_extension builds with it"
    return True, ""


# --- keys, locks, progress -------------------------------------------------------


def build_key(family: str, include: Path) -> str:
    import torch

    _, version, _ = nvcc()
    h = hashlib.sha256()
    for name in (*HEADERS, *FAMILIES[family]):
        h.update(name.encode())
        h.update((SOURCE_DIR / name).read_bytes())
    h.update(repr((NVCC_FLAGS, CXX_FLAGS, cutlass_version(include), version, torch.__version__,
                   torch.version.cuda, sys.version_info[:2])).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path, what: str):
    """Hold an exclusive lock on ``path`` (waiting, and saying so, while another process holds it)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process that is building {what} (lock {path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _heartbeat(what: str):
    """Print a line every HEARTBEAT_S seconds until the block ends."""
    start = time.monotonic()
    done = threading.Event()

    def beat():
        while not done.wait(HEARTBEAT_S):
            _say(f"still building {what} ({time.monotonic() - start:.0f} s)")

    t = threading.Thread(target=beat, name="qlinear_pass-build-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


# --- building and loading ----------------------------------------------------------


def _family_define(family: str) -> str:
    return f"-DQLP_FAMILY_{family.upper()}"


def _import_built(name: str, folder: Path):
    so = next((p for p in folder.glob(f"{name}*.so")), None)
    if so is None:
        return None
    spec = importlib.util.spec_from_file_location(name, so)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_loaded: dict = {}
_load_lock = threading.Lock()


def load(family: str):
    """The extension module of ``family``, built first if this machine has not built it yet."""
    if family not in FAMILIES:
        raise ValueError(f"unknown CUTLASS kernel family {family!r} (known: {', '.join(FAMILIES)})")
    with _load_lock:
        if family in _loaded:
            return _loaded[family]
        ok, why = toolchain_status()
        if not ok:
            raise RuntimeError(f"qlinear_pass cannot build the CUTLASS {family} kernels: {why}")
        include, _ = cutlass_include()
        key = build_key(family, include)
        name = f"qlp_cutlass_{family}_{key}"
        folder = cache_dir() / f"{family}-{key}"
        what = f"the CUTLASS {family} kernels"
        with _locked(folder.with_suffix(".lock"), what):
            module = _import_built(name, folder) if (folder / "build.json").is_file() else None
            if module is None:
                module = _build(family, name, folder, include, what)
        _loaded[family] = module
        return module


def _build(family: str, name: str, folder: Path, include: Path, what: str):
    from torch.utils import cpp_extension

    folder.mkdir(parents=True, exist_ok=True)
    _say(f"building {what} for sm90a with nvcc (first use on this machine only, a few minutes; "
         f"cached under {folder})")
    start = time.monotonic()
    define = _family_define(family)
    verbose = os.environ.get("QLINEAR_PASS_VERBOSE_BUILD", "0") not in ("", "0")
    with _heartbeat(what):
        module = cpp_extension.load(
            name=name,
            sources=[str(SOURCE_DIR / "bindings.cpp"), *(str(SOURCE_DIR / f) for f in FAMILIES[family])],
            extra_cflags=[*CXX_FLAGS, define],
            extra_cuda_cflags=[*NVCC_FLAGS, define],
            extra_include_paths=[str(include), str(SOURCE_DIR), os.path.join(_cuda_home(), "include")],
            build_directory=str(folder),
            verbose=verbose,
        )
    seconds = time.monotonic() - start
    (folder / "build.json").write_text(json.dumps({
        "family": family, "seconds": round(seconds, 1), "nvcc": ".".join(map(str, nvcc()[1])),
        "cutlass": cutlass_version(include), "max_jobs": os.environ.get("MAX_JOBS") or os.cpu_count(),
    }, indent=1))
    _say(f"built {what} in {seconds:.0f} s")
    return module


def build_record(family: str) -> Optional[dict]:
    """What ``build.json`` says of this family's current build (None when not built)."""
    include, _ = cutlass_include()
    if include is None or nvcc()[0] is None:
        return None
    folder = cache_dir() / f"{family}-{build_key(family, include)}"
    try:
        return json.loads((folder / "build.json").read_text())
    except (OSError, ValueError):
        return None


# --- the compile-only check (no GPU, no CUDA torch) ---------------------------------------


def compile_only(families=tuple(FAMILIES), jobs: Optional[int] = None) -> dict:
    """Compile every translation unit of ``families`` with nvcc (and syntax-check the binding).

    Returns {source: seconds}; raises RuntimeError with nvcc's output when one fails.
    """
    from torch.utils import cpp_extension

    path, version, why = nvcc()
    if path is None:
        raise RuntimeError(why)
    include, why = cutlass_include()
    if include is None:
        raise RuntimeError(why)
    jobs = jobs or max(1, min(os.cpu_count() or 1, 4))
    home = _cuda_home()
    tasks = []
    with tempfile.TemporaryDirectory(prefix="qlp_cutlass_check_") as tmp:
        for family in families:
            define = _family_define(family)
            for cu in FAMILIES[family]:
                tasks.append((cu, [path, *cpp_extension.COMMON_NVCC_FLAGS, CHECK_STD_CU, *NVCC_FLAGS, define, f"-I{include}",
                                   f"-I{SOURCE_DIR}", "-c", str(SOURCE_DIR / cu), "-o", os.path.join(tmp, cu + ".o")]))
            cxx = os.environ.get("CXX", "c++")
            tasks.append((f"bindings.cpp ({family})", [
                cxx, "-fsyntax-only", CHECK_STD_CXX, *CXX_FLAGS, define, f"-DTORCH_EXTENSION_NAME=qlp_check_{family}",
                *(f"-I{p}" for p in cpp_extension.include_paths()), f"-I{os.path.join(home, 'include')}",
                f"-I{sysconfig.get_paths()['include']}", f"-I{SOURCE_DIR}", str(SOURCE_DIR / "bindings.cpp")]))
        times: dict = {}
        total = len(tasks)

        def run(task):
            label, cmd = task
            t0 = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            return label, cmd, proc, time.monotonic() - t0

        _say(f"compiling {total} CUTLASS sources for sm90a with nvcc {version[0]}.{version[1]} "
             f"({jobs} at a time, about a minute each)")
        failures = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(run, t) for t in tasks]
            for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                label, cmd, proc, secs = fut.result()
                times[label] = round(secs, 1)
                status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                _say(f"[{i}/{total}] {label}: {status} in {secs:.0f} s")
                if proc.returncode:
                    failures.append(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        if failures:
            raise RuntimeError("CUTLASS compile check failed:\n" + "\n".join(f[-6000:] for f in failures))
        return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qlinear_pass.kernels.cutlass_build",
                                 description="Build (or with --compile-only, just compile) the CUTLASS kernel families.")
    ap.add_argument("families", nargs="*", metavar="FAMILY", help=f"any of {', '.join(FAMILIES)} (default: all)")
    ap.add_argument("--compile-only", action="store_true", help="nvcc -c every source; needs no GPU or CUDA torch")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compilers for --compile-only")
    args = ap.parse_args(argv)
    families = args.families or list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown family {', '.join(unknown)} (known: {', '.join(FAMILIES)})")
    if args.compile_only:
        times = compile_only(families, args.jobs)
        print(json.dumps(times, indent=1))
        return 0
    for family in families:
        load(family)
        print(json.dumps(build_record(family)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
