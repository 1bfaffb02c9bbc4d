"""benchmarks/bench_decode.py: which row tiles it times our CUDA kernels with, and the summary and
plot it writes from a run's result (a made-up one: no GPU needed)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_decode as B  # noqa: E402


def test_48_row_tiles_are_timed_where_a_kernel_takes_them():
    assert [m for m in (1, 2, 8, 9, 16) if B.serves_48_rows("w4a16", m)] == [1, 2, 8]
    assert [m for m in (1, 8, 9, 16) if B.serves_48_rows("int8_weight_only", m)] == [9, 16]
    assert not B.serves_48_rows("fp8_block", 16)


def result(rule_rows=3):
    case = {"format": "w4a16 g128", "k": 4096, "n": 6144, "m": 1, "weight_bytes": 13.0e6,
            "default": {"time_us": 10.8, "of_copy": 0.45}, "best": {"time_us": 10.8, "config": "fma", "rel_err": 3e-4},
            "peers_us": {"bf16 F.linear": 15.6, "cuda_w4a16 r1": 7.2, "cuda_w4a16 r2": 7.3, "cuda_w4a16 r3": 6.5},
            "cuda_kernel": "cuda_w4a16", "cuda_row_tiles": rule_rows}
    return {"device": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "copy_bytes_per_s": 2.77e12, "cases": [case]}


def test_the_summary_shows_the_rules_tiles(tmp_path):
    path = tmp_path / "summary.md"
    B.write_summary(result(), path)
    row = path.read_text().splitlines()[-1]
    assert "cuda_w4a16 6.5 (r3) | 72% | 2.40 |" in row  # 13 MB / 6.5 us / 2.77 TB/s; 15.6 / 6.5
    B.write_summary(result(rule_rows=4), path)  # tiles it did not time: the cells stay empty
    assert path.read_text().splitlines()[-1].endswith("|  |  |  |")


def test_the_plot_names_the_card_and_skips_untimed_cases(tmp_path):
    path = tmp_path / "decode.png"
    drawn = B.plot_decode(result(), path)
    assert drawn == (importlib.util.find_spec("matplotlib") is not None) == path.exists()
    assert B.plot_decode(result(rule_rows=4), tmp_path / "none.png") is False


def test_a_prefill_row_shows_what_auto_runs():
    case = {"format": "int8_weight_only", "k": 4096, "n": 6144, "m": 16, "weight_stationary_config": None,
            "auto": "cuda_w8a16", "cutlass_config": "128x32x64 cooperative stream-K",
            "us": {"bf16 F.linear": 15.8, "auto": 11.1, "cutlass_int8_weight_only": 19.0, "cuda_w8a16": 11.1}}
    cells = [c.strip() for c in B.prefill_row(case).strip("|").split("|")]
    assert cells[5] == "11.1 (1.42x)"  # auto, first of the paths
    assert cells[5 + B.PREFILL_PATHS.index("cuda_w8a16")] == "11.1 (1.42x)"
    assert cells[5 + B.PREFILL_PATHS.index("cuda_w4a16")] == "-"
    assert cells[-3:] == ["cuda_w8a16", "128x32x64 cooperative stream-K", "None"]


def test_paths_that_leave_a_kernel_out_do_not_build_it():
    kernel, others = "cutlass_int8_weight_only", ["weight-stationary", "triton GEMM", "dequant + cuBLAS", "cuda_w8a16"]
    assert B.keeps_kernel([], kernel, others)
    assert B.keeps_kernel(["cuda", "cutlass"], kernel, others)
    assert B.keeps_kernel(["cutlass_int8_weight_only 128x32x128 cooperative"], kernel, others)
    assert B.keeps_kernel(["x32x128 cooperative stream-K"], kernel, others)  # a configuration
    assert not B.keeps_kernel(["cuda", "dequant"], kernel, others)
