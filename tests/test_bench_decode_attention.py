"""benchmarks/bench_decode_attention.py: every attention path agrees with float32 SDPA on small
shapes, and the command line runs and reports on the CPU."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_decode_attention as A  # noqa: E402


@st.composite
def attention_cases(draw):
    """(batch, heads, kv_heads, slots, position): 1-4 query heads a KV head, the query anywhere in the cache."""
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    slots = draw(st.integers(1, 48))
    return draw(st.integers(1, 3)), heads, kv_heads, slots, draw(st.integers(0, slots - 1))


@given(attention_cases(), st.sampled_from(sorted({fn for fn, _ in A.PATHS.values()}, key=lambda f: f.__name__)))
@example((1, 8, 2, 64, 0), A.matmul_path)  # only the first slot visible
@example((2, 4, 1, 33, 32), A.flex_path)  # every slot visible, an odd cache length
@example((1, 4, 4, 1, 0), A.sdpa_path)  # one slot, one query head a KV head
def test_each_path_matches_float32_sdpa(case, fn):
    batch, heads, kv_heads, slots, position = case
    q, caches, pos = A.make_inputs(batch, 1, heads, kv_heads, slots, 16, position, "cpu", torch.bfloat16, seed=slots)
    k, v = caches[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention's note that it runs uncompiled
        out = fn(q, k, v, pos)
    ref = A.reference(q, k, v, pos)
    assert out.shape == ref.shape == (batch, heads, 1, 16)
    assert (out.float() - ref).abs().max().item() <= 0.02 * max(1.0, ref.abs().max().item())


def test_masked_slots_do_not_count():
    """Changing the cache past the query's position changes no path's output."""
    q, caches, pos = A.make_inputs(1, 1, 4, 2, 16, 8, 5, "cpu", torch.bfloat16)
    k, v = caches[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 6:] = 100.0
    v2[:, :, 6:] = -100.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fn, _ in A.PATHS.values():
            assert torch.equal(fn(q, k, v, pos), fn(q, k2, v2, pos)), fn.__name__


def test_cpu_run_writes_every_path(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = A.main(["--device", "cpu", "--out", str(tmp_path), "--batch-sizes", "1,2", "--slots", "24",
                     "--position", "23"])
    assert rc == 0
    res = json.loads((tmp_path / "bench_decode_attention.json").read_text())
    assert list(res["batches"]) == ["1", "2"]
    for paths in res["batches"].values():
        assert list(paths) == list(A.PATHS)
        for r in paths.values():
            assert r["max_abs_err"] <= 0.02 * max(1.0, r["ref_max_abs"])
            assert "us_per_layer" not in r  # no timing claims on the CPU
    summary = (tmp_path / "summary.md").read_text()
    assert "| 2 | flex autotune | - |" in summary


@pytest.mark.parametrize("argv, message", [
    (["--paths", "matmul (bench_e2e),nope"], "unknown nope"),
    (["--position", "64", "--slots", "64"], "--position must be in [0, --slots)"),
    (["--layers", "0"], "must be >= 1"),
])
def test_bad_arguments_are_refused(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit):
        A.main(["--device", "cpu", "--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_make_inputs_refuses_a_position_outside_the_cache():
    with pytest.raises(ValueError, match="--position must be in"):
        A.make_inputs(1, 1, 4, 2, 8, 8, 8, "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        A.make_inputs(1, 1, 3, 2, 8, 8, 0, "cpu", torch.bfloat16)
