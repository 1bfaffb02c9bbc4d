"""Shared test helpers: small quantized models, compiling with the pass, recorded decisions."""
from __future__ import annotations

import torch

import qlinear_pass as qp
from qlinear_pass import schemes as S
from qlinear_pass.graph_pass import watch

ALL_SCHEMES = S.SCHEMES if hasattr(S, "SCHEMES") else tuple(s.name for s in S.all_schemes())


def linear_model(k: int, n: int, scheme: str, *, bias=False, dtype=torch.bfloat16, group_size=128, zero_points=False, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.5)
    m = torch.nn.Sequential(lin).to(dtype)
    return qp.quantize(m, scheme, group_size=group_size if scheme == "w4a16" else None, zero_points=zero_points)


def random_activation(shape, dtype=torch.bfloat16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def kernel_case(scheme, m, n, k, *, static=False, group_size=64, zero_points=False, dtype=torch.bfloat16, bias=True,
                seed=0, device="cpu"):
    """Inputs for calling one kernel directly, and the scheme reference's output on them:
    ``(x, params, bias, input_scale, ref)``.  Rows of x differ in magnitude by up to 2**6, so a
    per-token scale that leaks across rows shows.  With ``static`` (W8A8 schemes), x is the
    quantized activation and ``input_scale`` its scale; otherwise ``input_scale`` is None."""
    g = torch.Generator().manual_seed(seed)
    sch = S.get_scheme(scheme)
    p = S.quantize_weight(scheme, torch.randn(n, k, generator=g) * 0.05, group_size=group_size, zero_points=zero_points)
    params = [None if p.get(nm) is None else p[nm].to(device) for nm in sch.param_names]
    x = (torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-3, 4, (m, 1), generator=g).float())).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    if static and not sch.weight_only:
        xq, xs = S.quantize_activation(scheme, x)
        return xq, params, b, xs, S.reference(scheme, xq, params, b, input_scale=xs, out_dtype=dtype)
    return x, params, b, None, S.reference(scheme, x, params, b)


def recorded():
    """Collect the CompileRecords made inside the block."""
    return watch()


def kernels_of(records) -> list:
    return [d.kernel for r in records for d in r.decisions]


def compile_and_run(model, x, backend=None, *, inductor=False, dynamic=None):
    with torch.no_grad(), recorded() as recs:
        f = torch.compile(model, backend=qp.make(backend, inductor=inductor), dynamic=dynamic)
        y = f(x)
    return y, recs


def late_copy(src: torch.Tensor, dst: torch.Tensor, spin: int = 100_000) -> None:
    """``dst.copy_(src)`` (same shape, contiguous) by one Triton kernel that first lets a kernel
    launched after it with programmatic dependent launch start (``gdc_launch_dependents``), then
    spins for ``spin`` dependent steps before it writes: such a kernel that read ``dst`` before
    waiting for this one would read its old values.  GPU (sm90+) only."""
    import triton
    import triton.language as tl

    @triton.jit
    def _late_copy(src_ptr, dst_ptr, n, spin, BLOCK: tl.constexpr):
        tl.extra.cuda.gdc_launch_dependents()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(src_ptr + offs, mask=mask)
        acc = tl.zeros([BLOCK], tl.float32) + 1.0
        for _ in range(spin):
            acc = acc * 0.999999 + 0.000001
        tl.store(dst_ptr + offs, tl.where(acc == 12345.0, tl.zeros_like(v), v), mask=mask)

    a, b = src.contiguous().view(torch.uint8).reshape(-1), dst.view(torch.uint8).reshape(-1)
    assert dst.is_contiguous() and a.numel() == b.numel()
    _late_copy[(triton.cdiv(a.numel(), 1024),)](a, b, a.numel(), spin, BLOCK=1024)


def assert_each_matches(outs, refs) -> None:
    """``outs[j][i]`` (activation j, layer i) against ``refs[j][i]``, each within its dtype's tolerance."""
    for j, (ys, want) in enumerate(zip(outs, refs)):
        for i, (y, ref) in enumerate(zip(ys, want)):
            err = S.relative_error(y, ref)
            assert err <= S.TOLERANCE[y.dtype], f"activation {j}, layer {i}: relative error {err:.3g}"


def fused_inputs(prologue: str, m: int, k: int, ns, residual, dtype, seed: int = 0):
    """(x, fusion.Fused) on the GPU for a kernel test of what fusion moves into a launch: an
    activation [M, K], the prologue's operand (SwiGLU's up half, or the norm's weights) and one
    residual [M, N_i] or None a layer (``residual``: booleans)."""
    from qlinear_pass import fusion

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g) * 2
    x2 = torch.randn(m, k, device="cuda", dtype=dtype, generator=g) if prologue == "silu_mul" else None
    nw = (torch.rand(k, device="cuda", generator=g) + 0.5).to(dtype) if prologue == "rmsnorm" else None
    return x, fusion.Fused(prologue, x2, nw, 1e-5, [torch.randn(m, n, device="cuda", dtype=dtype, generator=g) if r else None
                                                    for n, r in zip(ns, residual)])


def fold_round_trips(graph):
    """convert(convert(t, bf16), float32) of a float32 ``t`` (the inner convert read by the outer
    alone) made convert(t, float32), as torch 2.11's Inductor hands such a graph to the pass: a
    linear's rounding to bf16 and its reader's widening folded into a no-op."""
    cvt = torch.ops.prims.convert_element_type.default
    for n in list(graph.nodes):
        src = n.args[0] if n.target is cvt else None
        if n.args[1:2] == (torch.float32,) and src is not None and src.target is cvt and len(src.users) == 1 \
                and src.args[0].meta["val"].dtype == torch.float32:
            with graph.inserting_before(n):
                folded = graph.call_function(cvt, (src.args[0], torch.float32))
            folded.meta = dict(n.meta)
            n.replace_all_uses_with(folded)
            graph.erase_node(n)
    graph.eliminate_dead_code()


def pad_rows(graph):
    """Each mm / addmm whose M rows are not a multiple of its alignment (4 float32 values, 8 16-bit
    ones), as Inductor's ``pad_mm`` leaves it on a GPU where padding benchmarks faster:
    slice(mm(constant_pad_nd(a, [0, 0, 0, p]), w), 0, 0, -p)."""
    aten = torch.ops.aten
    for n in list(graph.nodes):
        if n.target not in (aten.mm.default, aten.addmm.default):
            continue
        i = 1 if n.target == aten.addmm.default else 0
        a = n.args[i]
        rows = a.meta["val"].shape[0]
        align = {torch.float32: 4, torch.bfloat16: 8, torch.float16: 8}.get(a.meta["val"].dtype)
        if align is None or not isinstance(rows, int) or rows % align == 0:
            continue
        p = align - rows % align
        with graph.inserting_before(n):
            pad = graph.call_function(aten.constant_pad_nd.default, (a, [0, 0, 0, p]))
        pad.meta["val"] = aten.constant_pad_nd.default(a.meta["val"], [0, 0, 0, p])
        n.replace_input_with(a, pad)
        n.meta["val"] = n.target(*[x.meta["val"] if hasattr(x, "meta") else x for x in n.args])
        with graph.inserting_after(n):
            sl = graph.call_function(aten.slice.Tensor, (n, 0, 0, -p))
        n.replace_all_uses_with(sl, delete_user_cb=lambda u: u is not sl)
        sl.meta["val"] = aten.slice.Tensor(n.meta["val"], 0, 0, -p)
