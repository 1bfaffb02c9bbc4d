"""benchmarks/ncu_cuda_w4a16.py: the driver Nsight Compute profiles the w4a16 decode kernel through."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ncu_cuda_w4a16.py"


def _load():
    spec = importlib.util.spec_from_file_location("ncu_cuda_w4a16", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_a_gpu_it_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _load().main(["1", "4096", "1024"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["0", "4096", "1024"], ["1", "4096", "1024", "--calls", "0"]])
def test_rejects_empty_shapes(args):
    with pytest.raises(SystemExit) as e:
        _load().main(args)
    assert e.value.code == 2


@pytest.mark.gpu
@pytest.mark.parametrize("zero_points", [False, True])
def test_runs_the_kernel_on_gpu(zero_points):
    args = ["3", "256", "64", "--group-size", "64", "--calls", "2"] + (["--zero-points"] if zero_points else [])
    assert _load().main(args) == 0
