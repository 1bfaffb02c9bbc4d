"""Triton kernels against the scheme references: through the pass (hypothesis) and path by path.

On a machine without a GPU these run through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py); the ``gpu`` tests run on CUDA
with larger and odd shapes, M from 1 to 4096, and poisoned output memory.
"""
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import qlinear_pass as qp
from qlinear_pass import schemes as S
from qlinear_pass.registry import DeviceInfo, LayerSpec, get_kernel

from ..helpers import kernel_case
from .conformance import check_drawn_or_pinned, layer_cases

pytest.importorskip("triton")

W8A8 = ["fp8_tensor", "fp8_rowwise", "fp8_block", "int8_rowwise"]
WEIGHT_ONLY = ["int8_weight_only", "fp8_weight_only", "w4a16"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_direct(scheme, m, n, k, *, act_input, dtype=torch.bfloat16, bias=True, group_size=64, zero_points=False,
               seed=0, device=DEVICE, poison=False, kernel=None, layout="public", **run_kwargs):
    """Call the kernel's run() directly (what the custom op does) and compare with the reference
    (``layout`` "mma16": a w4a16 weight held in the MMA-fragment layout)."""
    sch = S.get_scheme(scheme)
    static = act_input == "static"
    x, params, b, xs, ref = kernel_case(scheme, m, n, k, static=static, group_size=group_size,
                                        zero_points=zero_points, dtype=dtype, bias=bias, seed=seed, device=device)
    spec = dict(scheme=scheme, n=n, k=k, act_dtype=x.dtype, out_dtype=dtype, has_bias=bias,
                group_size=group_size if scheme == "w4a16" else None, zero_points=zero_points,
                act_input=act_input, device=device, m=m, weight_layout=layout)
    if layout == "mma16":
        from qlinear_pass.kernels.int4_layout import to_mma16

        params = [to_mma16(params[0]), *params[1:]]
    if static:
        params = params + [xs]
    if poison and device == "cuda":
        # fill the caching allocator's free blocks with NaN: an unwritten output element shows
        torch.full((m * n * 4 + (1 << 20),), float("nan"), device=device)
    kernel = get_kernel(kernel or ("triton_weight_only" if sch.weight_only else "triton_w8a8"))
    y = kernel.run(LayerSpec(**spec), x, params, b, **run_kwargs)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = S.relative_error(y, ref)
    assert err <= S.TOLERANCE[dtype], f"{scheme} {act_input} M={m} N={n} K={k} {run_kwargs or ''}: relative error {err:.3g}"
    return err


# M = 1 takes the GEMV, 5 the split-K GEMM (fused quantization for per-token), 40 the large-tile GEMM
PATH_MS = [1, 5, 40]


@pytest.mark.parametrize("m", PATH_MS)
@pytest.mark.parametrize("act_input", ["dynamic", "static"])
@pytest.mark.parametrize("scheme", W8A8)
def test_w8a8_paths(scheme, act_input, m):
    run_direct(scheme, m, 80, 256, act_input=act_input)


# M = 130: above DEQUANT_ABOVE_M the weight is dequantised once and the matmul is torch's
# M = 64: w4a16's last weight-stationary M (WEIGHT_STATIONARY_MAX_M)
@pytest.mark.parametrize("m", PATH_MS + [64, 130])
@pytest.mark.parametrize("scheme,group,zp", [("int8_weight_only", 64, False), ("fp8_weight_only", 64, False),
                                             ("w4a16", 32, False), ("w4a16", 64, True), ("w4a16", 128, True)])
def test_weight_only_paths(scheme, group, zp, m):
    run_direct(scheme, m, 48, 256, act_input="none", group_size=group, zero_points=zp)


@pytest.mark.parametrize("scheme,group,zp", [("int8_weight_only", 0, False), ("fp8_weight_only", 0, False),
                                             ("w4a16", 32, True), ("w4a16", 128, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_is_the_reference_weight(scheme, group, zp, dtype):
    """The one-pass dequantisation gives the reference's float32 weight, rounded once: exactly on a
    GPU; Triton's interpreter rounds its fp32 -> 16-bit casts towards zero, so there within an ulp."""
    from qlinear_pass.kernels import triton_gemm as T

    g = torch.Generator().manual_seed(1)
    p = S.quantize_weight(scheme, torch.randn(40, 512, generator=g), group_size=group or 128, zero_points=zp)
    params = [p.get(nm) for nm in S.get_scheme(scheme).param_names]
    params = [None if t is None else t.to(DEVICE) for t in params]
    kind = {"int8_weight_only": T.W_INT8, "fp8_weight_only": T.W_FP8, "w4a16": T.W_INT4}[scheme]
    out = T.dequantize(params[0], params[1], params[2] if len(params) > 2 else None, dtype, kind=kind, k=512,
                       group_size=group)
    ref32 = S.dequantize_weight(scheme, params, 512)
    if DEVICE == "cuda":
        assert torch.equal(out, ref32.to(dtype))
    else:
        ulp = torch.finfo(dtype).eps * ref32.abs() + torch.finfo(dtype).smallest_normal
        assert ((out.float() - ref32).abs() <= ulp).all()


# a w4a16 weight in the MMA-fragment layout: the dequantising pass at every M
@pytest.mark.parametrize("m", [1, 40, 130])
@pytest.mark.parametrize("group,zp", [(32, True), (128, False)])
def test_w4a16_in_the_mma16_layout(group, zp, m):
    run_direct("w4a16", m, 48, 256, act_input="none", group_size=group, zero_points=zp, layout="mma16")
    if m == 1:  # the group path (q/k/v) as well
        from qlinear_pass.kernels.int4_layout import to_mma16

        x, p, b, _, ref = kernel_case("w4a16", 1, 32, 256, group_size=group, zero_points=zp, device=DEVICE)
        spec = LayerSpec(scheme="w4a16", n=32, k=256, act_dtype=x.dtype, out_dtype=x.dtype, has_bias=True,
                         group_size=group, zero_points=zp, device=DEVICE, m=1, weight_layout="mma16")
        ys = get_kernel("triton_weight_only").run_group([spec, spec], x, [[to_mma16(p[0]), *p[1:]]] * 2, [b, b])
        assert all(S.relative_error(y, ref) <= S.TOLERANCE[x.dtype] for y in ys)


@st.composite
def mma16_weights(draw):
    return dict(n=16 * draw(st.integers(1, 6)), k=128 * draw(st.integers(1, 3)), group=draw(st.sampled_from([32, 64, 128])),
                zp=draw(st.booleans()), dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
                seed=draw(st.integers(0, 99)))


@given(case=mma16_weights())
@example(case=dict(n=16, k=128, group=128, zp=False, dtype=torch.bfloat16, seed=0))  # one atom row, one block
@example(case=dict(n=96, k=384, group=32, zp=True, dtype=torch.float16, seed=1))  # K off the 256-wide block
def test_dequantize_reads_the_mma16_layout_as_the_public_one(case):
    """The pass over the MMA-fragment layout gives the same values as over the public bytes, bit for bit."""
    from qlinear_pass.kernels import triton_gemm as T
    from qlinear_pass.kernels.int4_layout import to_mma16

    c = case
    g = torch.Generator().manual_seed(c["seed"])
    p = S.quantize_weight("w4a16", torch.randn(c["n"], c["k"], generator=g), group_size=c["group"], zero_points=c["zp"])
    w, s, z = (None if p.get(nm) is None else p[nm].to(DEVICE) for nm in S.get_scheme("w4a16").param_names)
    public = T.dequantize(w, s, z, c["dtype"], kind=T.W_INT4, k=c["k"], group_size=c["group"])
    packed = T.dequantize(to_mma16(w), s, z, c["dtype"], kind=T.W_INT4_MMA16, k=c["k"], group_size=c["group"])
    assert torch.equal(packed, public)


def test_fp16_and_no_bias():
    run_direct("fp8_rowwise", 3, 32, 128, act_input="dynamic", dtype=torch.float16, bias=False)
    run_direct("w4a16", 1, 32, 128, act_input="none", dtype=torch.float16, bias=False, group_size=128)


@pytest.mark.parametrize("scheme", W8A8 + WEIGHT_ONLY)
@given(data=st.data())
@example(data=None)
def test_triton_through_the_pass(scheme, data):
    dtypes = [torch.bfloat16, torch.float16] if scheme in WEIGHT_ONLY else None
    kernel = "triton_weight_only" if scheme in WEIGHT_ONLY else "triton_w8a8"
    check_drawn_or_pinned(scheme, "triton", data, strategy=layer_cases(scheme, dtypes=dtypes), device=DEVICE,
                          expect_kernel=kernel)


def spec(scheme, **kw):
    base = dict(scheme=scheme, n=4096, k=4096, act_dtype=torch.bfloat16, out_dtype=torch.bfloat16, device="cuda",
                act_input="dynamic")
    base.update(kw)
    return LayerSpec(**base)


def test_honest_reasons():
    w8a8, wo = get_kernel("triton_w8a8"), get_kernel("triton_weight_only")
    ok, why = w8a8.is_supported(DeviceInfo("cuda", (8, 0), "fake A100"))
    assert not ok and "sm89" in why
    ok, why = wo.is_supported(DeviceInfo("cuda", (7, 5), "fake T4"))
    assert not ok and "sm80" in why
    ok, why = w8a8.can_implement(spec("fp8_rowwise", k=4008))
    assert not ok and "K divisible by 32" in why
    ok, why = wo.can_implement(spec("w4a16", k=4032, group_size=64, act_input="none"))
    assert not ok and "multiple of 128" in why
    ok, why = wo.can_implement(spec("int8_weight_only", act_dtype=torch.float32, act_input="none"))
    assert not ok and "bf16/fp16" in why
    assert w8a8.can_implement(spec("fp8_block"))[0]


def test_priority_prefers_triton_on_gpus_only():
    from qlinear_pass.registry import candidates

    gpu = [k.name for k in candidates("fp8_rowwise", DeviceInfo("cuda", (9, 0), "fake H100"))]
    assert gpu.index("triton_w8a8") < gpu.index("torch_scaled_mm")
    cpu = [k.name for k in candidates("fp8_rowwise", DeviceInfo("cpu"))]
    assert cpu.index("triton_w8a8") > cpu.index("torch_scaled_mm")


# --- on the GPU: larger and odd shapes, M from 1 to 4096 --------------------------------------


@pytest.mark.gpu
@given(
    scheme=st.sampled_from(W8A8 + WEIGHT_ONLY),
    m=st.sampled_from([1, 2, 7, 16, 17, 33, 100, 255, 1024, 4096]),
    n=st.sampled_from([40, 136, 1000, 4096, 6144]),
    kb=st.sampled_from([1, 3, 8, 32]),
    act_input=st.sampled_from(["dynamic", "static"]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 1000),
)
def test_gpu_against_reference(scheme, m, n, kb, act_input, dtype, seed):
    k = kb * 128
    if scheme in WEIGHT_ONLY:
        act_input = "none"
    run_direct(scheme, m, n, k, act_input=act_input, dtype=dtype, seed=seed, device="cuda", poison=True,
               group_size=[32, 64, 128][seed % 3], zero_points=bool(seed % 2) and scheme == "w4a16")


@pytest.mark.gpu
def test_gpu_through_compile_with_inductor():
    from .conformance import linear_model, random_activation

    m = linear_model(4096, 1024, "w4a16", group_size=128).cuda()
    f = torch.compile(m, backend=qp.make("triton"), dynamic=True)
    with torch.no_grad():
        for rows in (1, 16, 300):
            x = random_activation((rows, 4096)).cuda()
            assert S.relative_error(f(x), m(x)) < S.TOLERANCE[torch.bfloat16]


@st.composite
def weight_stationary_cases(draw):
    scheme = draw(st.sampled_from(["w4a16", "int8_weight_only", "fp8_weight_only"]))
    group = draw(st.sampled_from([32, 64, 128])) if scheme == "w4a16" else 0
    return dict(scheme=scheme, group=group, zp=scheme == "w4a16" and draw(st.booleans()),
                m=draw(st.integers(1, 80)), n=draw(st.integers(1, 20)) * 8, k=draw(st.integers(1, 4)) * 128,
                split_k=draw(st.sampled_from([1, 2, 3])), dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
                bias=draw(st.booleans()), seed=draw(st.integers(0, 99)))


@given(case=weight_stationary_cases())
@example(case=dict(scheme="w4a16", group=128, zp=False, m=1, n=8, k=128, split_k=1, dtype=torch.bfloat16, bias=False, seed=0))
@example(case=dict(scheme="w4a16", group=32, zp=True, m=65, n=136, k=512, split_k=3, dtype=torch.float16, bias=True, seed=1))
@example(case=dict(scheme="fp8_weight_only", group=0, zp=False, m=17, n=24, k=384, split_k=2, dtype=torch.bfloat16, bias=True, seed=2))
def test_weight_stationary_gemm_against_reference(case):
    """The weight-stationary GEMM (the weight as the MMA's row operand): any M (one token tile up to
    64, several above), ragged N, K in 128-wide tiles (one or several groups a tile), split K."""
    from qlinear_pass.kernels import triton_gemm as T

    c = case
    x, params, b, _, ref = kernel_case(c["scheme"], c["m"], c["n"], c["k"], group_size=c["group"] or 128,
                                       zero_points=c["zp"], dtype=c["dtype"], bias=c["bias"], seed=c["seed"], device=DEVICE)
    kind = {"w4a16": T.W_INT4, "int8_weight_only": T.W_INT8, "fp8_weight_only": T.W_FP8}[c["scheme"]]
    y = T.weight_only_gemm_t(x, params[0], params[1], params[2] if len(params) > 2 else None, b, c["dtype"], kind=kind,
                             group_size=c["group"], split_k=c["split_k"])
    assert y.dtype == c["dtype"] and y.shape == ref.shape
    assert S.relative_error(y, ref) <= S.TOLERANCE[c["dtype"]], c


def test_weight_stationary_gemm_refuses_k_off_the_tile():
    from qlinear_pass.kernels import triton_gemm as T

    x = torch.zeros(2, 96, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="128-wide tiles"):
        T.weight_only_gemm_t(x, torch.zeros(8, 48, dtype=torch.uint8), torch.ones(8, 3), None, None, torch.bfloat16,
                             kind=T.W_INT4, group_size=32)


def test_weight_stationary_split_fills_the_sms_at_small_m_only():
    from qlinear_pass.kernels import triton_gemm as T

    assert T.wt_split_k(16, 4096, 14336, 132) == 4  # 64 tiles of 64 rows: 4 K slices
    assert T.wt_split_k(16, 14336, 4096, 132) == 1  # 224 tiles fill 132 SMs
    assert T.wt_split_k(65, 4096, 14336, 132) == 1  # above one token tile: no split
    assert T.wt_split_k(1, 4096, 512, 132) == 1     # K too short to split
