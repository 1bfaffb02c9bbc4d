"""Building our CUDA kernels: cache folders and keys, the build records, errors that name the cause."""
import json

import pytest

from qlinear_pass.kernels import cuda_build as CB


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QLINEAR_PASS_CACHE_DIR", str(tmp_path))
    assert CB.cache_dir() == tmp_path / "cuda"


def test_every_library_has_its_source():
    for library, source in CB.LIBRARIES.items():
        assert (CB.SOURCE_DIR / source).is_file(), library
        assert 'extern "C"' in (CB.SOURCE_DIR / source).read_text()


def test_build_key_changes_with_source_arch_and_nvcc(monkeypatch, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(CB.SOURCE_DIR, src)
    monkeypatch.setattr(CB, "SOURCE_DIR", src)
    monkeypatch.setattr(CB, "nvcc", lambda *a: ("/x/nvcc", (13, 0), ""))
    key = CB.build_key("w4a16_decode", (9, 0))
    assert key == CB.build_key("w4a16_decode", (9, 0)) and key != CB.build_key("w4a16_decode", (8, 0))
    cu = src / CB.LIBRARIES["w4a16_decode"]
    cu.write_text(cu.read_text() + "\n// changed\n")
    changed = CB.build_key("w4a16_decode", (9, 0))
    assert changed != key
    header = src / "common.cuh"  # a shared header counts too
    header.write_text(header.read_text() + "\n// changed\n")
    assert CB.build_key("w4a16_decode", (9, 0)) not in (key, changed)
    changed = CB.build_key("w4a16_decode", (9, 0))
    monkeypatch.setattr(CB, "nvcc", lambda *a: ("/x/nvcc", (13, 1), ""))
    assert CB.build_key("w4a16_decode", (9, 0)) not in (key, changed)


def test_arch_flag():
    assert CB.arch_flag((9, 0)) == "-gencode=arch=compute_90,code=sm_90"
    assert CB.arch_flag((8, 6)) == "-gencode=arch=compute_86,code=sm_86"


def test_built_reads_the_records(monkeypatch, tmp_path):
    monkeypatch.setenv("QLINEAR_PASS_CACHE_DIR", str(tmp_path))
    assert CB.built() == []
    folder = tmp_path / "cuda" / "w4a16_decode-sm90-abc"
    folder.mkdir(parents=True)
    (folder / "build.json").write_text(json.dumps({"library": "w4a16_decode", "arch": "sm_90", "seconds": 14.2}))
    (tmp_path / "cuda" / "broken").mkdir()
    (tmp_path / "cuda" / "broken" / "build.json").write_text("{not json")
    assert CB.built() == [{"library": "w4a16_decode", "arch": "sm_90", "seconds": 14.2}]


def test_load_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(CB, "_loaded", {})
    with pytest.raises(ValueError, match="unknown CUDA library 'nope'"):
        CB.load("nope", (9, 0))
    monkeypatch.setattr(CB, "toolchain", lambda: (None, "nvcc was not found (install the CUDA toolkit, ...)"))
    with pytest.raises(RuntimeError, match="cannot build its CUDA w4a16_decode kernels: nvcc was not found"):
        CB.load("w4a16_decode", (9, 0))


def test_a_failed_build_shows_nvcc_output(monkeypatch, tmp_path):
    monkeypatch.setenv("QLINEAR_PASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(CB, "_loaded", {})
    monkeypatch.setattr(CB, "toolchain", lambda: ("/bin/false", ""))
    monkeypatch.setattr(CB, "nvcc", lambda *a: ("/bin/false", (13, 0), ""))
    with pytest.raises(RuntimeError, match="building the CUDA w4a16_decode kernels failed"):
        CB.load("w4a16_decode", (9, 0))
    assert CB.built() == []  # nothing recorded, so the next call builds again


def test_main_rejects_a_bad_arch(capsys):
    with pytest.raises(SystemExit):
        CB.main(["--compile-only", "--arch", "hopper"])
    assert "--arch takes sm_XY" in capsys.readouterr().err


def test_bind_checks_the_abi_and_declares_the_launch_once():
    import ctypes

    class Fn:
        def __init__(self, value=0):
            self.value = value

        def __call__(self):
            return self.value

    class Params(ctypes.Structure):
        _fields_ = [("x", ctypes.c_void_p), ("m", ctypes.c_int)]

    lib = type("Lib", (), {})()
    lib.qlp_demo_abi, lib.qlp_demo_decode = Fn(16 * 1000 + 3 * 10 + 2), Fn()
    with pytest.raises(RuntimeError, match="ABI 16032 != 16031"):
        CB.bind(lib, "demo", Params, 3, 1, [ctypes.c_int])
    assert CB.bind(lib, "demo", Params, 3, 2, [ctypes.c_int]) is lib
    assert lib.qlp_demo_decode.argtypes == [ctypes.POINTER(Params), ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.qlp_demo_abi.value = 0  # declared once: not asked again
    assert CB.bind(lib, "demo", Params, 3, 2, [ctypes.c_int]) is lib
