"""benchmarks/op_host.py and prefill_host.py: what they do without a GPU, and the idle-time summary."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name, argv", [("op_host", []), ("prefill_host", ["fp8_block/auto"])])
def test_needs_a_gpu_and_says_so(monkeypatch, capsys, name, argv):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _load(name).main(argv) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_gaps_without_gpu_work_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _load("prefill_host").gpu_gaps("cpu call", lambda: torch.ones(4).sum())
    assert "the profiler saw no GPU work" in capsys.readouterr().out
