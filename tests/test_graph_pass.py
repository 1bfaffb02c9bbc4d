"""The pass over whole graphs: shapes, dtypes, dynamic M, training graphs, cache keys."""
import os
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qlinear_pass as qp
from qlinear_pass import schemes as S
from qlinear_pass.graph_pass import QLinearPass

from .helpers import compile_and_run, fold_round_trips, linear_model, pad_rows, random_activation, recorded


@given(
    lead=st.sampled_from([(1,), (7,), (2, 3), (1, 1, 5)]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    bias=st.booleans(),
    scheme=st.sampled_from(["fp8_rowwise", "int8_weight_only", "w4a16"]),
)
def test_input_ranks_dtypes_and_bias(lead, dtype, bias, scheme):
    torch._dynamo.reset()
    m = linear_model(128, 48, scheme, bias=bias, dtype=dtype, group_size=64)
    x = random_activation((*lead, 128), dtype)
    y, recs = compile_and_run(m, x, "emulation")
    (d,) = recs[0].decisions
    assert d.spec.has_bias == bias and d.spec.out_dtype == dtype
    with torch.no_grad():
        ref = m(x)
    assert y.shape == ref.shape and y.dtype == dtype
    assert S.relative_error(y, ref) < 1e-5


def test_symbolic_m_does_not_recompile():
    m = linear_model(128, 64, "fp8_rowwise")
    f = torch.compile(m, backend=qp.make("emulation", inductor=False), dynamic=True)
    with torch.no_grad(), recorded() as recs:
        for rows in (5, 11, 64):
            x = random_activation((rows, 128))
            assert S.relative_error(f(x), m(x)) < 1e-5
    assert len(recs) == 1
    assert recs[0].decisions[0].spec.m is None  # M stayed symbolic
    # M=1 is specialised by Dynamo (its 0/1 rule): one more graph, still rewritten
    with torch.no_grad(), recorded() as recs:
        x = random_activation((1, 128))
        assert S.relative_error(f(x), m(x)) < 1e-5
    assert len(recs) == 1 and len(recs[0].decisions) == 1


def test_quantized_modules_hold_no_trainable_state():
    m = linear_model(64, 32, "w4a16", bias=True, dtype=torch.float32, group_size=32, zero_points=True)
    assert list(m.parameters()) == []
    names = {n for n, _ in m.named_buffers()}
    assert {"0.weight", "0.weight_scale", "0.weight_zero", "0.bias"} <= names
    assert "0.bias" in m.state_dict()


@pytest.mark.parametrize("scheme", ["int8_weight_only", "fp8_rowwise", "w4a16"])
def test_inference_call_without_no_grad_gets_the_pass(scheme, fresh_warnings):
    """The README's snippet, as users write it: no torch.no_grad(), a layer with bias."""
    m = linear_model(64, 32, scheme, bias=True, dtype=torch.float32, group_size=32)
    x = random_activation((4, 64), torch.float32)
    assert torch.is_grad_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an inference graph warns about nothing
        with recorded() as recs:
            y = torch.compile(m, backend=qp.make("emulation", inductor=False))(x)
    assert len(recs) == 1 and not recs[0].training
    assert [d.kernel for d in recs[0].decisions] == ["emulation"]
    assert not y.requires_grad
    with torch.no_grad():
        assert S.relative_error(y, m(x)) < 1e-5


def test_input_requiring_grad_is_left_untouched_with_one_warning(fresh_warnings):
    m = linear_model(64, 32, "int8_weight_only", bias=True, dtype=torch.float32)
    x = random_activation((4, 64), torch.float32).requires_grad_()
    f = torch.compile(m, backend=qp.make("emulation", inductor=False))
    with pytest.warns(UserWarning, match=r"graph needs gradients \(input .* requires grad\)"), recorded() as recs:
        y = f(x)
    assert recs and all(r.training and not r.decisions for r in recs)
    assert "input" in recs[0].training_reason
    y.sum().backward()
    with torch.no_grad():
        ref = S.dequantize_weight("int8_weight_only", m[0].params, 64)
    torch.testing.assert_close(x.grad, ref.sum(0).expand(4, 64))
    with torch.no_grad():
        torch.testing.assert_close(y, m(x))
    # the second grad-needing graph of the same kind does not warn again
    torch._dynamo.reset()
    x2 = random_activation((5, 64), torch.float32).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.compile(m, backend=qp.make("emulation", inductor=False))(x2)


def test_trainable_float_parameter_is_left_untouched_and_warns_once_per_reason(fresh_warnings):
    """A float layer beside the quantized one makes the graph differentiable: untouched, warned."""
    lin = torch.nn.Linear(32, 64)
    m = torch.nn.Sequential(torch.nn.Linear(64, 32), lin)
    m = qp.quantize(m, "int8_weight_only", include="0")
    x = random_activation((4, 64), torch.float32)
    f = torch.compile(m, backend=qp.make("emulation", inductor=False))
    with pytest.warns(UserWarning, match=r"parameter 1\.weight \(and 1 more\) requires grad") as caught, recorded() as recs:
        y = f(x)
    assert len(caught) == 1 and "torch.no_grad()" in str(caught[0].message)
    assert recs and all(r.training and not r.decisions for r in recs)
    y.sum().backward()
    assert lin.bias.grad is not None
    # another reason still warns once: an input that requires grad
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="input"):
        torch.compile(m, backend=qp.make("emulation", inductor=False))(x.clone().requires_grad_())
    # under no_grad the same model gets the pass and warns about nothing
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y2, recs = compile_and_run(m, x, "emulation")
    assert [d.kernel for d in recs[0].decisions] == ["emulation"]


def test_uuid_depends_on_config():
    a = QLinearPass(qp.LinearBackendConfig("torch")).uuid()
    b = QLinearPass(qp.LinearBackendConfig("emulation")).uuid()
    c = QLinearPass(qp.LinearBackendConfig("torch", per_scheme={"w4a16": "emulation"})).uuid()
    assert len({a, b, c}) == 3
    assert a == QLinearPass(qp.LinearBackendConfig("torch")).uuid()


def test_replacement_is_one_custom_op_call():
    """An opaque kernel leaves exactly one qlinear_pass::linear node per linear."""
    m = linear_model(128, 64, "w4a16", group_size=32, zero_points=True)
    captured = {}

    from qlinear_pass import graph_pass

    orig = graph_pass.rewrite

    def spy(graph, cfg, record, device=None):
        orig(graph, cfg, record, device)
        captured["targets"] = [n.target for n in graph.nodes if n.op == "call_function"]

    graph_pass.rewrite = spy
    try:
        compile_and_run(m, random_activation((3, 128)), "emulation")
    finally:
        graph_pass.rewrite = orig
    targets = captured["targets"]
    assert targets.count(torch.ops.qlinear_pass.linear.default) == 1
    assert torch.ops.aten.mm.default not in targets  # the float32 reference matmul is gone
    assert not any("bitwise" in str(t) or "rshift" in str(t) for t in targets)  # and its unpacking


@pytest.mark.inductor
@pytest.mark.parametrize("layout", ["public", "mma16"])
def test_inductor_end_to_end_with_dynamic_m(layout):
    m = linear_model(128, 64, "w4a16", group_size=64, bias=True)
    m[0].repack(layout)
    f = torch.compile(m, backend=qp.make("emulation"), dynamic=True)
    with torch.no_grad(), recorded() as recs:
        for rows in (3, 17):
            x = random_activation((rows, 128))
            assert S.relative_error(f(x), m(x)) < 1e-2
    assert len(recs) == 1 and recs[0].decisions[0].kernel == "emulation"
    assert recs[0].decisions[0].spec.weight_layout == layout


def test_record_times_the_pass():
    """CompileRecord.pass_seconds: the time the pass itself took (what bench_e2e sums per variant), within the compile's seconds."""
    m = linear_model(128, 64, "int8_weight_only")
    f = torch.compile(m, backend=qp.make("emulation", inductor=False))
    with torch.no_grad(), recorded() as recs:
        f(random_activation((3, 128)))
    (rec,) = recs
    assert len(rec.decisions) == 1
    assert 0.0 < rec.pass_seconds <= rec.seconds


# --- sibling layers (q/k/v, gate/up): one launch ------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Siblings(torch.nn.Module):
    """Three linears that read one normalised activation, as a transformer's q/k/v do, and one, o,
    that reads the activation before the norm."""

    def __init__(self, k=256, ns=(256, 128, 128), bias=False):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(k, n, bias=bias) for n in (*ns, 64))

    def forward(self, x):
        h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)
        return torch.cat([self.q(h), self.k(h) * 2, self.v(h), self.o(x)], -1)


def _linear_ops(model, x, backend):
    """The qlinear_pass call_function nodes left in the graphs (all of them, should Dynamo split the
    forward), the output and the decisions."""
    from qlinear_pass import graph_pass

    nodes = []
    orig = graph_pass.rewrite

    def spy(graph, cfg, record, device=None):
        orig(graph, cfg, record, device)
        nodes.extend(n for n in graph.nodes if n.op == "call_function" and "qlinear_pass" in str(n.target))

    graph_pass.rewrite = spy
    try:
        y, recs = compile_and_run(model, x, backend)
    finally:
        graph_pass.rewrite = orig
    assert nodes, f"no linear rewritten: {[(r.training_reason, r.unmatched, r.origin) for r in recs]}"
    return nodes, y, [d for r in recs for d in r.decisions]


@st.composite
def sibling_cases(draw):
    return dict(scheme=draw(st.sampled_from(["fp8_rowwise", "fp8_block", "int8_rowwise", "int8_weight_only", "w4a16"])),
                rows=draw(st.sampled_from([1, 3])), bias=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])))


# what is drawn here is the pass's grouping: the group kernel's numbers, scheme by scheme, are
# tests/kernels/test_triton_decode.py's (without a compile each), so half the examples
@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available(), reason="needs Triton's interpreter or a GPU")
@settings(max_examples=max(1, settings.default.max_examples // 2))
@given(sibling_cases())
@example(dict(scheme="fp8_rowwise", rows=1, bias=False, dtype=torch.bfloat16))
@example(dict(scheme="w4a16", rows=3, bias=True, dtype=torch.float16))
def test_siblings_run_in_one_group_call(case):
    """q/k/v become one linear_group call (the Triton kernels run it as one launch at decode
    sizes, one by one above); o stays its own call; every output agrees with the reference."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = qp.quantize(Siblings(k=128, ns=(128, 64, 64), bias=case["bias"]).to(case["dtype"]), case["scheme"],
                        group_size=64 if case["scheme"] == "w4a16" else None).to(DEVICE)
    x = random_activation((1, case["rows"], 128), case["dtype"]).to(DEVICE)
    nodes, y, decisions = _linear_ops(model, x, "triton")
    targets = [n.target for n in nodes]
    assert targets.count(torch.ops.qlinear_pass.linear_group.default) == 1
    assert targets.count(torch.ops.qlinear_pass.linear.default) == 1
    notes = {d.spec.module: d.note for d in decisions}
    assert notes["k"] == "one launch with q, v" and notes["o"] == ""
    with torch.no_grad():
        ref = model(x)
    assert S.relative_error(y, ref) <= S.TOLERANCE[case["dtype"]]


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available(), reason="needs Triton's interpreter or a GPU")
def test_explain_names_the_siblings_of_a_group_call():
    """explain() shows each sibling's launch (once here: the grouping is the pass's, whatever the scheme)."""
    torch._dynamo.reset()
    model = qp.quantize(Siblings().to(torch.bfloat16), "fp8_rowwise").to(DEVICE)
    with torch.no_grad():
        assert "[one launch with q, k]" in str(qp.explain(model, random_activation((1, 1, 256)).to(DEVICE),
                                                          linear_backend="triton"))


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET") and not torch.cuda.is_available(), reason="needs Triton's interpreter or a GPU")
def test_dynamic_activation_quantization_stays_in_the_graph():
    """A kernel that takes the quantized activation gets the graph's own (Inductor fuses it into
    the norm before it): the op's input is fp8 and the layer's spec says it arrives quantized."""
    model = qp.quantize(Siblings().to(torch.bfloat16), "fp8_rowwise").to(DEVICE)
    nodes, _, _ = _linear_ops(model, random_activation((1, 1, 256)).to(DEVICE), "triton")
    for n in nodes:
        assert n.args[0].meta["val"].dtype == torch.float8_e4m3fn
    # a kernel that quantizes itself receives the float activation
    nodes, _, _ = _linear_ops(model, random_activation((1, 1, 256)).to(DEVICE), "emulation")
    assert {n.args[0].meta["val"].dtype for n in nodes} == {torch.bfloat16}


def test_layers_of_kernels_without_groups_stay_apart():
    """The emulation kernel runs no groups: one linear call per layer, no notes."""
    model = qp.quantize(Siblings().to(torch.bfloat16), "int8_weight_only")
    nodes, _, decisions = _linear_ops(model, random_activation((1, 1, 256)), "emulation")
    assert [n.target for n in nodes] == [torch.ops.qlinear_pass.linear.default] * 4
    assert all(d.note == "" for d in decisions)


def test_a_layer_holding_the_mma16_layout_hands_kernels_the_packed_weight():
    """The pass finds the layer through the op that reads the layout back, gives the kernel the
    packed tensor itself, and only kernels that read that layout may take it."""
    from qlinear_pass import graph_pass

    m = linear_model(128, 64, "w4a16", group_size=32, zero_points=True)
    m[0].repack("mma16")
    x = random_activation((3, 128))
    seen = {}
    orig = graph_pass.rewrite

    def spy(graph, cfg, record, device=None):
        orig(graph, cfg, record, device)
        calls = [n for n in graph.nodes if n.target == torch.ops.qlinear_pass.linear.default]
        seen["weights"] = [tuple(c.args[1][0].meta["val"].shape) for c in calls]
        seen["targets"] = [n.target for n in graph.nodes if n.op == "call_function"]

    graph_pass.rewrite = spy
    try:
        y, recs = compile_and_run(m, x)
    finally:
        graph_pass.rewrite = orig
    (d,) = recs[0].decisions
    assert d.spec.weight_layout == "mma16" and d.kernel == "emulation"
    assert ("torch_int4pack", "reads the weight in the public layout, not the mma16 layout this layer holds "
            "(QuantizedLinear.repack('public') converts it back)") in d.rejected
    assert seen["weights"] == [(4, 8, 128)]  # the packed buffer, not the public bytes read back from it
    assert torch.ops.qlinear_pass.int4_from_mma16.default not in seen["targets"]
    assert torch.equal(y, m(x))
    assert "w4a16 g32 (mma16)" in str(qp.explain(m, x))
    with pytest.raises(qp.NoKernelError, match="torch_int4pack: reads the weight in the public layout"):
        compile_and_run(m, x, "torch")


@pytest.mark.inductor
@pytest.mark.parametrize("layout", ["public", "mma16"])
@pytest.mark.parametrize("fold", [False, True], ids=["as_traced", "round_trip_folded"])
def test_back_to_back_linears_are_both_replaced(layout, fold):
    """A layer whose activation is the previous layer's output reads that layer's replacement: the
    previous reference (its unpacking and float32 matmul) does not stay alive beside it; also where
    the graph would keep that output in float32 (``fold``: what torch 2.11 does to the round trip)."""
    from qlinear_pass import graph_pass

    torch.manual_seed(0)
    m = qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False), torch.nn.Linear(64, 32, bias=False))
                    .to(torch.bfloat16), "w4a16", group_size=32, weight_layout=layout)
    x = random_activation((5, 128))
    seen = {}
    orig = graph_pass.rewrite

    def spy(graph, cfg, record, device=None):
        if fold:
            fold_round_trips(graph)
        orig(graph, cfg, record, device)
        seen["targets"] = [n.target for n in graph.nodes if n.op == "call_function"]

    def f(model, x):
        return model(x)

    graph_pass.rewrite = spy
    try:
        with torch.no_grad(), recorded() as recs:
            # Inductor drops the views between the two: the second one's activation is the first one's output
            y = torch.compile(f, backend=qp.make("emulation"))(m, x)
    finally:
        graph_pass.rewrite = orig
    assert [d.spec.module for d in recs[0].decisions] == ["0", "1"]
    assert seen["targets"].count(torch.ops.qlinear_pass.linear.default) == 2
    assert torch.ops.aten.mm.default not in seen["targets"]
    # where the graph dropped the round to bf16, the first layer's replacement rounds (as the eager
    # module does) and widens: the second one reads float32
    assert recs[0].decisions[0].spec.out_dtype == torch.bfloat16
    if fold:  # (torch 2.11's Inductor folds the graph as traced too)
        assert recs[0].decisions[1].spec.act_dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(y, m(x))


@pytest.mark.inductor
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [5, 8])
def test_a_layer_gets_its_rows_back_from_inductors_padding(monkeypatch, bias, rows):
    """mm / addmm padded to 8 rows by Inductor's pad_mm (a GPU's): the layer runs its own M rows on
    its 16-bit activation, no padding left; 8 rows needed none."""
    from qlinear_pass import graph_pass

    orig, left = graph_pass.rewrite, {}

    def rewrite(graph, cfg, record, device=None):
        pad_rows(graph)
        left["padded"] = sum(n.target == torch.ops.aten.constant_pad_nd.default for n in graph.nodes)
        orig(graph, cfg, record, device)
        left["after"] = sum(n.target == torch.ops.aten.constant_pad_nd.default for n in graph.nodes)

    monkeypatch.setattr(graph_pass, "rewrite", rewrite)
    model = linear_model(64, 32, "int8_weight_only", bias=bias)
    x = random_activation((rows, 64))
    with torch.no_grad(), recorded() as recs:
        y = torch.compile(model, backend=qp.make("emulation"))(x)
    (d,) = recs[0].decisions
    assert (d.spec.m, d.spec.act_dtype, d.spec.has_bias) == (rows, torch.bfloat16, bias)
    assert left == {"padded": int(rows % 4 != 0), "after": 0}
    with torch.no_grad():
        assert torch.equal(y, model(x))


@pytest.mark.inductor
@pytest.mark.parametrize("scheme", ["fp8_block", "fp8_tensor"])
def test_padding_that_hides_an_activation_quantization_is_undone_too(monkeypatch, scheme):
    """fp8_block / fp8_tensor dequantize the activation before the matmul, so pad_mm pads the
    dequantized activation and the matmul no longer shows its quantization chain: the pass tries it
    without the padding, finds the layer, and gives it its 5 rows back."""
    from qlinear_pass import graph_pass

    orig = graph_pass.rewrite

    def rewrite(graph, cfg, record, device=None):
        pad_rows(graph)
        orig(graph, cfg, record, device)

    monkeypatch.setattr(graph_pass, "rewrite", rewrite)
    model = linear_model(256, 128, scheme, bias=True)
    x = random_activation((5, 256))
    with torch.no_grad(), recorded() as recs:
        y = torch.compile(model, backend=qp.make("emulation"))(x)
    assert [r.unmatched for r in recs] == [[]]
    (d,) = recs[0].decisions
    assert (d.spec.scheme, d.spec.m, d.spec.act_dtype) == (scheme, 5, torch.bfloat16)
    with torch.no_grad():
        assert S.relative_error(y, model(x)) <= S.TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.inductor
@pytest.mark.parametrize("scheme", ["int8_weight_only", "w4a16"])
def test_inductors_own_row_padding_on_a_gpu_leaves_the_layer_its_rows(scheme):
    """The real pad_mm (forced to pad, as it does where padding benchmarks faster): the layer runs
    its own 5 rows of its bf16 activation on the GPU kernel, and its output is the eager module's."""
    import torch._inductor.config as inductor_config

    model = linear_model(256, 128, scheme).cuda()
    x = random_activation((5, 256)).cuda()
    with inductor_config.patch(force_shape_pad=True, shape_padding=True), torch.no_grad(), recorded() as recs:
        y = torch.compile(model, backend=qp.make("auto"))(x)
    (d,) = recs[0].decisions
    assert (d.spec.m, d.spec.act_dtype) == (5, torch.bfloat16), d.spec
    assert not d.kernel.startswith("emulation"), d.kernel
    with torch.no_grad():
        ref = model(x)
    assert S.relative_error(y, ref) <= S.TOLERANCE[torch.bfloat16]
