"""The pass over whole graphs: shapes, dtypes, dynamic M, training graphs, cache keys."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qlinear_pass as qp
from qlinear_pass import schemes as S
from qlinear_pass.graph_pass import QLinearPass

from .helpers import compile_and_run, linear_model, random_activation, recorded


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


def test_training_graph_is_left_untouched_and_correct():
    m = linear_model(64, 32, "int8_weight_only", bias=True, dtype=torch.float32)
    assert m[0].bias.requires_grad
    x = random_activation((4, 64), torch.float32)
    with recorded() as recs:
        y = torch.compile(m, backend=qp.make("emulation", inductor=False))(x)
    assert recs and all(r.training and not r.decisions for r in recs)
    y.sum().backward()
    assert m[0].bias.grad is not None
    torch.testing.assert_close(m[0].bias.grad, torch.full((32,), 4.0))
    with torch.no_grad():
        torch.testing.assert_close(y, m(x))


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
def test_inductor_end_to_end_with_dynamic_m():
    m = linear_model(128, 64, "w4a16", group_size=64, bias=True)
    f = torch.compile(m, backend=qp.make("emulation"), dynamic=True)
    with torch.no_grad(), recorded() as recs:
        for rows in (3, 17):
            x = random_activation((rows, 128))
            assert S.relative_error(f(x), m(x)) < 1e-2
    assert len(recs) == 1 and recs[0].decisions[0].kernel == "emulation"


def test_record_times_the_pass():
    """CompileRecord.pass_seconds: the time the pass itself took (what bench_e2e sums per variant), within the compile's seconds."""
    m = linear_model(128, 64, "int8_weight_only")
    f = torch.compile(m, backend=qp.make("emulation", inductor=False))
    with torch.no_grad(), recorded() as recs:
        f(random_activation((3, 128)))
    (rec,) = recs
    assert len(rec.decisions) == 1
    assert 0.0 < rec.pass_seconds <= rec.seconds
