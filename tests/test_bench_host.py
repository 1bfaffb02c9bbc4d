"""benchmarks/op_host.py and prefill_host.py: what they do without a GPU, and the idle-time summary."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import op_host  # noqa: E402
import prefill_host  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
@pytest.mark.parametrize("mod, argv", [(op_host, []), (prefill_host, ["fp8_block/auto"])])
def test_needs_a_gpu_and_says_so(mod, argv, capsys):
    assert mod.main(argv) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_gaps_without_gpu_work_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks a call with no GPU work on a CPU-only machine")
    prefill_host.gpu_gaps("cpu call", lambda: torch.ones(4).sum())
    assert "the profiler saw no GPU work" in capsys.readouterr().out
