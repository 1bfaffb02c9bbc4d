"""benchmarks/trace_decode_layer.py: decoding the kernel's trace records, grouping them into
launches, the per-launch times, the plot and the command line without a GPU."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import trace_decode_layer as T  # noqa: E402


def record(t, sm=0, block=0, grid=1, n=4096, k=4096, nseg=1, prologue=0, ntiles=1):
    """A record as the kernel writes it: ``t`` the marks' ns (None: not written), the SM clock
    counting 1.98 cycles a ns from the start."""
    words = []
    for i in range(T.MARKS):
        v = t[i] if i < len(t) else None
        words += [v or 0, round((v - t[0]) * 1.98) + 7 if v else 0]
    words.append(sm | block << 16 | grid << 32)
    words.append(n | k << 20 | nseg << 40 | prologue << 44 | ntiles << 48)
    return words


def marks(start, prologue, first, tiles, exit_, setup=None, issued=None, norm=None, waited=None):
    t = [start, prologue, first] + list(tiles) + [None] * (T.TILE_MARKS - len(tiles))
    return t + [exit_, setup, issued, norm, waited]


@given(st.integers(0, 131), st.integers(0, 1000), st.integers(1, 1000), st.sampled_from([1024, 4096, 14336, 28672]),
       st.sampled_from([4096, 14336]), st.integers(1, 3), st.integers(0, 2), st.integers(1, 8))
@example(131, 999, 1000, 28672, 14336, 3, 2, 8)
def test_a_record_decodes_to_what_was_written(sm, block, grid, n, k, nseg, prologue, ntiles):
    t = marks(10**18, 10**18 + 900, 10**18 + 1500, [10**18 + 3000 * (j + 1) for j in range(ntiles)], 10**18 + 30000)
    r = T.decode(record(t, sm, block, grid, n, k, nseg, prologue, ntiles))
    assert (r["sm"], r["block"], r["grid"], r["n"], r["k"], r["nseg"], r["ntiles"]) == (sm, block, grid, n, k, nseg, ntiles)
    assert r["prologue"] == T.PROLOGUES[prologue]
    assert r["t"] == t
    assert r["c"][T.START] == 7 and r["c"][T.EXIT] == round(30000 * 1.98) + 7 and r["c"][T.SETUP] is None


def test_a_record_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="34 words"):
        T.decode([0] * 10)


def test_calls_are_named_by_their_launch_shape():
    names = [T.call_name(T.decode(record(marks(1, 2, 3, [4], 5), n=n, k=k, nseg=s)))
             for n, k, s in ((4096, 4096, 3), (4096, 4096, 1), (14336, 4096, 2), (4096, 14336, 1), (1024, 4096, 1))]
    assert names == ["qkv", "o_proj", "gate_up", "down", "n1024_k4096"]


def two_launches():
    """o_proj (2 CTAs) then down (3 CTAs), overlapping by one CTA's start, shuffled."""
    o = [record(marks(1000 + 100 * b, 1500 + 100 * b, 2000 + 100 * b, [5000 + 100 * b, 8000 + 100 * b], 8100 + 100 * b,
                      setup=1200 + 100 * b, issued=1300 + 100 * b, waited=1350 + 100 * b),
                block=b, grid=2, n=4096, k=4096, ntiles=2) for b in range(2)]
    d = [record(marks(8150 + 50 * b, 9000, 9500 + 200 * b, [15000 + 1000 * b], 15100 + 1000 * b),
                block=b, grid=3, n=4096, k=14336, prologue=2) for b in range(3)]
    return [T.decode(r) for r in (d[2], o[1], d[0], o[0], d[1])]


def test_records_group_into_launches_in_start_order():
    launches = T.group_launches(two_launches())
    assert [len(cs) for cs in launches] == [2, 3]
    assert [T.call_name(cs[0]) for cs in launches] == ["o_proj", "down"]


def test_a_launch_missing_ctas_is_an_error():
    recs = two_launches()[1:]  # one down CTA lost
    with pytest.raises(ValueError, match="2 of 3 CTAs of down"):
        T.group_launches(recs)
    unfinished = two_launches()
    unfinished[0]["t"][T.EXIT] = None
    with pytest.raises(ValueError, match="no start or no exit"):
        T.group_launches(unfinished)


def test_launch_times_in_microseconds():
    s = T.summarize(T.group_launches(two_launches()))
    o, d = s["by_call"]["o_proj"], s["by_call"]["down"]
    assert o["gap"] is None and o["ctas"] == 2 and o["tiles"] == "2-2"
    assert o["start_spread"] == pytest.approx(0.1)
    assert o["prologue"] == pytest.approx(0.5)
    assert (o["setup"], o["issued"], o["waited"], o["norm"]) == (pytest.approx(0.2), pytest.approx(0.3), pytest.approx(0.35), None)
    assert o["sm_mhz"] == pytest.approx(1980, rel=1e-3)
    assert o["first_chunk"] == pytest.approx(1.0) and o["first_chunk_max"] == pytest.approx(1.0)
    assert o["tiles_us"] == pytest.approx([3.5, 3.0])  # tile 0 from the prologue's end
    assert o["span"] == pytest.approx(7.2) and o["exit_spread"] == pytest.approx(0.1)
    assert d["gap"] == pytest.approx(-0.05)  # the first down CTA started 50 ns before o_proj's last exit
    assert d["prologue"] == pytest.approx(0.8)  # median of 850, 800, 750 ns
    assert d["tail"] == pytest.approx(1.0) and d["exit_spread"] == pytest.approx(2.0)
    assert T.timer_step(two_launches()) == 50.0
    lines = T.table(s)
    assert lines[1].startswith("o_proj") and lines[2].startswith("down") and len(lines) == 3


def test_the_plot_names_the_card(tmp_path):
    launches = T.group_launches(two_launches())
    s = T.summarize(launches)
    s["us_per_run"] = 14.1
    s["one_layer"] = [[{"block": c["block"], "sm": c["sm"], "t": c["t"]} for c in cs] for cs in launches]
    path = tmp_path / "trace.png"
    drawn = T.plot({"card": "NVIDIA H200", "runs": {"fused": s}}, path)
    assert drawn == (importlib.util.find_spec("matplotlib") is not None)
    assert path.exists() == drawn


def test_without_a_gpu_it_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert T.main(["--out", str(tmp_path)]) == 2
    assert "no GPU here" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--define", "NOT_OURS=1"], "QLP_NAME=VALUE"),
    (["--define", "QLP_LATE_TRIGGER"], "QLP_NAME=VALUE"),
    (["--runs", "fused,sideways"], "no sideways"),
])
def test_bad_arguments_are_refused(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        T.main(["--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
