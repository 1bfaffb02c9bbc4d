"""benchmarks/bench_e2e.py: the model's math, the profile's bookkeeping, and a CPU run end to end."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import qlinear_pass as qp
from hypothesis import example, given
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_e2e.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_e2e", mod)
    spec.loader.exec_module(mod)
    return mod


E2E = _load()


def _settings():
    return E2E.settings_from(E2E.parse_args(["--device", "cpu", "--small"]))


# --- the model ----------------------------------------------------------------------------


@st.composite
def model_shapes(draw):
    kv = draw(st.sampled_from([1, 2]))
    rep = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16]))
    return E2E.ModelShape(
        hidden=kv * rep * head_dim,
        layers=draw(st.integers(1, 2)),
        heads=kv * rep,
        kv_heads=kv,
        intermediate=draw(st.sampled_from([32, 48])),
        vocab=draw(st.sampled_from([50, 97])),
    )


@given(shape=model_shapes(), tokens=st.integers(1, 6), seed=st.integers(0, 3))
@example(shape=E2E.ModelShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, vocab=50), tokens=5, seed=0)
def test_decode_step_by_step_matches_prefill(shape, tokens, seed):
    """Decoding token by token through the static cache (query heads folded per KV head, mask
    built from the position tensor) gives the logits of a causal prefill (KV heads repeated)."""
    settings = dataclasses.replace(_settings(), shape=shape, max_seq=16, seed=seed)
    model = E2E.build_model(shape, settings, torch.float32, None)
    ids = torch.randint(shape.vocab, (2, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        E2E.set_cache(model, 2, torch.float32)
        want = E2E.prefill_logits(model, E2E.layer_forward, ids, all_positions=True)
        E2E.set_cache(model, 2, torch.float32)
        steps = [
            E2E.decode_logits(model, E2E.layer_forward, ids[:, i : i + 1], model.positions[i : i + 1].clone())
            for i in range(tokens)
        ]
        got = torch.stack(steps, dim=1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_decode_attends_only_to_written_positions():
    """A value planted in the cache beyond the current position does not change the logits."""
    shape = E2E.ModelShape(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=48, vocab=50)
    settings = dataclasses.replace(_settings(), shape=shape, max_seq=16)
    model = E2E.build_model(shape, settings, torch.float32, None)
    tok = torch.tensor([[3]])
    pos = torch.tensor([2])
    with torch.no_grad():
        E2E.set_cache(model, 1, torch.float32)
        clean = E2E.decode_logits(model, E2E.layer_forward, tok, pos)
        E2E.set_cache(model, 1, torch.float32)
        model.layers[0].self_attn.v_cache[:, :, 3:] = 1e3
        dirty = E2E.decode_logits(model, E2E.layer_forward, tok, pos)
        model.layers[0].self_attn.v_cache[:, :, 1] = 1e3
        seen = E2E.decode_logits(model, E2E.layer_forward, tok, pos)
    torch.testing.assert_close(dirty, clean)
    assert not torch.allclose(seen, clean)


@st.composite
def attention_cases(draw):
    """Folded decode queries [B, KV, R, D], caches [B, KV, S, D] and positions to attend up to."""
    batch = draw(st.integers(1, 3))
    kv = draw(st.sampled_from([1, 2]))
    rows = draw(st.sampled_from([1, 4]))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    seq = draw(st.integers(2, 40))
    pos = draw(st.integers(0, seq - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    return batch, kv, rows, head_dim, seq, pos, dtype, seed


@given(case=attention_cases())
@example(case=(1, 8, 4, 128, 300, 299, torch.bfloat16, 0))  # the Llama-3 head layout, whole cache seen
@example(case=(2, 1, 4, 16, 5, 0, torch.float32, 1))  # only the first slot visible
def test_decode_attention_matches_sdpa(case):
    """The decode attention (matmuls, float32 softmax) against SDPA with the same boolean mask."""
    batch, kv, rows, head_dim, seq, pos, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv, rows, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, kv, seq, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, kv, seq, head_dim, generator=g).to(dtype)
    mask = (torch.arange(seq) <= pos)[None, None, None].expand(1, 1, rows, seq)
    got = E2E.decode_attention(q, k, v, mask)
    want = E2E.sdpa_decode_attention(q.double(), k.double(), v.double(), mask)
    assert got.dtype == dtype and got.shape == (batch, kv, rows, head_dim)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_logits_match_the_sdpa_attention(dtype):
    """A decode step after a prompt: the same logits with the decode attention as with SDPA's
    attention over the same cache (bf16: within bf16 rounding of the activations)."""
    import functools

    shape = E2E.ModelShape(hidden=128, layers=2, heads=8, kv_heads=2, intermediate=256, vocab=97)
    settings = dataclasses.replace(_settings(), shape=shape, max_seq=64)
    model = E2E.build_model(shape, settings, dtype, None)
    ids = torch.randint(shape.vocab, (2, 20), generator=torch.Generator().manual_seed(3))
    reference = functools.partial(E2E.layer_forward, attention=E2E.sdpa_decode_attention)
    got, want = [], []
    with torch.no_grad():
        for layer_fn, out in ((E2E.layer_forward, got), (reference, want)):
            E2E.set_cache(model, 2, dtype)
            E2E.prefill_logits(model, E2E.layer_forward, ids[:, :16])
            for i in range(16, 20):
                out.append(E2E.decode_logits(model, layer_fn, ids[:, i : i + 1], model.positions[i : i + 1].clone()).float())
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=tol, rtol=tol)
    assert (torch.stack(got).argmax(-1) == torch.stack(want).argmax(-1)).float().mean() >= 0.75


def test_shallow_model_has_the_first_layers_of_the_deep_one():
    settings = dataclasses.replace(_settings(), shape=dataclasses.replace(E2E.SMALL, layers=3))
    deep = E2E.build_model(settings.shape, settings, torch.bfloat16, None)
    shallow = E2E.build_model(dataclasses.replace(settings.shape, layers=1), settings, torch.bfloat16, None)
    torch.testing.assert_close(shallow.layers[0].mlp.down_proj.weight, deep.layers[0].mlp.down_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(shallow.lm_head.weight, deep.lm_head.weight, rtol=0, atol=0)
    assert not torch.equal(deep.layers[0].mlp.down_proj.weight, deep.layers[1].mlp.down_proj.weight)


def test_quantized_layers_and_bf16_lm_head():
    settings = _settings()
    model = E2E.build_model(settings.shape, settings, torch.bfloat16, E2E.Variant.parse("fp8_rowwise/auto"))
    kinds = {type(m).__name__ for m in model.layers.modules() if isinstance(m, (torch.nn.Linear, E2E.qp.QuantizedLinear))}
    assert kinds == {"QuantizedLinear"}
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.bfloat16
    # fp8 weights: about half of bf16 (norm weights and scales on top)
    bf16 = E2E.build_model(settings.shape, settings, torch.bfloat16, None)
    ratio = E2E.layer_weight_bytes(model.layers[0]) / E2E.layer_weight_bytes(bf16.layers[0])
    assert 0.5 < ratio < 0.52


@pytest.mark.parametrize("flag, device, backend, want", [
    ("auto", "cuda", "auto", "mma16"), ("auto", "cuda", "cutlass", "mma16"), ("auto", "cuda", "triton", "public"),
    ("auto", "cpu", "auto", "public"), ("public", "cuda", "auto", "public"), ("mma16", "cpu", "emulation", "mma16")])
def test_w4a16_layout_follows_the_flag_and_the_backend(flag, device, backend, want):
    settings = dataclasses.replace(_settings(), device=device, w4a16_layout=flag)
    variant = E2E.Variant.parse(f"w4a16/{backend}")
    assert E2E.weight_layout(variant, settings) == want
    assert E2E.quantize_kw(variant, settings) == {"group_size": settings.group_size, "weight_layout": want}
    assert E2E.quantize_kw(E2E.Variant.parse(f"fp8_rowwise/{backend}"), settings) == {}


def test_w4a16_layers_hold_the_layout_asked_for():
    settings = dataclasses.replace(_settings(), w4a16_layout="mma16")
    model = E2E.build_model(settings.shape, settings, torch.bfloat16, E2E.Variant.parse("w4a16/emulation"))
    layers = [m for m in model.layers.modules() if isinstance(m, E2E.qp.QuantizedLinear)]
    assert layers and all(m.weight_layout == "mma16" for m in layers)


# --- helpers ------------------------------------------------------------------------------


@given(n=st.integers(4, 64), scale=st.floats(1e-4, 1.0), seed=st.integers(0, 5))
def test_sqnr_db_matches_the_noise_ratio(n, scale, seed):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, generator=g) + 0.1
    noise = torch.randn(n, generator=g) * scale
    want = 10 * math.log10(ref.double().pow(2).sum().item() / noise.double().pow(2).sum().item())
    assert E2E.sqnr_db(ref + noise.double().to(ref.dtype), ref) == pytest.approx(want, abs=0.05)


def test_sqnr_db_of_an_exact_copy_is_none():
    x = torch.randn(8)
    assert E2E.sqnr_db(x.clone(), x) is None


@pytest.mark.parametrize("text", ["fp8", "fp8_rowwise", "fp8_rowwise/nonsense", "a/b/c"])
def test_bad_variant_names_say_what_is_wrong(text):
    with pytest.raises(ValueError, match="variant|scheme|backend"):
        E2E.Variant.parse(text)


def test_nofuse_variants_compile_with_fuse_off():
    v = E2E.Variant.parse("w4a16/cuda/NoFuse")
    assert (v.name, v.fuse, v.label(128)) == ("w4a16/cuda/nofuse", False, "w4a16 g128/cuda/nofuse")
    assert E2E.Variant.parse("w4a16/cuda").fuse
    settings = SimpleNamespace(inductor=True, cuda=False)
    backend = E2E.compile_kwargs(v, settings, whole_model=False)["backend"]
    assert backend.config == qp.LinearBackendConfig("cuda", fuse=False)


def test_cpu_default_variants_run_on_cpu_backends():
    cpu = E2E.parse_variants(None, "cpu")
    assert cpu[0].name == "bf16"
    assert all(v.backend in E2E.CPU_BACKENDS for v in cpu[1:])
    assert len(E2E.parse_variants(None, "cuda")) == len(E2E.DEFAULT_VARIANTS)


def test_ratios_are_against_bf16_at_the_same_batch():
    rows = [
        {"variant": "bf16", "decode": {"1": {"tok_s": 100.0}, "8": {"tok_s": 400.0}}, "prefill": {"ms": 50.0}},
        {"variant": "w4a16/auto", "decode": {"1": {"tok_s": 150.0}, "8": {"tok_s": 200.0}}, "prefill": {"ms": 100.0}},
        {"variant": "fp8_rowwise/auto", "status": "failed", "errors": {"build": "x"}},
    ]
    E2E.add_ratios(rows)
    assert rows[1]["x_bf16"] == {"decode_b1": 1.5, "decode_b8": 0.5, "prefill": 0.5}
    assert rows[2]["x_bf16"] == {}


# --- the profile's bookkeeping ----------------------------------------------------------------


def _ev(name, start, end, thread=1, kernels=(), device="cpu", shapes=()):
    from torch.autograd import DeviceType

    return SimpleNamespace(
        name=name,
        thread=thread,
        time_range=SimpleNamespace(start=start, end=end),
        kernels=[SimpleNamespace(name=k, duration=d) for k, d in kernels],
        device_type=DeviceType.CPU if device == "cpu" else DeviceType.CUDA,
        input_shapes=list(shapes),
    )


def test_kernel_breakdown_counts_kernels_under_each_linear():
    events = [
        # linear 1: a fill inside a nested op, then the GEMV on the op itself
        _ev("qlinear_pass::linear", 0, 10, kernels=[("gemv", 5.0)], shapes=[[1, 64]]),
        _ev("aten::zero_", 1, 2, kernels=[("fill", 1.0)]),
        # linear 2, on the same thread
        _ev("qlinear_pass::linear", 20, 30, kernels=[("gemv", 7.0)], shapes=[[1, 64]]),
        # not under a linear: attention
        _ev("aten::_efficient_attention_forward", 12, 18, kernels=[("attn", 3.0)]),
        # another thread's op inside linear 1's time range does not count
        _ev("aten::add", 3, 4, thread=2, kernels=[("add", 9.0)]),
        # lm_head (vocab-wide) is excluded
        _ev("aten::mm", 40, 50, kernels=[("cublas", 20.0)], shapes=[[1, 64], [64, 1000]]),
        _ev("gemv", 0, 5, device="cuda"),
        _ev("gemv", 20, 27, device="cuda"),
        _ev("fill", 1, 2, device="cuda"),
        _ev("attn", 12, 15, device="cuda"),
        _ev("cublas", 40, 60, device="cuda"),
    ]
    out = E2E.kernel_breakdown(events, steps=1, exclude_dims=(1000,))
    assert out["linear_op"] == "qlinear_pass::linear"
    assert out["linears"] == 2
    assert out["kernels_per_linear"] == 1.5
    assert out["us_per_linear"] == pytest.approx((6.0 + 7.0) / 2)
    assert [(g["kernels"], g["calls"]) for g in out["by_kernels"]] == [(["gemv"], 1), (["gemv", "fill"], 1)]
    assert out["top_kernels"][0]["kernel"] == "cublas"
    assert out["device_us_per_step"] == pytest.approx(5 + 7 + 1 + 3 + 20)


def test_kernel_breakdown_divides_by_the_models_linears():
    """A linear_group call (q/k/v in one launch) runs several layers: per-linear figures divide by
    the model's linear count, the calls are counted apart; a linear_fused call is a linear's too."""
    events = [
        _ev("qlinear_pass::linear_group", 0, 10, kernels=[("decode", 9.0)], shapes=[[1, 64]]),
        _ev("qlinear_pass::linear", 20, 30, kernels=[("decode", 3.0)], shapes=[[1, 64]]),
        _ev("qlinear_pass::linear_fused", 40, 50, kernels=[("decode", 4.0)], shapes=[[1, 64]]),
        _ev("decode", 0, 9, device="cuda"),
        _ev("decode", 20, 23, device="cuda"),
        _ev("decode", 40, 44, device="cuda"),
    ]
    out = E2E.kernel_breakdown(events, steps=1, linears_per_step=5)
    assert out["linears"] == 5 and out["linear_calls_per_step"] == 3
    assert out["kernels_per_linear"] == pytest.approx(3 / 5)
    assert out["us_per_linear"] == pytest.approx(16.0 / 5)
    assert [(g["kernels"], g["calls"]) for g in out["by_kernels"]] == [(["decode"], 3)]


def test_kernel_breakdown_splits_a_step_and_skips_annotations():
    """Every device kernel lands in one bucket; the compiled graph's annotation is no kernel."""
    events = [
        _ev("## Call CompiledFxGraph abc ##", 0, 100),
        _ev("qlinear_pass::linear", 0, 10, shapes=[[1, 64]]),
        _ev("triton_quant", 1, 2, kernels=[("quant", 1.0)]),
        _ev("cutlass_op", 3, 9, kernels=[("gemm", 6.0)]),
        _ev("aten::bmm", 11, 12, kernels=[("nvjet_gemm", 2.0)], shapes=[[8, 4, 64], [8, 64, 300]]),
        _ev("triton_red_fused__softmax_where_3", 12, 13, kernels=[("triton_red_fused__softmax_where_3", 3.0)]),
        _ev("aten::bmm", 13, 14, kernels=[("nvjet_gemm", 2.5)], shapes=[[8, 4, 300], [8, 300, 64]]),
        _ev("triton_poi_fused_add_rope", 15, 16, kernels=[("triton_poi_fused_add_rope", 0.5)]),
        _ev("aten::linear", 20, 40, shapes=[[1, 64], [1000, 64]]),
        _ev("aten::mm", 21, 39, kernels=[("nvjet_gemm", 20.0)], shapes=[[1, 64], [64, 1000]]),
        # device side: the annotation, each kernel, and a memset no CPU op claimed
        _ev("## Call CompiledFxGraph abc ##", 0, 90, device="cuda"),
        _ev("quant", 1, 2, device="cuda"),
        _ev("gemm", 3, 9, device="cuda"),
        _ev("nvjet_gemm", 11, 13, device="cuda"),
        _ev("triton_red_fused__softmax_where_3", 13, 16, device="cuda"),
        _ev("nvjet_gemm", 16, 18.5, device="cuda"),
        _ev("triton_poi_fused_add_rope", 19, 19.5, device="cuda"),
        _ev("nvjet_gemm", 21, 41, device="cuda"),
        _ev("Memset (Device)", 50, 51, device="cuda"),
    ]
    out = E2E.kernel_breakdown(events, steps=1, exclude_dims=(1000,))
    assert out["device_us_per_step"] == pytest.approx(1 + 6 + 2 + 3 + 2.5 + 0.5 + 20 + 1)
    assert all(not r["kernel"].startswith("##") for r in out["top_kernels"])
    assert out["top_kernels"][0]["kernel"] == "nvjet_gemm"
    assert out["top_kernels"][0]["calls_per_step"] == 3
    split = out["split_us_per_step"]
    assert split == pytest.approx({"linears": 7.0, "attention": 7.5, "lm_head": 20.0, "other": 1.5})
    assert split["linears"] == pytest.approx(out["linear_us_per_step"])
    assert sum(split.values()) == pytest.approx(out["device_us_per_step"])
    assert out["unclaimed_us_per_step"] == pytest.approx(1.0)


def test_kernel_breakdown_falls_back_to_aten_matmuls_and_takes_the_outermost():
    events = [
        _ev("aten::mm", 0, 10, kernels=[("gemm", 4.0)], shapes=[[1, 64], [64, 128]]),
        _ev("aten::mm", 2, 3, kernels=[("inner", 1.0)], shapes=[[1, 64], [64, 128]]),
        _ev("aten::mm", 20, 30, kernels=[("lm", 9.0)], shapes=[[1, 64], [64, 1000]]),
    ]
    out = E2E.kernel_breakdown(events, steps=2, exclude_dims=(1000,))
    assert out["linear_op"] == "ATen matmul ops" and "note" in out
    assert out["linears"] == 1 and out["linears_per_step"] == 0.5
    assert out["kernels_per_linear"] == 2 and out["us_per_linear"] == pytest.approx(5.0)


# --- the whole script, CPU mode -----------------------------------------------------------------


@pytest.mark.slow  # two benchmark processes, about 30 s on 2 cores: `make test-all` and CI run it
def test_cpu_small_run_writes_results(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--layers", "1",
        "--variants", "bf16,int8_weight_only/auto", "--decode-steps", "2", "--prefill-tokens", "16",
        "--batch-sizes", "1,2", "--no-inductor", "--out", str(out), "--variant-timeout", "300",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)  # auto picks what a CPU user gets, not the interpreted Triton kernels
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "bench_e2e.json").read_text())
    assert doc["settings"]["compile_mode"] == "layer"
    assert doc["settings"]["shape"]["layers"] == 1
    assert [v["variant"] for v in doc["variants"]] == ["bf16", "int8_weight_only/auto"]
    for v in doc["variants"]:
        assert v["status"] == "ok", v.get("errors")
        for b in ("1", "2"):
            row = v["decode"][b]
            assert row["tok_s"] > 0 and row["tok_s_per_seq"] > 0
            assert row["logits_check"]["ok"]
        assert v["prefill"]["ms"] > 0
        acc = v["accuracy"]
        assert math.isfinite(acc["sqnr_db_compiled"]) and acc["sqnr_db_compiled"] > 0
        assert math.isfinite(acc["sqnr_db_eager"]) and acc["sqnr_db_eager"] > 0
        assert v["compile"]["layers_share_one_graph"] is True
        assert v["compile"]["compile_s"] > 0
        assert v["kernels"]["measured"] is False
        assert v["memory"]["peak_bytes"] is None
        assert v["layer_weight_bytes"] > 0
    q = doc["variants"][1]
    assert q["compile"]["linears_rewritten"] >= 7 and q["compile"]["pass_s"] > 0
    assert q["layer_weight_bytes"] < doc["variants"][0]["layer_weight_bytes"]
    assert set(q["x_bf16"]) == {"decode_b1", "decode_b2", "prefill"}
    table = (out / "summary.md").read_text()
    assert "| int8_weight_only/auto |" in table and "SQNR" in table


@pytest.mark.parametrize("batches", [[1], [1, 8], [1, 4, 8]])
def test_every_timed_phase_runs_before_the_first_profiler_session(batches):
    settings = dataclasses.replace(_settings(), batches=batches)
    ctx = E2E.VariantRun(E2E.Variant.parse("bf16"), settings, {"errors": {}}, lambda: None)
    names = [name for name, _, _ in E2E.phases(ctx)]
    timed = ["prefill"] + [f"decode_b{b}" for b in batches]
    profiled = ["profile", "profile_prefill"]
    assert set(timed + profiled) <= set(names)
    assert max(names.index(n) for n in timed) < min(names.index(n) for n in profiled)
    assert names[0] == "build" and names[1] == f"decode_b{batches[0]}"


def _doc(settings, variants):
    return {"machine": "cpu", "torch": torch.__version__, "triton": None, "settings": settings, "variants": variants}


def test_resume_keeps_finished_variants_of_the_same_settings(tmp_path):
    settings = {**_settings().as_json()}
    old = _doc(settings, [
        {"variant": "bf16", "status": "ok", "decode": {"1": {"tok_s": 1.0}}},
        {"variant": "w4a16/auto", "status": "timeout", "errors": {"build": "timed out"}},
    ])
    (tmp_path / "bench_e2e.json").write_text(json.dumps(old))
    kept = E2E._resumable(tmp_path, _doc(settings, []))
    assert list(kept) == ["bf16"]
    other = {**settings, "decode_steps": settings["decode_steps"] + 1}
    assert E2E._resumable(tmp_path, _doc(other, [])) == {}


def test_summary_lists_errors_and_kernels():
    settings = _settings().as_json()
    rows = [
        {"variant": "bf16", "status": "ok", "decode": {"1": {"tok_s": 100.0}, "8": {"tok_s": 500.0}}, "prefill": {"ms": 10.0},
         "kernels": {"measured": True, "linears": 14, "linears_per_step": 7, "linear_op": "ATen matmul ops",
                     "linear_us_per_step": 70.0, "device_us_per_step": 100.0, "kernels_per_linear": 1.0, "us_per_linear": 10.0,
                     "split_us_per_step": {"linears": 70.0, "attention": 12.0, "lm_head": 8.0, "other": 10.0},
                     "by_kernels": [{"kernels": ["gemv_bf16"], "linears": 14, "mean_us": 10.0}]}},
        {"variant": "w4a16/auto", "label": "w4a16 g128/auto", "status": "failed", "errors": {"build": "NoKernelError: none"}},
    ]
    E2E.add_ratios(rows)
    table = E2E.summary(_doc(settings, rows))
    assert "| bf16 | 100.0 | 1.00 | 500.0 | 1.00 | 10.00 | 1.00 |" in table
    assert "w4a16 g128/auto (failed)" in table
    assert "- w4a16/auto (build): NoKernelError: none" in table
    assert "7 linears per step" in table and "gemv_bf16" in table
    assert "| bf16 | 0.07 | 0.01 | 0.01 | 0.01 | 0.10 |" in table


def test_inductor_pdl_is_a_setting_of_every_variant_and_named_in_the_summary(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_ENABLE_PDL", raising=False)
    off = _settings()
    assert not off.inductor_pdl and "Inductor PDL" not in E2E.summary(_doc(off.as_json(), []))
    on = E2E.settings_from(E2E.parse_args(["--device", "cpu", "--small", "--inductor-pdl"]))
    assert on.inductor_pdl and "inductor_pdl" in E2E._RESUME_KEYS
    assert "; Inductor PDL on;" in E2E.summary(_doc(on.as_json(), []))
    monkeypatch.setenv("TORCHINDUCTOR_ENABLE_PDL", "1")
    assert _settings().inductor_pdl  # the environment's setting, recorded


@pytest.mark.slow  # a fresh process importing the benchmark, torch and Inductor (6-8 s on 2 cores): `make test-all` and CI run it
def test_inductor_is_imported_before_any_timed_compile():
    """Every variant's compile seconds start with Inductor's compiler imported: bf16's torch.compile
    imports it when called, a qlinear_pass backend only in its first compile (a fresh process: the
    test process may have imported it already)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import bench_e2e as E; "
            "before = 'torch._inductor.compile_fx' in sys.modules; E.disable_compile_caches(); "
            "print(before, 'torch._inductor.compile_fx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(SCRIPT.parent)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
