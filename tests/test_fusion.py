"""fusion.py: the references of what a kernel may run around its product, and the pass moving a
Llama block's norms, SwiGLU and residual adds into the calls of a kernel that runs them."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import qlinear_pass as qp
from qlinear_pass import fusion
from qlinear_pass import registry as R
from qlinear_pass import schemes as S
from qlinear_pass.backends.emulation import EmulationKernel
from qlinear_pass.examples_model import TinyBlock

from .helpers import fold_round_trips, pad_rows, recorded


class RMSNorm(nn.Module):
    """Llama's (Hugging Face's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Block(TinyBlock):
    """The example block (q/k/v, attention, o_proj + residual, gate/up -> SwiGLU -> down_proj +
    residual) with Llama's RMSNorm as Hugging Face writes it (``nn.RMSNorm`` applies its weight in
    fp32 before it rounds: another computation, which the pass leaves in the graph)."""

    def __init__(self, hidden: int = 256, intermediate: int = 512) -> None:
        super().__init__(hidden, intermediate)
        self.norm = RMSNorm(hidden)


def block(dtype=torch.bfloat16, **quantize_kw):
    torch.manual_seed(0)
    return qp.quantize(Block().to(dtype), "w4a16", group_size=64, **quantize_kw)


class _Fusing(EmulationKernel):
    """The reference behind the op, declaring the fusions ``FUSES`` (a test plug-in kernel)."""

    name = "fusing_reference"
    backend = "fusetest"
    FUSES: tuple = fusion.FUSIONS
    seen: list = []

    def why_not_fuse(self, spec, what):
        return "" if what in self.FUSES else f"does not run {what} (this test's kernel)"

    def run_group(self, specs, x, params, biases):
        return [self.run(s, x, p, b) for s, p, b in zip(specs, params, biases)]

    def run_fused(self, specs, x, params, biases, fused):
        type(self).seen.append((fused.prologue, tuple(r is not None for r in fused.residuals)))
        return super().run_fused(specs, x, params, biases, fused)


@pytest.fixture
def fusing():
    _Fusing.seen = []
    qp.register_kernel(_Fusing)
    yield _Fusing
    R.unregister_kernel(_Fusing.name)
    _Fusing.FUSES = fusion.FUSIONS


def _compiled(model, x, backend="fusetest", dynamic=False):
    torch._dynamo.reset()
    with torch.no_grad(), recorded() as recs:
        y = torch.compile(model, backend=qp.make(linear_backend=backend), dynamic=dynamic)(x)
        ref = model(x)
    torch._dynamo.reset()
    return y, ref, {d.spec.module: d.note for r in recs for d in r.decisions}


# --- the references ---------------------------------------------------------------------------


@st.composite
def rows(draw):
    m, k = draw(st.integers(1, 6)), draw(st.sampled_from([8, 64, 256]))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    return (torch.randn(m, k, generator=g) * scale).to(dtype), (torch.randn(m, k, generator=g) * scale).to(dtype)


@given(rows())
@example((torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(2, 8, dtype=torch.bfloat16)))  # a zero row: eps keeps it finite
def test_references_compute_what_the_eager_modules_do(xy):
    x, u = xy
    norm = RMSNorm(x.shape[-1]).to(x.dtype)
    with torch.no_grad():
        assert torch.equal(fusion.rmsnorm(x, norm.weight, norm.eps), norm(x))
    got, eager = fusion.silu_mul(x, u).float(), (F.silu(x) * u).float()
    # silu through exp(-x) here, a sigmoid in eager: one rounding step of the 16-bit dtype apart at most
    assert torch.allclose(got, eager, rtol=2 * torch.finfo(x.dtype).eps, atol=1e-6)
    ys = [torch.ones_like(x), torch.ones_like(x)]
    out = fusion.add_residuals(ys, [x, None])
    assert torch.equal(out[0], ys[0] + x) and out[1] is ys[1]


def test_an_unknown_prologue_is_an_error():
    with pytest.raises(ValueError, match="unknown prologue 'gelu'"):
        fusion.prologue_of(fusion.Fused("gelu"), torch.zeros(1, 8))


# --- the pass -----------------------------------------------------------------------------------


@pytest.fixture
def folding(monkeypatch):
    """The pass sees the graphs as torch 2.11's Inductor hands them over (:func:`fold_round_trips`)."""
    from qlinear_pass import graph_pass

    orig = graph_pass.rewrite

    def rewrite(graph, cfg, record, device=None):
        fold_round_trips(graph)
        orig(graph, cfg, record, device)

    monkeypatch.setattr(graph_pass, "rewrite", rewrite)


@pytest.mark.inductor
@pytest.mark.parametrize("fold", [False, True], ids=["as_traced", "round_trips_folded"])
@pytest.mark.parametrize("shape", [(1, 256), (1, 1, 256)])  # 2-D, and 3-D as Hugging Face models run (views between)
def test_a_block_at_one_token_runs_its_norms_swiglu_and_residuals_in_the_kernels(fusing, request, shape, fold):
    """Also where the graph lost the rounding of gate_proj's output into SwiGLU's silu and of q_proj's
    into attention (2-D, torch 2.11): gate still joins up, q still joins k and v."""
    if fold:
        request.getfixturevalue("folding")
    model = block()
    y, ref, notes = _compiled(model, torch.randn(*shape, dtype=torch.bfloat16))
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert "the RMSNorm before it runs in the kernel" in notes[name], notes[name]
    assert "the residual add after it runs in the kernel" in notes["o_proj"]
    assert "the SwiGLU before it and the residual add after it run in the kernel" in notes["down_proj"]
    assert sorted(fusing.seen) == [("", (True,)), ("rmsnorm", (False, False)), ("rmsnorm", (False, False, False)),
                                   ("silu_mul", (True,))]


@pytest.mark.inductor
def test_torchs_rmsnorm_stays_in_the_graph_and_the_record_says_why(fusing):
    """nn.RMSNorm applies its weight in fp32 and rounds once: not the prologue's computation, so its
    norm stays (the SwiGLU and residual adds still move), and explain() says why."""
    torch.manual_seed(0)
    plain = Block()
    plain.norm = nn.RMSNorm(256, eps=1e-5)
    with torch.no_grad():
        plain.norm.weight.copy_(torch.rand(256) + 0.5)
    model = qp.quantize(plain.to(torch.bfloat16), "w4a16", group_size=64)
    y, ref, notes = _compiled(model, torch.randn(1, 1, 256, dtype=torch.bfloat16))
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]
    for name in ("q_proj", "gate_proj"):
        assert fusion.WEIGHT_FIRST in notes[name] and "RMSNorm before it runs" not in notes[name], notes[name]
    assert "the SwiGLU before it and the residual add after it run in the kernel" in notes["down_proj"]
    assert "rmsnorm" not in [prologue for prologue, _ in fusing.seen]


@pytest.mark.inductor
def test_rows_padded_by_inductor_are_given_back_to_the_layers_alone(fusing, monkeypatch):
    """Inductor's pad_mm (GPU) pads the rows of a float32 matmul; the pass gives the quantized
    layers their M rows back (16-bit activations, siblings and fusions as without the padding) and
    leaves the padding of the matmuls it does not replace (attention's)."""
    from qlinear_pass import graph_pass

    orig, left = graph_pass.rewrite, {}

    def rewrite(graph, cfg, record, device=None):
        pad_rows(graph)
        orig(graph, cfg, record, device)
        left["pads"] = sum(n.target == torch.ops.aten.constant_pad_nd.default for n in graph.nodes)

    model = block()
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    _, _, plain = _compiled(model, x)
    monkeypatch.setattr(graph_pass, "rewrite", rewrite)
    with recorded() as recs:
        y, ref, notes = _compiled(model, x)
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]
    assert notes == plain and "one launch with up_proj" in notes["gate_proj"]
    assert {(d.spec.m, d.spec.act_dtype) for r in recs for d in r.decisions} == {(3, torch.bfloat16)}
    assert left["pads"] >= 1  # attention's matmuls keep theirs


@pytest.mark.inductor
@pytest.mark.parametrize("fold", [False, True], ids=["as_traced", "round_trips_folded"])
def test_what_the_kernel_does_not_run_stays_in_the_graph_and_the_record_says_why(fusing, request, fold):
    if fold:
        request.getfixturevalue("folding")
    fusing.FUSES = ("residual",)  # a kernel that adds residuals only (cuda_w4a16 above one token)
    model = block()
    y, ref, notes = _compiled(model, torch.randn(3, 256, dtype=torch.bfloat16))
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]
    assert "rmsnorm before it stays in the graph (fusing_reference: does not run rmsnorm (this test's kernel))" \
        in notes["q_proj"]
    assert "silu_mul before it stays in the graph" in notes["down_proj"]
    assert "the residual add after it runs in the kernel" in notes["down_proj"]
    assert sorted(fusing.seen) == [("", (True,)), ("", (True,))]


@pytest.mark.inductor
def test_a_norm_read_by_another_layer_too_stays(fusing):
    """A norm whose output something else reads is computed in the graph anyway: nothing to take out."""

    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.a, self.b = RMSNorm(128), nn.Linear(128, 64, bias=False), nn.Linear(128, 64, bias=False)

        def forward(self, x):
            h = self.norm(x)
            return self.a(h) * self.b(h).sum(-1, keepdim=True) + h[..., :64]

    torch.manual_seed(0)
    model = qp.quantize(TwoReaders().to(torch.bfloat16), "w4a16", group_size=64)
    y, ref, notes = _compiled(model, torch.randn(1, 128, dtype=torch.bfloat16))
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]
    assert not any("runs in the kernel" in n for n in notes.values()) and fusing.seen == []


class _Then(nn.Module):
    """One linear (``lin``, 128 -> n) whose output ``then(y, x)`` combines with its input."""

    def __init__(self, n, then):
        super().__init__()
        self.lin, self.then = nn.Linear(128, n, bias=False), then

    def forward(self, x):
        return self.then(self.lin(x), x)


def _then(n, then):
    torch.manual_seed(0)
    return qp.quantize(_Then(n, then).to(torch.bfloat16), "w4a16", group_size=64)


@pytest.mark.inductor
def test_a_residual_of_another_dtype_is_not_taken(fusing):
    """``out + r`` with r in float32 promotes: the add stays in the graph."""

    model = _then(128, lambda y, x: y + x.float())
    y, ref, notes = _compiled(model, torch.randn(2, 128, dtype=torch.bfloat16))
    assert y.dtype == torch.float32 and S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]
    assert fusing.seen == [] and "runs in the kernel" not in notes["lin"]


@pytest.mark.inductor
def test_an_output_added_to_itself_is_no_residual(fusing):
    model = _then(64, lambda y, x: y + y)
    y, ref, notes = _compiled(model, torch.randn(1, 128, dtype=torch.bfloat16))
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]
    assert fusing.seen == [] and "in the kernel" not in notes["lin"]


def test_the_default_kernel_fuses_nothing():
    from qlinear_pass.spec import LayerSpec

    spec = LayerSpec(scheme="w4a16", n=64, k=128, act_dtype=torch.bfloat16, out_dtype=torch.bfloat16, m=1, group_size=64)
    assert EmulationKernel().why_not_fuse(spec, "rmsnorm") == "does not run rmsnorm in its launch"


@pytest.mark.inductor
def test_fuse_false_leaves_them_in_the_graph(fusing):
    model = block()
    torch._dynamo.reset()
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    with torch.no_grad(), recorded() as recs:
        y = torch.compile(model, backend=qp.make(config=qp.LinearBackendConfig("fusetest", fuse=False)))(x)
    torch._dynamo.reset()
    assert fusing.seen == [] and not any("in the kernel" in d.note for r in recs for d in r.decisions)
    with torch.no_grad():
        assert S.relative_error(y, model(x)) < S.TOLERANCE[torch.bfloat16]
    assert repr(qp.LinearBackendConfig("cuda", fuse=False)) == "LinearBackendConfig(linear_backend='cuda', fuse=False)"
    assert qp.LinearBackendConfig("cuda", fuse=False).describe() == "cuda/nofuse"
    with pytest.raises(TypeError, match="fuse must be True or False"):
        qp.LinearBackendConfig("cuda", fuse=1)

