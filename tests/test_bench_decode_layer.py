"""benchmarks/bench_decode_layer.py: the order it runs a layer's calls in, its plot, and its command
line without a GPU."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_decode_layer as B  # noqa: E402


def test_a_sequence_runs_the_layers_calls_in_order():
    ran = []
    calls = {name: (lambda n: lambda: ran.append(n))(name) for name in ("qkv", "o_proj", "gate_up", "down")}
    B.sequence(calls)()
    assert ran == ["qkv", "o_proj", "gate_up", "down"]
    ran.clear()
    B.sequence(calls, ("o_proj", "gate_up"))()
    assert ran == ["o_proj", "gate_up"]


def test_the_plot_names_the_card(tmp_path):
    res = {"card": "NVIDIA H200", "layers": 32, "us": {"sequence fused": 45.9, "alone fused qkv": 8.1}}
    path = tmp_path / "layer.png"
    drawn = B.plot(res, path)
    assert drawn == (importlib.util.find_spec("matplotlib") is not None)
    assert path.exists() == drawn


def test_without_a_gpu_it_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert B.main(["--out", str(tmp_path)]) == 2
    assert "no GPU here" in capsys.readouterr().err


def test_calls_pass_their_config_and_early_start(monkeypatch):
    seen = []
    monkeypatch.setattr(B.CW, "w4a16_decode_group",
                        lambda *args, row_tiles=None, warps=None, pdl=None, **kw: seen.append((row_tiles, warps, pdl, kw.get("prologue"))))
    lin = type("Lin", (), {"qkv": [], "o": None, "gate_up": [], "down": None})()
    a = type("Act", (), {"x": None, "attn": None, "norm1": None, "norm2": None, "gate": None, "up": None})()
    cs = B.calls(lin, a, True, pdl=True, config={"qkv": (2, 8)})
    B.sequence(cs)()
    assert seen == [(2, 8, True, "rmsnorm"), (None, None, True, None), (None, None, True, "rmsnorm"), (None, None, True, "silu_mul")]


def test_an_unknown_variant_set_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit):
        B.main(["--out", str(tmp_path), "--set", "no_such_set"])
    assert "no set 'no_such_set'" in capsys.readouterr().err


def test_a_set_of_shape_wide_tiles_is_refused_here(capsys):
    with pytest.raises(SystemExit):
        B.main(["--set", "rows"])
    assert "time it with bench_cuda_ring.py --set rows" in capsys.readouterr().err
