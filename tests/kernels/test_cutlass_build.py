"""Building the CUTLASS kernels: cache keys, the lock, progress lines, errors; and a compile-only
build of every source with this machine's nvcc (no GPU needed)."""
import json
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from qlinear_pass.kernels import cutlass_build as B


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QLINEAR_PASS_CACHE_DIR", str(tmp_path))
    assert B.cache_dir() == tmp_path / "cutlass"
    monkeypatch.delenv("QLINEAR_PASS_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert B.cache_dir() == tmp_path / "home" / ".cache" / "qlinear_pass" / "cutlass"


def test_every_family_has_its_sources():
    for family, sources in B.FAMILIES.items():
        for name in (*B.HEADERS, *sources):
            assert (B.SOURCE_DIR / name).is_file(), name
        for cu in sources:
            assert "QLP_DEFINE_FAMILY(qlp::" in (B.SOURCE_DIR / cu).read_text(), cu


def test_build_key_changes_with_sources_and_versions(monkeypatch, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(B.SOURCE_DIR, src)
    monkeypatch.setattr(B, "SOURCE_DIR", src)
    monkeypatch.setattr(B, "nvcc", lambda: ("/x/nvcc", (13, 0), ""))
    inc = tmp_path / "include"
    key = B.build_key("fp8", inc)
    assert key == B.build_key("fp8", inc) and key != B.build_key("int8", inc)
    (src / "qlp_gemm.cuh").write_text((src / "qlp_gemm.cuh").read_text() + "\n// changed\n")
    changed = B.build_key("fp8", inc)
    assert changed != key
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert B.build_key("fp8", inc) != changed
    monkeypatch.setattr(B, "nvcc", lambda: ("/x/nvcc", (13, 1), ""))
    assert len({key, changed, B.build_key("fp8", inc)}) == 3


def test_lock_makes_a_second_builder_wait_and_say_so(tmp_path, capsys):
    lock = tmp_path / "fp8.lock"
    order = []
    held = threading.Event()

    def first():
        with B._locked(lock, "first"):
            held.set()
            time.sleep(0.3)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    held.wait()
    with B._locked(lock, "the CUTLASS fp8 kernels"):
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]
    assert "waiting for another process that is building the CUTLASS fp8 kernels" in capsys.readouterr().err


def test_heartbeat_reports_progress(monkeypatch, capsys):
    monkeypatch.setattr(B, "HEARTBEAT_S", 0.05)
    with B._heartbeat("the CUTLASS int8 kernels"):
        time.sleep(0.18)
    err = capsys.readouterr().err
    assert err.count("still building the CUTLASS int8 kernels") >= 2


def test_load_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(B, "toolchain_status", lambda: (False, "nvcc was not found (install the CUDA toolkit, ...)"))
    monkeypatch.setattr(B, "_loaded", {})
    with pytest.raises(RuntimeError, match="cannot build the CUTLASS fp8_block kernels: nvcc was not found"):
        B.load("fp8_block")
    with pytest.raises(ValueError, match="unknown CUTLASS kernel family 'fp4'"):
        B.load("fp4")


def test_load_builds_once_with_the_right_flags_and_records_it(monkeypatch, tmp_path, capsys):
    import torch.utils.cpp_extension as ce

    monkeypatch.setenv("QLINEAR_PASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(B, "_loaded", {})
    monkeypatch.setattr(B, "toolchain_status", lambda: (True, ""))
    monkeypatch.setattr(B, "cutlass_include", lambda: (tmp_path / "include", ""))
    monkeypatch.setattr(B, "nvcc", lambda: ("/x/nvcc", (13, 0), ""))
    monkeypatch.setattr(B, "_cuda_home", lambda: "/x")
    calls = []

    def fake_load(**kw):
        calls.append(kw)
        return SimpleNamespace(family="int8")

    monkeypatch.setattr(ce, "load", fake_load)
    mod = B.load("int8")
    assert mod.family == "int8" and B.load("int8") is mod and len(calls) == 1
    kw = calls[0]
    assert kw["name"].startswith("qlp_cutlass_int8_") and kw["build_directory"].startswith(str(tmp_path / "cutlass" / "int8-"))
    assert [p.rsplit("/", 1)[-1] for p in kw["sources"]] == ["bindings.cpp", "int8_bf16.cu", "int8_f16.cu"]
    assert B.ARCH_FLAG in kw["extra_cuda_cflags"] and "-DQLP_FAMILY_INT8" in kw["extra_cuda_cflags"]
    assert "-DQLP_FAMILY_INT8" in kw["extra_cflags"] and str(tmp_path / "include") in kw["extra_include_paths"]
    record = json.loads((tmp_path / "cutlass" / kw["build_directory"].rsplit("/", 1)[-1] / "build.json").read_text())
    assert record["family"] == "int8" and record["seconds"] >= 0 and record["nvcc"] == "13.0"
    assert B.build_record("int8") == record
    err = capsys.readouterr().err
    assert "building the CUTLASS int8 kernels for sm90a" in err and "built the CUTLASS int8 kernels in" in err


def test_arch_flag_replaces_torchs_own():
    """cpp_extension adds no -gencode of its own when a flag names an arch (so no plain sm_90 build)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    assert _get_cuda_arch_flags([*B.NVCC_FLAGS]) == []


def _toolchain_or_skip():
    path, _, why = B.nvcc()
    if path is None:
        pytest.skip(why)
    inc, why = B.cutlass_include()
    if inc is None:
        pytest.skip(why)


@pytest.mark.slow
def test_compile_only_every_source():
    """nvcc compiles every translation unit for sm_90a, and the binding passes the C++ compiler.

    About a minute per source; the CPU CI machine has nvcc and the nvidia-cutlass headers."""
    _toolchain_or_skip()
    times = B.compile_only(jobs=2)
    expected = {cu for sources in B.FAMILIES.values() for cu in sources}
    assert expected <= set(times)
    assert sum(1 for label in times if label.startswith("bindings.cpp")) == len(B.FAMILIES)
