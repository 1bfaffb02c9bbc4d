"""The matcher: which forms are recognised, how often, and that the rewrite equals eager."""
import pytest
import torch
import torch.nn.functional as F

import qlinear_pass as qp
from qlinear_pass import schemes as S
from qlinear_pass.examples_model import TinyBlock

from .helpers import compile_and_run, linear_model, random_activation, recorded

F8 = torch.float8_e4m3fn


def _dynamic_fp8_token(x):
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0
    return (xf / s).clamp(-448.0, 448.0).to(F8), s


def _dynamic_int8_token(x):
    xf = x.float()
    s = xf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
    return (xf / s).round().clamp(-128, 127).to(torch.int8), s


class UserScaledMM(torch.nn.Module):
    """User code calling torch._scaled_mm, the way serving code does."""

    def __init__(self, k, n, mode, bias=False):
        super().__init__()
        torch.manual_seed(3)
        w = torch.randn(n, k) * 0.05
        self.mode = mode
        rowwise = mode in ("dynamic_rowwise", "static_rowwise")
        p = S.quantize_weight("fp8_rowwise" if rowwise else "fp8_tensor", w)
        self.register_buffer("w", p["weight"])
        self.register_buffer("sw", p["weight_scale"].reshape(1, n) if rowwise else p["weight_scale"])
        self.register_buffer("s_in", torch.tensor(0.02))
        self.register_buffer("b", torch.randn(n).to(torch.bfloat16) if bias else None)

    def forward(self, x):
        if self.mode == "dynamic_rowwise":
            q, s = _dynamic_fp8_token(x)
        elif self.mode == "static_tensor":  # calibrated input scale
            q, s = (x.float() / self.s_in).clamp(-448.0, 448.0).to(F8), self.s_in
        else:
            raise AssertionError
        return torch._scaled_mm(q, self.w.t(), s, self.sw, bias=self.b, out_dtype=torch.bfloat16)

    def reference(self, x):
        if self.mode == "dynamic_rowwise":
            return S.reference("fp8_rowwise", x, [self.w, self.sw.reshape(-1)], self.b, out_dtype=torch.bfloat16)
        q = (x.float() / self.s_in).clamp(-448.0, 448.0).to(F8)
        return S.reference("fp8_tensor", q, [self.w, self.sw], self.b, input_scale=self.s_in, out_dtype=torch.bfloat16)


class UserIntMM(torch.nn.Module):
    def __init__(self, k, n, bias=False):
        super().__init__()
        torch.manual_seed(4)
        p = S.quantize_weight("int8_rowwise", torch.randn(n, k) * 0.05)
        self.register_buffer("w", p["weight"])
        self.register_buffer("sw", p["weight_scale"])
        self.register_buffer("b", torch.randn(n) if bias else None)

    def forward(self, x):
        q, s = _dynamic_int8_token(x)
        y = torch._int_mm(q, self.w.t()).float() * s * self.sw
        if self.b is not None:
            y = y + self.b
        return y.to(x.dtype)

    def reference(self, x):
        return S.reference("int8_rowwise", x, [self.w, self.sw], self.b)


class UserWeightOnly(torch.nn.Module):
    def __init__(self, k, n, scheme, order, bias=False):
        super().__init__()
        torch.manual_seed(5)
        p = S.quantize_weight(scheme, torch.randn(n, k) * 0.05)
        self.scheme, self.order = scheme, order
        self.register_buffer("w", p["weight"])
        self.register_buffer("s", p["weight_scale"])
        self.register_buffer("b", torch.randn(n).to(torch.bfloat16) if bias else None)

    def forward(self, x):
        if self.order == "convert_then_scale":  # w.to(dt) * s
            wd = self.w.to(x.dtype) * self.s[:, None].to(x.dtype)
        elif self.order == "scale_then_convert":  # (w * s).to(dt)
            wd = (self.w.float() * self.s[:, None]).to(x.dtype)
        else:  # not a dequantisation: shifts instead of scaling
            wd = self.w.to(x.dtype) + self.s[:, None].to(x.dtype)
        return F.linear(x, wd, self.b)

    def reference(self, x):
        return S.reference(self.scheme, x, [self.w, self.s], self.b)


@pytest.mark.parametrize("scheme", [s.name for s in S.all_schemes()])
def test_reference_modules_of_every_scheme(scheme):
    torch.manual_seed(0)
    m = qp.quantize(TinyBlock(256, 384, bias=True).to(torch.bfloat16), scheme,
                    group_size=64 if scheme == "w4a16" else None)
    x = random_activation((2, 3, 256))
    y, recs = compile_and_run(m, x, "emulation")
    (rec,) = recs
    assert len(rec.decisions) == 7, rec.unmatched
    assert {d.spec.scheme for d in rec.decisions} == {scheme}
    # the attention matmuls are seen (bmm is not an anchor) and nothing else is left unmatched
    assert rec.unmatched == []
    with torch.no_grad():
        assert S.relative_error(y, m(x)) < 1e-2
    assert sorted(d.spec.module for d in rec.decisions) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize("mode,scheme,act_input", [
    ("dynamic_rowwise", "fp8_rowwise", "dynamic"),
    ("static_tensor", "fp8_tensor", "static"),
])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["emulation", "torch"])
def test_user_scaled_mm(mode, scheme, act_input, bias, backend):
    from qlinear_pass.backends.torch_builtin import cpu_rowwise_scaled_mm

    if backend == "torch" and scheme == "fp8_rowwise" and not cpu_rowwise_scaled_mm():
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm has no rowwise scales")
    m = UserScaledMM(128, 48, mode, bias)
    x = random_activation((9, 128))
    y, recs = compile_and_run(m, x, backend)
    (d,) = recs[0].decisions
    assert (d.spec.scheme, d.spec.act_input, d.spec.has_bias) == (scheme, act_input, bias)
    assert S.relative_error(y, m.reference(x)) < S.TOLERANCE[torch.bfloat16]


def test_prequantized_scaled_mm_input():
    m = UserScaledMM(128, 32, "dynamic_rowwise")

    def f(q, s):
        return torch._scaled_mm(q, m.w.t(), s, m.sw, out_dtype=torch.float32)

    q, s = _dynamic_fp8_token(random_activation((5, 128)))
    with torch.no_grad(), recorded() as recs:
        y = torch.compile(f, backend=qp.make("emulation", inductor=False))(q, s)
    (d,) = recs[0].decisions
    assert d.spec.act_input == "static" and d.spec.act_dtype == F8 and d.spec.out_dtype == torch.float32
    ref = S.reference("fp8_rowwise", q, [m.w, m.sw.reshape(-1)], input_scale=s, out_dtype=torch.float32)
    assert S.relative_error(y, ref) < 1e-5


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["emulation", "torch"])
def test_user_int_mm_with_scale_multiplies(bias, backend):
    m = UserIntMM(128, 40, bias)
    x = random_activation((33, 128))
    y, recs = compile_and_run(m, x, backend)
    (d,) = recs[0].decisions
    assert d.spec.scheme == "int8_rowwise" and d.spec.act_input == "dynamic" and d.spec.has_bias == bias
    assert S.relative_error(y, m.reference(x)) < S.TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("scheme", ["int8_weight_only", "fp8_weight_only"])
@pytest.mark.parametrize("order", ["convert_then_scale", "scale_then_convert"])
@pytest.mark.parametrize("bias", [False, True])
def test_weight_only_dequant_then_linear_both_orders(scheme, order, bias):
    m = UserWeightOnly(64, 24, scheme, order, bias)
    x = random_activation((2, 7, 64))
    y, recs = compile_and_run(m, x, "auto")
    (d,) = recs[0].decisions
    assert d.spec.scheme == scheme and d.spec.has_bias == bias and d.spec.act_input == "none"
    assert y.shape == (2, 7, 24)
    assert S.relative_error(y, m.reference(x)) < S.TOLERANCE[torch.bfloat16]


def test_lookalike_that_is_not_a_dequantisation_is_left_alone():
    m = UserWeightOnly(64, 24, "int8_weight_only", "shift")
    x = random_activation((5, 64))
    y, recs = compile_and_run(m, x, "emulation")
    assert recs[0].decisions == []
    (miss,) = recs[0].unmatched
    assert "does not compute int8_weight_only" in miss["reason"]
    with torch.no_grad():
        torch.testing.assert_close(y, m(x))


def test_float_linear_is_reported_as_not_quantized():
    m = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    qp.quantize(m, "fp8_rowwise", include="2")
    _, recs = compile_and_run(m, torch.randn(4, 32), "emulation")
    assert [d.spec.module for d in recs[0].decisions] == ["2"]
    (miss,) = recs[0].unmatched
    assert miss["module"] == "0" and "float weight" in miss["reason"]


def test_matched_count_with_shared_activation():
    """Two projections of one activation: two matches, one for each module."""
    m = linear_model(128, 64, "fp8_rowwise")
    block = torch.nn.ModuleDict({"a": m[0], "b": linear_model(128, 32, "fp8_rowwise")[0]})

    def f(x):
        return block["a"](x).sum(-1) + block["b"](x).sum(-1)

    _, recs = compile_and_run(f, random_activation((4, 128)), "emulation")
    decisions = recs[0].decisions
    assert len(decisions) == 2
    assert sorted((d.spec.module.rsplit(".", 1)[-1], d.spec.n) for d in decisions) == [("a", 64), ("b", 32)]


# --- graphs people already write -------------------------------------------------------------


class GptFastInt8(torch.nn.Module):
    """gpt-fast's int8 weight-only linear: ``F.linear(x, w.to(dt)) * scales``, the scale after
    the matmul (bf16 scales, as gpt-fast stores them)."""

    def __init__(self, k, n, form="gpt_fast"):
        super().__init__()
        torch.manual_seed(6)
        p = S.quantize_weight("int8_weight_only", torch.randn(n, k) * 0.05)
        self.form = form
        self.register_buffer("w", p["weight"])
        self.register_buffer("scales", p["weight_scale"].to(torch.bfloat16))
        self.register_buffer("b", torch.randn(n).to(torch.bfloat16))

    def forward(self, x):
        if self.form == "gpt_fast":
            return F.linear(x, self.w.to(dtype=x.dtype)) * self.scales
        if self.form == "gpt_fast_bias":  # bias added after the scale: still the scheme, with a bias
            return F.linear(x, self.w.to(dtype=x.dtype)) * self.scales + self.b
        if self.form == "scaled_bias":  # the scale multiplies the bias too: not a linear of this weight
            return F.linear(x, self.w.to(dtype=x.dtype), self.b) * self.scales
        if self.form == "shifted":  # looks the same, but the weight is shifted before the matmul
            return F.linear(x, self.w.to(dtype=x.dtype) + 1) * self.scales
        if self.form == "int8pack":
            x2 = x.reshape(-1, x.shape[-1])
            return torch._weight_int8pack_mm(x2, self.w, self.scales).reshape(*x.shape[:-1], -1)
        raise AssertionError(self.form)

    def reference(self, x):
        bias = self.b if self.form == "gpt_fast_bias" else None
        return S.reference("int8_weight_only", x, [self.w, self.scales.float()], bias)


class TorchaoWeightOnlyByHand(torch.nn.Module):
    """The ATen graphs torchao's ``Int8WeightOnlyConfig`` / ``Float8WeightOnlyConfig`` tensors
    reduce to (torchao 0.18 on torch 2.13), written in plain torch so that the test runs without
    torchao: the weight is transposed, *then* converted; int8 multiplies its [N, 1] float32 scale
    into the matmul's output, fp8 into the transposed weight.  ``test_torchao_weight_only`` checks
    the same forms through torchao itself."""

    def __init__(self, k, n, scheme, bias):
        super().__init__()
        torch.manual_seed(7)
        p = S.quantize_weight(scheme, torch.randn(n, k) * 0.05)
        self.scheme = scheme
        self.register_buffer("qdata", p["weight"])
        self.register_buffer("scale", p["weight_scale"].reshape(n, 1))
        self.register_buffer("b", torch.randn(n).to(torch.bfloat16) if bias else None)

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        if self.scheme == "int8_weight_only":
            y = torch.mm(x2, self.qdata.t().to(x.dtype)) * self.scale.to(x.dtype).reshape(-1)
        else:
            y = torch.mm(x2, (self.qdata.t().float() * self.scale.t()).to(x.dtype))
        if self.b is not None:
            y = y + self.b
        return y.reshape(*x.shape[:-1], -1)

    def reference(self, x):
        return S.reference(self.scheme, x, [self.qdata, self.scale.reshape(-1)], self.b)


def _one(recs):
    (rec,) = recs
    (d,) = rec.decisions
    assert rec.unmatched == []
    return d


@pytest.mark.parametrize("form,bias", [("gpt_fast", False), ("gpt_fast_bias", True), ("int8pack", False)])
@pytest.mark.parametrize("shape", [(1, 64), (2, 5, 64)])
@pytest.mark.parametrize("backend", ["emulation", "auto"])
def test_gpt_fast_int8_and_int8pack_call(form, bias, shape, backend):
    m = GptFastInt8(64, 48, form)
    x = random_activation(shape)
    y, recs = compile_and_run(m, x, backend)
    d = _one(recs)
    assert (d.spec.scheme, d.spec.act_input, d.spec.has_bias, d.spec.n, d.spec.k) == ("int8_weight_only", "none", bias, 48, 64)
    assert y.shape == (*shape[:-1], 48)
    assert S.relative_error(y, m.reference(x)) < S.TOLERANCE[torch.bfloat16]
    with torch.no_grad():
        assert S.relative_error(y, m(x)) < S.TOLERANCE[torch.bfloat16]
    rep = qp.explain(m, x, linear_backend=backend)
    (row,) = rep.rows
    assert row["scheme"] == "int8_weight_only" and rep.unmatched == []


@pytest.mark.parametrize("form,reason", [
    ("scaled_bias", "the bias is scaled too"),
    ("shifted", "with the multiply after the matmul does not compute int8_weight_only"),
])
def test_post_matmul_scale_lookalikes_are_listed_with_why(form, reason):
    m = GptFastInt8(64, 48, form)
    x = random_activation((3, 64))
    y, recs = compile_and_run(m, x, "emulation")
    assert recs[0].decisions == []
    (miss,) = recs[0].unmatched
    assert reason in miss["reason"] and (miss["n"], miss["k"]) == (48, 64)
    with torch.no_grad():
        torch.testing.assert_close(y, m(x))


def test_int8pack_call_with_computed_scales_and_fp32():
    m = GptFastInt8(64, 48, "int8pack")

    def f(x):  # scales computed in the graph are the layer's scales all the same
        return torch._weight_int8pack_mm(x, m.w, m.scales * 2)

    x = random_activation((3, 64))
    y, recs = compile_and_run(f, x, "emulation")
    assert _one(recs).spec.scheme == "int8_weight_only"
    ref = S.reference("int8_weight_only", x, [m.w, (m.scales * 2).float()])
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]

    def g(x):  # float32 activations take float32 scales
        return torch._weight_int8pack_mm(x, m.w, m.scales.float())

    (row,) = qp.explain(g, torch.randn(3, 64)).rows
    assert (row["scheme"], row["n"], row["k"], row["act_dtype"]) == ("int8_weight_only", 48, 64, "float32")


@pytest.mark.parametrize("scheme", ["int8_weight_only", "fp8_weight_only"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["emulation", "auto"])
def test_torchao_weight_only_forms_by_hand(scheme, bias, backend):
    m = TorchaoWeightOnlyByHand(128, 64, scheme, bias)
    x = random_activation((2, 3, 128))
    y, recs = compile_and_run(m, x, backend)
    d = _one(recs)
    assert (d.spec.scheme, d.spec.has_bias, d.spec.act_input) == (scheme, bias, "none")
    assert S.relative_error(y, m.reference(x)) < S.TOLERANCE[torch.bfloat16]


def _torchao():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("torchao.quantization")


@pytest.mark.parametrize("config,scheme", [("Int8WeightOnlyConfig", "int8_weight_only"),
                                           ("Float8WeightOnlyConfig", "fp8_weight_only")])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["emulation", "auto"])
def test_torchao_weight_only(config, scheme, bias, backend):
    tq = _torchao()
    torch.manual_seed(8)
    m = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=bias)).to(torch.bfloat16)
    tq.quantize_(m, getattr(tq, config)())
    w = m[0].weight
    x = random_activation((2, 3, 128))
    y, recs = compile_and_run(m, x, backend)
    d = _one(recs)
    assert (d.spec.scheme, d.spec.has_bias, d.spec.module) == (scheme, bias, "0")
    ref = S.reference(scheme, x, [w.qdata, w.scale.reshape(-1)], m[0].bias)
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]
    with torch.no_grad():
        assert S.relative_error(y, m(x)) < S.TOLERANCE[torch.bfloat16]
    with torch.no_grad():  # torchao leaves the bias trainable
        (row,) = qp.explain(m, x, linear_backend=backend).rows
    assert (row["module"], row["scheme"]) == ("0", scheme)


class IntxByHand(torch.nn.Module):
    """The ATen graph torchao's ``IntxWeightOnlyConfig`` reduces to (``IntxUnpackedToInt8Tensor``,
    torchao 0.18): int8-stored values (int8, or int4 in [-8, 7]) with int8 zero points and bf16
    scales, per channel or in groups: ``((q.to(dt) - z.to(dt)) * s)`` before a transposed matmul."""

    def __init__(self, k, n, group):
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.group = group
        self.register_buffer("q", torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8))
        self.register_buffer("z", torch.randint(-2, 2, (n, k // group), generator=g, dtype=torch.int8))
        self.register_buffer("s", (torch.rand(n, k // group, generator=g) * 0.01).to(torch.bfloat16))

    def forward(self, x):
        n, k = self.q.shape
        q = self.q.reshape(n, k // self.group, self.group).to(x.dtype)
        w = (q - self.z.reshape(n, -1, 1).to(x.dtype)) * self.s.reshape(n, -1, 1)
        return F.linear(x, w.reshape(n, k))


@pytest.mark.parametrize("group", [32, 128])
def test_intx_weight_only_is_listed_with_why(group):
    m = IntxByHand(128, 64, group)
    x = random_activation((3, 128))
    y, recs = compile_and_run(m, x, "emulation")
    assert recs[0].decisions == []
    (miss,) = recs[0].unmatched
    per = "per channel" if group == 128 else f"in groups of {group} along K"
    assert f"int8-stored weight with torch.int8 zero points {per}" in miss["reason"]
    assert "no scheme has it" in miss["reason"]
    with torch.no_grad():
        torch.testing.assert_close(y, m(x))


@pytest.mark.parametrize("weight_dtype,granularity", [("int8", "axis"), ("int4", 32), ("int4", 128)])
def test_torchao_intx_weight_only_is_listed_with_why(weight_dtype, granularity):
    tq = _torchao()
    from torchao.quantization.granularity import PerAxis, PerGroup

    m = torch.nn.Sequential(torch.nn.Linear(128, 64)).to(torch.bfloat16)
    gran = PerAxis(0) if granularity == "axis" else PerGroup(granularity)
    tq.quantize_(m, tq.IntxWeightOnlyConfig(weight_dtype=getattr(torch, weight_dtype), granularity=gran,
                                            mapping_type=tq.MappingType.ASYMMETRIC))
    with torch.no_grad():  # torchao leaves the bias trainable
        rep = qp.explain(m, random_activation((3, 128)))
    assert rep.rows == []
    (miss,) = rep.unmatched
    assert miss["module"] == "0" and "int8-stored weight with torch.int8 zero points" in miss["reason"]
    assert "no scheme has it" in str(rep)


def _torchao_gpu_config(tq, name):
    if name == "fp8_rowwise":
        from torchao.quantization.granularity import PerRow

        return tq.Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if name == "int4_tinygemm":
        return tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    return tq.Int4WeightOnlyConfig(group_size=128)


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["fp8_rowwise", "int4_tinygemm", "int4_default"])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_torchao_gpu_configs_are_matched_or_listed_with_why(config, backend):
    """torchao's GPU-only configs: each linear is either matched (and then agrees with torchao's
    own eager output) or listed by explain() as unmatched with a reason; never silently dropped."""
    tq = _torchao()
    torch.manual_seed(8)
    m = torch.nn.Sequential(torch.nn.Linear(256, 128)).to(torch.bfloat16).cuda()
    try:
        tq.quantize_(m, _torchao_gpu_config(tq, config))
    except (ImportError, RuntimeError, NotImplementedError) as e:  # a kernel library torchao wants is missing
        pytest.skip(f"torchao cannot quantize with {config} here: {e}")
    m.requires_grad_(False)
    x = random_activation((3, 256)).cuda()
    with torch.no_grad():
        want = m(x)
        rep = qp.explain(m, x, linear_backend=backend)
        y = torch.compile(m, backend=qp.make(backend))(x)
    print(config, backend, rep)
    if rep.rows:
        (row,) = rep.rows
        assert row["module"] == "0"
        assert row["scheme"] == ("fp8_rowwise" if config == "fp8_rowwise" else "w4a16")
    else:
        (miss,) = rep.unmatched
        assert miss["module"] == "0" and miss["reason"]
    assert S.relative_error(y, want) < S.TOLERANCE[torch.bfloat16]


class Int4PackByHand(torch.nn.Module):
    """A direct tinygemm int4 call (the CPU form of what torchao's Int4WeightOnlyConfig with
    ``tile_packed_to_4d`` and gpt-fast's int4 run on CUDA)."""

    def __init__(self, k=128, n=64, group=32):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.group = group
        w = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(w, 2))
        self.register_buffer("sz", (torch.rand(k // group, n, 2, generator=g) * 0.01).to(torch.bfloat16))

    def forward(self, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.sz)


def test_tinygemm_int4_is_listed_with_why():
    m = Int4PackByHand()
    x = random_activation((3, 128))
    y, recs = compile_and_run(m, x, "emulation")
    assert recs[0].decisions == []
    (miss,) = recs[0].unmatched
    assert (miss["n"], miss["k"]) == (64, 128)
    assert "tinygemm's packed int4 weight" in miss["reason"] and "no scheme" in miss["reason"]
    with torch.no_grad():
        torch.testing.assert_close(y, m(x))
        assert "tinygemm" in str(qp.explain(m, x))


def _region_devices(monkeypatch, model, x):
    """The devices the pass's numeric region checks ran on while compiling ``model``."""
    from qlinear_pass.patterns import regions

    seen = []
    real = regions._evaluate

    def spy(inner, env, outputs, device):
        seen.append(torch.device(device))
        return real(inner, env, outputs, device)

    monkeypatch.setattr(regions, "_evaluate", spy)
    monkeypatch.setattr(regions, "_VERIFY_CACHE", {})
    y, recs = compile_and_run(model, x)
    return seen, y, recs


@pytest.mark.parametrize("scheme", ["int8_weight_only", "w4a16"])
def test_region_checks_run_on_the_cpu_for_a_cpu_model(monkeypatch, scheme):
    m = linear_model(256, 64, scheme)
    seen, _, recs = _region_devices(monkeypatch, m, random_activation((2, 256)))
    assert seen and all(d.type == "cpu" for d in seen)
    assert [d.spec.scheme for r in recs for d in r.decisions] == [scheme]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8_weight_only", "w4a16", "fp8_rowwise"])
def test_region_checks_run_on_the_gpu_that_holds_the_weights(monkeypatch, scheme):
    """On a GPU the checks draw and dequantise their random weights there (milliseconds, where the
    CPU took over a second per compile of an 8B model), and still match the layer."""
    m = linear_model(256, 64, scheme).cuda()
    x = random_activation((2, 256)).cuda()
    seen, y, recs = _region_devices(monkeypatch, m, x)
    assert seen and all(d.type == "cuda" for d in seen)
    assert [d.spec.scheme for r in recs for d in r.decisions] == [scheme]
    with torch.no_grad():
        want = m(x)
    assert S.relative_error(y, want) < S.TOLERANCE[torch.bfloat16]


class _Widened(torch.nn.Module):
    """gpt-fast's int8 weight-only linear, its bf16 output read in fp32 (as a norm or SwiGLU reads it)."""

    def __init__(self):
        super().__init__()
        self.lin = GptFastInt8(64, 48, "gpt_fast")

    def forward(self, x):
        return torch.sigmoid(self.lin(x).float())


def test_a_16bit_output_widened_by_its_reader_ends_the_layer():
    """The matmul writes bf16 and the reader widens it: the layer's output stays bf16 (what the
    16-bit kernels write), the widening stays the reader's."""
    m = _Widened()
    x = random_activation((3, 64))
    y, recs = compile_and_run(m, x, "emulation")
    d = _one(recs)
    assert d.spec.out_dtype == torch.bfloat16 and y.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(y, m(x), atol=1e-2)


class _AddsRow(torch.nn.Module):
    """A quantized linear plus a [1, N] tensor: the activation itself (a residual) or a bias-like parameter."""

    def __init__(self):
        super().__init__()
        self.lin = GptFastInt8(64, 64, "gpt_fast")
        self.register_buffer("row", torch.randn(1, 64).to(torch.bfloat16))

    def forward(self, x):
        return self.lin(x) + (x if x.shape[0] == 1 else self.row)


@pytest.mark.parametrize("m,is_bias", [(1, False), (3, True)])
def test_a_one_row_addend_is_a_bias_only_over_several_rows(m, is_bias):
    """With one row, ``linear(x) + r`` for a [1, N] ``r`` is as likely a residual add (the pass may
    run it in the kernel, fusion.py) as a bias: it is not taken for one; over several rows a
    [1, N] addend broadcasts like a bias and is."""
    mod = _AddsRow()
    x = random_activation((m, 64))
    y, recs = compile_and_run(mod, x, "emulation")
    assert _one(recs).spec.has_bias is is_bias
    with torch.no_grad():
        assert S.relative_error(y, mod(x)) < S.TOLERANCE[torch.bfloat16]
