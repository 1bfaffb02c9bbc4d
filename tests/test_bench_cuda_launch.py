"""benchmarks/bench_cuda_launch.py: which knob values it times where, and its command line without a GPU."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_cuda_launch as B  # noqa: E402


def test_it_times_only_what_the_kernels_serve():
    assert B.serves("warps", 4, "w4a16", 1) and not B.serves("warps", 4, "w4a16", 8)  # 4 warps: one token (w4a16)
    assert B.serves("warps", 4, "int8_weight_only", 8) and B.serves("warps", 4, "int8_weight_only", 16)  # any M (8-bit)
    assert B.serves("rows", 3, "int8_weight_only", 16) and B.serves("rows", 3, "fp8_rowwise", 9)
    assert not B.serves("rows", 3, "int8_weight_only", 8)  # 48 rows: above 8 tokens
    assert not B.serves("rows", 3, "fp8_block", 16)
    assert B.serves("rows", 3, "w4a16", 1) and B.serves("rows", 3, "w4a16", 8)  # w4a16: 1 to 8 tokens
    assert not B.serves("rows", 3, "w4a16", 16)
    assert all(B.serves(knob, None, "w4a16", 16) for knob in B.KNOBS)  # the rule always


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert B.main(["--knob", "rows"]) == 2
    assert "bench_cuda_launch.py needs a CUDA GPU" in capsys.readouterr().err
