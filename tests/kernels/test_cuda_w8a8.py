"""The CUDA W8A8 decode kernel (kernels/cuda/w8a8_decode.cu): on the GPU against the scheme's
reference under hypothesis; on the CPU its argument checks, its ABI and a model of the fragment
mapping it relies on (its nvcc build is checked with the other CUDA sources, in test_cuda_w4a16)."""

import ctypes

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from qlinear_pass import fusion
from qlinear_pass import registry as R
from qlinear_pass import schemes as S
from qlinear_pass.backends.cuda import CudaW8A8
from qlinear_pass.kernels import cuda_w8a8 as CW
from tests.helpers import assert_each_matches, fused_inputs, kernel_case, late_copy

SCHEMES = ("fp8_rowwise", "fp8_tensor", "int8_rowwise")


@st.composite
def cases(draw):
    m = draw(st.integers(1, 20))
    return dict(
        scheme=draw(st.sampled_from(SCHEMES)),
        m=m,
        ns=draw(st.lists(st.integers(1, 300), min_size=1, max_size=4)),
        k=draw(st.sampled_from([128, 256, 640, 4096])),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32])),
        bias=draw(st.booleans()),
        row_tiles=draw(st.sampled_from([None, 1, 2, 3] if m > 8 else [None, 1, 2])),  # 48 rows above 8 tokens
        warps=draw(st.sampled_from([None, 8, 4])),
    )


def check(scheme, m, ns, k, dtype, bias, row_tiles, warps=None, seed=0):
    layers, refs, xq, xs = [], [], None, None
    for i, n in enumerate(ns):
        # the same activation for every layer (seed fixed), each its own weight (seed + i)
        xq_i, p, b, xs_i, _ = kernel_case(scheme, m, n, k, static=True, dtype=dtype, bias=bias, seed=seed, device="cuda")
        _, p, b, _, _ = kernel_case(scheme, m, n, k, static=True, dtype=dtype, bias=bias, seed=seed + 1000 * i, device="cuda")
        xq, xs = (xq_i, xs_i) if xq is None else (xq, xs)
        layers.append(CW.Layer(p[0], p[1], b))
        refs.append(S.reference(scheme, xq, p, b, input_scale=xs, out_dtype=dtype))
    ys = CW.w8a8_decode_group(xq, xs, layers, dtype, row_tiles=row_tiles, warps=warps)
    for i, (y, ref) in enumerate(zip(ys, refs)):
        assert y.shape == ref.shape and y.dtype == dtype
        err = S.relative_error(y, ref)
        assert err <= S.TOLERANCE[dtype], f"{scheme} layer {i} of {ns} M={m} K={k}: relative error {err:.3g}"


def _runs_here():
    if not torch.cuda.is_available():
        return False, "no GPU"
    return CudaW8A8().is_supported(R.DeviceInfo.of("cuda"))


@pytest.mark.gpu
@given(cases(), st.integers(0, 2**16))
@example(dict(scheme="fp8_rowwise", m=1, ns=[4096, 1024, 1024], k=4096, dtype=torch.bfloat16, bias=False, row_tiles=None), 0)  # q/k/v
@example(dict(scheme="int8_rowwise", m=16, ns=[17], k=640, dtype=torch.float16, bias=True, row_tiles=2), 1)  # ragged N, 2 token tiles
@example(dict(scheme="fp8_tensor", m=20, ns=[40], k=256, dtype=torch.float32, bias=True, row_tiles=1), 2)  # M past 16
@example(dict(scheme="int8_rowwise", m=3, ns=[64, 48], k=14336, dtype=torch.bfloat16, bias=False, row_tiles=2), 3)  # long K
@example(dict(scheme="fp8_rowwise", m=8, ns=[100, 33], k=14336, dtype=torch.float16, bias=True, row_tiles=1, warps=4), 4)  # 4 warps
@example(dict(scheme="int8_rowwise", m=16, ns=[4096, 1024, 1024], k=4096, dtype=torch.bfloat16, bias=True,
              row_tiles=None), 5)  # q/k/v at 16 tokens: the rule's 48-row tiles (int32 sums)
@example(dict(scheme="fp8_tensor", m=25, ns=[100, 17], k=640, dtype=torch.float16, bias=False, row_tiles=3), 6)  # ragged, 2 token tiles
# 4 warps a CTA above 8 tokens: 48-row tiles (int32 sums), and two slices of tokens
@example(dict(scheme="int8_rowwise", m=16, ns=[300, 60], k=640, dtype=torch.bfloat16, bias=True, row_tiles=3, warps=4), 7)
@example(dict(scheme="fp8_tensor", m=25, ns=[100], k=4096, dtype=torch.float16, bias=False, row_tiles=2, warps=4), 8)
def test_matches_reference_on_gpu(case, seed):
    ok, why = _runs_here()
    if not ok:
        pytest.skip(why)
    check(**case, seed=seed)


@pytest.mark.gpu
def test_strided_activation_on_gpu():
    ok, why = _runs_here()
    if not ok:
        pytest.skip(why)
    xq, p, b, xs, ref = kernel_case("fp8_rowwise", 3, 64, 256, static=True, device="cuda")
    wide = torch.zeros(3, 512 + 16, dtype=xq.dtype, device="cuda")
    wide[:, 16:272] = xq  # the view starts 16 bytes in and is not contiguous
    y = CW.w8a8_decode(wide[:, 16:272], xs, p[0], p[1], b, torch.bfloat16)
    assert S.relative_error(y, ref) <= S.TOLERANCE[torch.bfloat16]


def test_refuses_bad_arguments():
    xq = torch.zeros(1, 256, dtype=torch.float8_e4m3fn)
    w = torch.zeros(8, 256, dtype=torch.float8_e4m3fn)
    sw, sx = torch.ones(8), torch.ones(1, 1)
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
        CW.w8a8_decode(xq, sx, w, sw, None, torch.bfloat16)
    with pytest.raises(ValueError, match="fp8 e4m3 or int8 activation"):
        CW.w8a8_decode(xq.float(), sx, w, sw, None, torch.bfloat16)
    with pytest.raises(ValueError, match="writes bf16, fp16 or fp32"):
        CW.w8a8_decode(xq, sx, w, sw, None, torch.int8)
    assert "chunks of 128" in CW.check_k(192) and CW.check_k(4096) == ""


def test_row_tiles_rule():
    assert CW.w8_row_tiles(16, 6144, 132) == 3  # q/k/v: 192 tiles of 32 rows fill 73% of a second round, 128 of 48 one
    # fp8_block (a tile stays in its 128-row block): 16 rows where they, and not 32, make two tiles an SM
    assert CW.w8_row_tiles(16, 6144, 132, block=True) == 1
    assert CW.w8_row_tiles(32, 6144, 132, block=True) == 2  # above 16 tokens not measured: 32 rows
    assert CW.w8_row_tiles(16, 4096, 132, block=True) == 2  # 16-row tiles would be under two an SM
    assert CW.w8_row_tiles(16, 14336, 132, block=True) == 2  # fp8_block at 16 tokens: 32 rows where they fill the SMs
    assert CW.w8_row_tiles(8, 6144, 132) == 2  # up to 8 tokens: 32 rows (several CTAs an SM)
    assert CW.w8_row_tiles(16, 14336, 132) == 2  # 448 tiles fill 85%: 32 rows
    assert CW.w8_row_tiles(16, 1024, 132) == 1  # too few rows for 32


@pytest.mark.gpu
def test_48_row_tiles_are_refused_where_they_cannot_run_on_gpu():
    ok, why = _runs_here()
    if not ok:
        pytest.skip(why)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    w, sw = torch.zeros(64, 256, device="cuda", dtype=torch.int8), torch.ones(64, device="cuda")
    with pytest.raises(RuntimeError, match="row_tiles 3 .* more than 8 tokens"):
        CW.w8a16_decode(x, w, sw, None, row_tiles=3)
    wb = torch.zeros(128, 256, device="cuda", dtype=torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="scale per channel or per tensor"):
        CW.fp8_block_decode(torch.randn(16, 256, device="cuda", dtype=torch.bfloat16), wb, torch.ones(1, 2, device="cuda"),
                            None, row_tiles=3)
    with pytest.raises(RuntimeError, match="row_tiles must be 1, 2 or 3"):
        CW.w8a16_decode(torch.randn(16, 256, device="cuda", dtype=torch.bfloat16), w, sw, None, row_tiles=4)


def test_scales_are_one_value_or_one_per_row():
    assert CW._scale(torch.tensor(2.0), 5, "s")[1] == 0
    s, stride = CW._scale(torch.ones(5, 1, dtype=torch.bfloat16), 5, "s")
    assert stride == 1 and s.dtype == torch.float32 and s.shape == (5,)
    with pytest.raises(ValueError, match="expected one value or 5"):
        CW._scale(torch.ones(4), 5, "the weight scale")
    with pytest.raises(ValueError, match="expected one value or 6"):
        CW._scale(torch.ones(2, 3), 6, "the weight scale")


def test_warps_rule():
    assert CW.warps_for(1, 896, 132) == 4 and CW.warps_for(8, 896, 132) == 4  # gate/up together
    assert CW.warps_for(1, 192, 132) == 8  # q/k/v: under two tiles an SM
    assert CW.warps_for(16, 448, 132) == 4  # 16 tokens, N = 14336
    assert CW.warps_for(16, 128, 132) == 8 and CW.warps_for(17, 896, 132) == 8  # one tile an SM; several CTAs along M


def test_abi_struct_sizes():
    # 5 pointers, 4 int64, 2 int32 a layer; 2 pointers, 2 int64, 5 int32 and a float, 2 pointers before them
    assert ctypes.sizeof(CW._Segment) == 80
    assert ctypes.sizeof(CW._Params) == 16 + 16 + 16 + 8 + 16 + CW.MAX_SEGMENTS * 80


# --- the fragment mapping, modelled on the CPU --------------------------------------------------
# mma.m16n8k32 with 8-bit operands as PTX defines its fragments: a lane (g = lane / 4, t = lane % 4)
# holds A rows g and g + 8 at k 4t..4t+3 (a0, a1) and 16+4t..16+4t+3 (a2, a3), and B column g at
# the same k (b0, b1).  The kernel hands it 16 loaded bytes of k as (a0..a3) = (lo.x, hi.x, lo.y,
# hi.y) and (b0, b1) = (x.x, x.y), then (lo.z, hi.z, lo.w, hi.w) with (x.z, x.w).


def _mma_m16n8k32(a_regs, b_regs):
    """a_regs[lane] = 4 words of 4 values (a0..a3), b_regs[lane] = 2 words (b0, b1) -> C [16, 8]."""
    a, b = np.zeros((16, 32)), np.zeros((32, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(4):
            a[g, 4 * t + j], a[g + 8, 4 * t + j] = a_regs[lane][0][j], a_regs[lane][1][j]
            a[g, 16 + 4 * t + j], a[g + 8, 16 + 4 * t + j] = a_regs[lane][2][j], a_regs[lane][3][j]
            b[4 * t + j, g], b[16 + 4 * t + j, g] = b_regs[lane][0][j], b_regs[lane][1][j]
    return a @ b


def test_fragment_mapping_computes_the_product():
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (16, 64)).astype(float)  # 16 rows, one half-chunk of 64 k
    x = rng.integers(-127, 128, (8, 64)).astype(float)  # 8 tokens
    c = np.zeros((16, 8))
    for mma in range(2):  # (x, y) words, then (z, w)
        a_regs, b_regs = [], []
        for lane in range(32):
            g, t = lane // 4, lane % 4
            lo, hi, xs = w[g, 16 * t:16 * t + 16], w[g + 8, 16 * t:16 * t + 16], x[g, 16 * t:16 * t + 16]
            word = lambda v, i: v[4 * i:4 * i + 4]  # noqa: E731  (word i of 16 loaded bytes)
            a_regs.append([word(lo, 2 * mma), word(hi, 2 * mma), word(lo, 2 * mma + 1), word(hi, 2 * mma + 1)])
            b_regs.append([word(xs, 2 * mma), word(xs, 2 * mma + 1)])
        c += _mma_m16n8k32(a_regs, b_regs)
    np.testing.assert_array_equal(c, w @ x.T)


def test_swizzled_pieces_fill_the_slot_once_and_spread_over_banks():
    def piece_at(r, u):  # the kernel's piece_at()
        return r * 128 + ((u ^ ((r & 1) << 2)) << 4)

    offsets = sorted(piece_at(r, u) for r in range(32) for u in range(8))
    assert offsets == list(range(0, 32 * 128, 16))
    for h in range(2):
        for first in range(0, 32, 8):  # a quarter warp's 16-byte reads: 8 lanes, 8 distinct bank quads
            quads = {(piece_at(lane // 4, 4 * h + lane % 4) // 16) % 8 for lane in range(first, first + 8)}
            assert len(quads) == 8


# --- the weight-only form (W8A16) -------------------------------------------------------------

WO_SCHEMES = ("int8_weight_only", "fp8_weight_only")
#: the forms that take a 16-bit activation: weight-only, and fp8_block (quantized in the kernel);
#: "fp8_block_q" is fp8_block with the activation quantized before the kernel, as graphs above 8 tokens do
SIXTEEN_BIT = (*WO_SCHEMES, "fp8_block", "fp8_block_q")


@st.composite
def sixteen_bit_cases(draw):
    m = draw(st.integers(1, 20))
    return dict(
        scheme=(scheme := draw(st.sampled_from(SIXTEEN_BIT))),
        m=m,
        ns=draw(st.lists(st.integers(1, 300), min_size=1, max_size=4)),
        k=draw(st.sampled_from([128, 256, 640, 4096])),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
        bias=draw(st.booleans()),
        # 48-row tiles above 8 tokens, for a scale per channel (a tile of fp8_block stays in its 128-row block)
        row_tiles=draw(st.sampled_from([None, 1, 2, 3] if m > 8 and scheme in WO_SCHEMES else [None, 1, 2])),
        warps=draw(st.sampled_from([None, 8, 4])),
    )


def check_16bit(scheme, m, ns, k, dtype, bias, row_tiles, warps=None, seed=0):
    """Against the scheme's reference (fp8_block's quantizes the activation as the kernel does; a value
    at a rounding tie may land on the other e4m3 level: the kernel multiplies by 1 / scale)."""
    layers, refs, x = [], [], None
    form, scheme = scheme, scheme.removesuffix("_q")
    for i, n in enumerate(ns):
        x_i, p, b, _, _ = kernel_case(scheme, m, n, k, dtype=dtype, bias=bias, seed=seed, device="cuda")
        _, p, b, _, _ = kernel_case(scheme, m, n, k, dtype=dtype, bias=bias, seed=seed + 1000 * i, device="cuda")
        x = x_i if x is None else x
        layers.append(CW.Layer(p[0], p[1], b))
        refs.append(S.reference(scheme, x, p, b, out_dtype=dtype))
    if form == "fp8_block_q":
        xq, sx = S.quantize_activation("fp8_block", x)
        ys = CW.fp8_block_q_decode_group(xq, sx, layers, dtype, row_tiles=row_tiles, warps=warps)
    else:
        run = CW.fp8_block_decode_group if scheme == "fp8_block" else CW.w8a16_decode_group
        ys = run(x, layers, row_tiles=row_tiles, warps=warps)
    for i, (y, ref) in enumerate(zip(ys, refs)):
        assert y.shape == ref.shape and y.dtype == dtype
        err = S.relative_error(y, ref)
        assert err <= S.TOLERANCE[dtype], f"{scheme} layer {i} of {ns} M={m} K={k} {dtype}: relative error {err:.3g}"


@pytest.mark.gpu
@given(sixteen_bit_cases(), st.integers(0, 2**16))
@example(dict(scheme="int8_weight_only", m=1, ns=[4096, 1024, 1024], k=4096, dtype=torch.bfloat16, bias=False, row_tiles=None), 0)
@example(dict(scheme="fp8_weight_only", m=16, ns=[17], k=640, dtype=torch.float16, bias=True, row_tiles=2), 1)
@example(dict(scheme="fp8_weight_only", m=20, ns=[40], k=256, dtype=torch.bfloat16, bias=True, row_tiles=1), 2)
@example(dict(scheme="int8_weight_only", m=3, ns=[64, 48], k=14336, dtype=torch.float16, bias=False, row_tiles=2), 3)
@example(dict(scheme="fp8_block", m=1, ns=[4096, 1024, 1024], k=4096, dtype=torch.bfloat16, bias=False, row_tiles=None), 4)
@example(dict(scheme="fp8_block", m=16, ns=[200], k=640, dtype=torch.float16, bias=True, row_tiles=2), 5)  # two weight blocks
@example(dict(scheme="fp8_block", m=20, ns=[300, 129], k=256, dtype=torch.bfloat16, bias=True, row_tiles=1), 6)  # M past 16
@example(dict(scheme="int8_weight_only", m=1, ns=[14336, 14336], k=4096, dtype=torch.bfloat16, bias=False, row_tiles=None,
              warps=None), 7)  # gate/up: the rule's 4 warps
@example(dict(scheme="fp8_block", m=5, ns=[300], k=640, dtype=torch.float16, bias=True, row_tiles=2, warps=4), 8)  # 4 warps
@example(dict(scheme="fp8_block_q", m=16, ns=[4096, 1024, 1024], k=4096, dtype=torch.bfloat16, bias=False, row_tiles=None), 9)
@example(dict(scheme="fp8_block_q", m=9, ns=[300, 129], k=14336, dtype=torch.float16, bias=True, row_tiles=2), 10)  # 2 token tiles
@example(dict(scheme="fp8_block_q", m=20, ns=[200], k=256, dtype=torch.bfloat16, bias=True, row_tiles=1), 11)  # M past 16
@example(dict(scheme="fp8_block_q", m=1, ns=[40], k=640, dtype=torch.float16, bias=False, row_tiles=1, warps=4), 12)
@example(dict(scheme="int8_weight_only", m=16, ns=[4096, 1024, 1024], k=4096, dtype=torch.bfloat16, bias=False,
              row_tiles=None), 13)  # q/k/v at 16 tokens: the rule's 48-row tiles
@example(dict(scheme="fp8_weight_only", m=9, ns=[200, 60], k=14336, dtype=torch.float16, bias=True, row_tiles=3), 14)
# 4 warps a CTA above 8 tokens, in each form
@example(dict(scheme="fp8_block_q", m=16, ns=[200], k=4096, dtype=torch.bfloat16, bias=False, row_tiles=1, warps=4), 15)
@example(dict(scheme="int8_weight_only", m=12, ns=[100, 40], k=14336, dtype=torch.float16, bias=True, row_tiles=2, warps=4), 16)
@example(dict(scheme="fp8_block", m=14, ns=[300], k=640, dtype=torch.bfloat16, bias=True, row_tiles=2, warps=4), 17)
@example(dict(scheme="fp8_weight_only", m=16, ns=[100], k=256, dtype=torch.float16, bias=False, row_tiles=3, warps=4), 18)
def test_16bit_activation_forms_match_reference_on_gpu(case, seed):
    ok, why = _runs_here()
    if not ok:
        pytest.skip(why)
    check_16bit(**case, seed=seed)


# --- what fusion moves into the launch: a prologue (16-bit forms, one token), residuals (every form) ---


@st.composite
def fused_cases(draw):
    scheme = draw(st.sampled_from([*SIXTEEN_BIT, *SCHEMES]))
    prologue = draw(st.sampled_from(["", "rmsnorm", "silu_mul"])) if scheme in (*WO_SCHEMES, "fp8_block") else ""
    m = 1 if prologue else draw(st.integers(1, 20))
    ns = draw(st.lists(st.integers(1, 300), min_size=1, max_size=3))
    return dict(scheme=scheme, prologue=prologue, m=m, ns=ns, k=draw(st.sampled_from([128, 640, 4096, 14336])),
                dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])), residual=[draw(st.booleans()) for _ in ns],
                warps=draw(st.sampled_from([None, 8, 4])))


def check_fused(scheme, prologue, m, ns, k, dtype, residual, warps=None, seed=0):
    """The kernel with a prologue and residuals against fusion.py's references around the scheme's."""
    x, f = fused_inputs(prologue, m, k, ns, residual, dtype, seed)
    x2, nw = f.x2, f.norm_weight
    form, scheme = scheme, scheme.removesuffix("_q")
    act = fusion.prologue_of(f, x)
    quantized = form in SCHEMES or form == "fp8_block_q"
    xq, sx = S.quantize_activation(scheme, act) if quantized else (None, None)
    layers, refs = [], []
    for i, n in enumerate(ns):
        _, p, b, _, _ = kernel_case(scheme, m, n, k, dtype=dtype, bias=i % 2 == 1, seed=seed + 1000 * i, device="cuda")
        layers.append(CW.Layer(p[0], p[1], b))
        refs.append(S.reference(scheme, xq, p, b, input_scale=sx, out_dtype=dtype) if form in SCHEMES
                    else S.reference(scheme, act, p, b, out_dtype=dtype))
    refs = fusion.add_residuals(refs, f.residuals)
    if form in SCHEMES:
        ys = CW.w8a8_decode_group(xq, sx, layers, dtype, warps=warps, residuals=f.residuals)
    elif form == "fp8_block_q":
        ys = CW.fp8_block_q_decode_group(xq, sx, layers, dtype, warps=warps, residuals=f.residuals)
    else:
        run = CW.fp8_block_decode_group if scheme == "fp8_block" else CW.w8a16_decode_group
        ys = run(x, layers, warps=warps, prologue=prologue, x2=x2, norm_weight=nw, eps=1e-5, residuals=f.residuals)
    assert [(y.shape, y.dtype) for y in ys] == [(r.shape, dtype) for r in refs]
    assert_each_matches([ys], [refs])


@pytest.mark.gpu
@given(fused_cases(), st.integers(0, 2**16))
@example(dict(scheme="int8_weight_only", prologue="rmsnorm", m=1, ns=[4096, 1024, 1024], k=4096, dtype=torch.bfloat16,
              residual=[False] * 3, warps=None), 0)  # q/k/v
@example(dict(scheme="fp8_weight_only", prologue="rmsnorm", m=1, ns=[14336, 14336], k=4096, dtype=torch.bfloat16,
              residual=[False] * 2, warps=None), 0)  # gate/up, the rule's 4 warps
@example(dict(scheme="int8_weight_only", prologue="silu_mul", m=1, ns=[4096], k=14336, dtype=torch.bfloat16,
              residual=[True], warps=None), 0)  # down_proj
@example(dict(scheme="fp8_block", prologue="rmsnorm", m=1, ns=[300, 129], k=14336, dtype=torch.float16,
              residual=[True, False], warps=4), 0)  # quantized in the kernel after the norm; K past the w4a16 limit
@example(dict(scheme="fp8_block", prologue="silu_mul", m=1, ns=[4096], k=14336, dtype=torch.bfloat16,
              residual=[True], warps=None), 0)
@example(dict(scheme="fp8_rowwise", prologue="", m=1, ns=[4096], k=4096, dtype=torch.bfloat16,
              residual=[True], warps=None), 0)  # o_proj of W8A8
@example(dict(scheme="int8_weight_only", prologue="", m=8, ns=[4096], k=4096, dtype=torch.bfloat16,
              residual=[True], warps=None), 0)  # o_proj at batch 8
@example(dict(scheme="fp8_block_q", prologue="", m=13, ns=[300, 48], k=640, dtype=torch.float16,
              residual=[True, True], warps=None), 0)
# residuals at 16 tokens in CTAs of 4 warps: fp8_block_q's 32-row tiles store in a plain loop
@example(dict(scheme="fp8_block_q", prologue="", m=16, ns=[4096], k=640, dtype=torch.bfloat16,
              residual=[True], warps=4), 0)
@example(dict(scheme="int8_weight_only", prologue="", m=16, ns=[4096], k=4096, dtype=torch.float16,
              residual=[True], warps=4), 0)
def test_fused_matches_reference_on_gpu(case, seed):
    ok, why = _runs_here()
    if not ok:
        pytest.skip(why)
    check_fused(**case, seed=seed)


def test_prologue_rule_and_refusals():
    assert CW.why_not_prologue("rmsnorm", 1, 4096) == "" and CW.why_not_prologue("silu_mul", 1, 28672) == ""
    assert "up to K = 32768, not 32896" in CW.why_not_prologue("silu_mul", 1, 32896)  # the row in shared memory
    assert "one token (M = 1) only, not M = 8" in CW.why_not_prologue("rmsnorm", 8, 4096)
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    layer = CW.Layer(torch.zeros(16, 256, dtype=torch.int8), torch.ones(16))
    with pytest.raises(ValueError, match="W8A16 decode kernel runs rmsnorm before the linear with one token"):
        CW.w8a16_decode_group(x, [layer], prologue="rmsnorm", norm_weight=torch.ones(256, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="needs x2"):
        CW.fp8_block_decode_group(x[:1], [layer], prologue="silu_mul")
    with pytest.raises(ValueError, match=r"norm_weight must be torch.bfloat16 \[256\]"):
        CW.w8a16_decode_group(x[:1], [layer], prologue="rmsnorm", norm_weight=torch.ones(128, dtype=torch.bfloat16))
    with pytest.raises(TypeError):  # a quantized activation takes residuals only
        CW.w8a8_decode_group(x.to(torch.int8), torch.ones(2), [layer], torch.bfloat16, prologue="rmsnorm")


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", WO_SCHEMES)
def test_weight_only_converts_every_weight_value_exactly_on_gpu(scheme):
    """Every int8 / fp8 code times a one-hot activation: the output is the code's value, exactly
    (scale 1): the in-register conversion loses nothing, e4m3 subnormals included."""
    ok, why = _runs_here()
    if not ok:
        pytest.skip(why)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    if scheme == "fp8_weight_only":
        codes = codes[(codes & 0x7F) != 0x7F]  # not the two NaN codes
    w8 = codes.view(torch.int8 if scheme == "int8_weight_only" else torch.float8_e4m3fn)
    n = w8.numel()
    w = w8.reshape(n, 1).expand(n, 128).contiguous().cuda()
    want = w8.float()
    for dtype in (torch.bfloat16, torch.float16):
        for pos in (0, 5, 127):
            x = torch.zeros(1, 128, dtype=dtype, device="cuda")
            x[0, pos] = 1
            y = CW.w8a16_decode(x, w, torch.ones(n, device="cuda"), None)
            exact = want.to(dtype).float()  # the value rounded once, to the output's dtype
            assert torch.equal(y.float().cpu()[0], exact), (dtype, pos)


@pytest.mark.gpu
def test_weight_only_strided_activation_on_gpu():
    ok, why = _runs_here()
    if not ok:
        pytest.skip(why)
    x, p, b, _, ref = kernel_case("int8_weight_only", 3, 64, 256, device="cuda")
    wide = torch.zeros(3, 512 + 8, dtype=x.dtype, device="cuda")
    wide[:, 8:264] = x  # starts 16 bytes in, rows 520 elements apart
    y = CW.w8a16_decode(wide[:, 8:264], p[0], p[1], b)
    assert S.relative_error(y, ref) <= S.TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,m,k,ns", [("fp8_rowwise", 1, 4096, [6144]), ("int8_weight_only", 1, 4096, [14336, 14336]),
                                           ("fp8_block", 16, 14336, [4096]), ("int8_rowwise", 5, 640, [48, 32])])
def test_dependent_launch_reads_the_activation_after_the_kernel_before_on_gpu(scheme, m, k, ns):
    """As in test_cuda_w4a16: the kernel before writes the activation (and its scale) late, after
    letting a dependent launch start; with programmatic dependent launch, eager and captured, every
    output is of the new activation."""
    ok, why = _runs_here()
    if not ok or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip(why if not ok else "programmatic dependent launch needs sm90+")
    static = scheme in SCHEMES
    layers, public = [], []
    for i, n in enumerate(ns):
        _, p, b, _, _ = kernel_case(scheme, m, n, k, static=static, seed=10 + i, device="cuda")
        layers.append(CW.Layer(p[0], p[1], b))
        public.append((p, b))
    cases_ = [kernel_case(scheme, m, 16, k, static=static, seed=50 + j, device="cuda") for j in range(3)]
    acts = [(c[0], c[3]) for c in cases_]  # (activation, its scale or None)
    refs = [[S.reference(scheme, x, p, b, input_scale=sx, out_dtype=torch.bfloat16) for p, b in public] for x, sx in acts]
    buf, sbuf = acts[-1][0].clone(), acts[-1][1].clone() if static else None

    def run():
        if static:
            return CW.w8a8_decode_group(buf, sbuf, layers, torch.bfloat16, pdl=True)
        fn = CW.fp8_block_decode_group if scheme == "fp8_block" else CW.w8a16_decode_group
        return fn(buf, layers, pdl=True)

    def produce(x, sx):
        if static:
            sbuf.copy_(sx)  # the scale before, the activation written late by the kernel just ahead
        late_copy(x, buf)

    eager = []
    for x, sx in acts:
        produce(x, sx)
        eager.append(run())
    assert_each_matches(eager, refs)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = []
        for x, sx in acts:
            produce(x, sx)
            captured.append(run())
    buf.copy_(acts[-1][0])
    g.replay()
    torch.cuda.synchronize()
    assert_each_matches(captured, refs)


# --- fp8_block: the activation quantized in the kernel per 1x128 group ---------------------------

@pytest.mark.gpu
def test_fp8_block_group_scales_stay_in_their_group_on_gpu():
    """Token 0's first two groups differ in magnitude by 2**40 and token 1 has an all-zero group.
    Output rows 0-127 read only group 1, rows 128-255 only group 0, so each half shows whether its
    group was quantized with its own scale (a scale shared across groups flushes group 1 to zero;
    the zero group must give zeros, not NaN)."""
    ok, why = _runs_here()
    if not ok:
        pytest.skip(why)
    w = torch.randn(256, 512) * 0.05
    w[:128, :128] = 0
    w[:128, 256:] = 0
    w[128:, 128:] = 0
    p = S.quantize_weight("fp8_block", w)
    p = [p["weight"].cuda(), p["weight_scale"].cuda()]
    x = torch.randn(2, 512)
    x[0, :128] *= 2.0 ** 20
    x[0, 128:256] *= 2.0 ** -20
    x[1, 256:384] = 0
    x = x.to(torch.bfloat16).cuda()
    y = CW.fp8_block_decode(x, p[0], p[1], None)
    ref = S.reference("fp8_block", x, p, None, out_dtype=torch.bfloat16)
    assert torch.isfinite(y).all()
    for rows in (slice(0, 128), slice(128, 256)):
        assert S.relative_error(y[0, rows], ref[0, rows]) <= S.TOLERANCE[torch.bfloat16], rows
    assert S.relative_error(y[1], ref[1]) <= S.TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,seed", [(torch.bfloat16, 3), (torch.float16, 5)])
def test_fp8_block_puts_every_value_on_the_reference_level_on_gpu(dtype, seed):
    """An identity weight (one 128x128 block per 128 channels, exact in e4m3) makes the output the
    dequantized activation itself: every one of 10240 values must land on the reference's e4m3 level.
    Many 16-bit values over amax / 448 fall exactly between two levels, so the kernel must round
    x / scale as the reference's division does and compute the scale as torch does on a GPU."""
    ok, why = _runs_here()
    if not ok:
        pytest.skip(why)
    m, k = 16, 640
    x, _, _, _, _ = kernel_case("fp8_block", m, 128, k, dtype=dtype, bias=False, seed=seed, device="cuda")
    w = torch.eye(k, device="cuda")
    p = S.quantize_weight("fp8_block", w)
    y = CW.fp8_block_decode(x, p["weight"], p["weight_scale"], None).float()
    xq, sx = S.quantize_activation("fp8_block", x)
    want = (xq.float().reshape(m, -1, 128) * sx[..., None]).reshape(m, k)
    off = ((y - want).abs() > 0.02 * want.abs()).sum().item()  # one level apart is 6-12%
    assert off == 0, f"{off} of {y.numel()} values on another e4m3 level than the reference's"


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,ns", [(16, 4096, [4096, 1024, 1024]), (9, 14336, [200]), (3, 640, [300])])
def test_fp8_block_quantized_before_gives_the_same_output_on_gpu(m, k, ns):
    """The activation quantized by the scheme before the kernel (BLOCK_Q) and inside it (BLOCK) are
    the same bytes and scales, so both forms write the same output, bit for bit."""
    ok, why = _runs_here()
    if not ok:
        pytest.skip(why)
    x, _, _, _, _ = kernel_case("fp8_block", m, 128, k, dtype=torch.bfloat16, bias=False, seed=m, device="cuda")
    layers = []
    for i, n in enumerate(ns):
        _, p, b, _, _ = kernel_case("fp8_block", m, n, k, dtype=torch.bfloat16, bias=True, seed=100 + i, device="cuda")
        layers.append(CW.Layer(p[0], p[1], b))
    xq, sx = S.quantize_activation("fp8_block", x)
    inside = CW.fp8_block_decode_group(x, layers)
    before = CW.fp8_block_q_decode_group(xq, sx, layers, torch.bfloat16)
    for a, b in zip(inside, before):
        assert torch.equal(a, b)


def test_fp8_block_quantized_before_refuses_bad_arguments():
    xq = torch.zeros(2, 256, dtype=torch.float8_e4m3fn)
    w = torch.zeros(200, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="fp8 e4m3 activation here, not torch.bfloat16"):
        CW.fp8_block_q_decode(xq.bfloat16(), torch.ones(2, 2), w, torch.ones(2, 2), None, torch.bfloat16)
    with pytest.raises(ValueError, match="writes bf16, fp16 or fp32"):
        CW.fp8_block_q_decode(xq, torch.ones(2, 2), w, torch.ones(2, 2), None, torch.int8)
    with pytest.raises(ValueError, match=r"one per 1x128 group, \[M, K/128\] = \[2, 2\]"):
        CW.fp8_block_q_decode(xq, torch.ones(2), w, torch.ones(2, 2), None, torch.bfloat16)
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
        CW.fp8_block_q_decode(xq, torch.ones(2, 2), w, torch.ones(2, 2), None, torch.bfloat16)


def test_fp8_block_refuses_bad_arguments():
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    w = torch.zeros(200, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="bf16 or fp16 activation"):
        CW.fp8_block_decode(x.float(), w, torch.ones(2, 2), None)
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
        CW.fp8_block_decode(x, w, torch.ones(2, 2), None)
    s, stride = CW._block_scale(torch.ones(2, 2, dtype=torch.bfloat16), 200, 256, "s")
    assert s.dtype == torch.float32 and stride == 2
    s, stride = CW._block_scale(torch.ones(2, 6)[:, ::3], 200, 256, "s")  # a strided view: copied
    assert s.stride() == (2, 1) and stride == 2
    with pytest.raises(ValueError, match=r"expected \[ceil\(N/128\), K/128\] = \[2, 2\]"):
        CW._block_scale(torch.ones(1, 2), 200, 256, "the weight scale")


def test_weight_only_refuses_bad_arguments():
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    w = torch.zeros(8, 256, dtype=torch.int8)
    sw = torch.ones(8)
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
        CW.w8a16_decode(x, w, sw, None)
    with pytest.raises(ValueError, match="bf16 or fp16 activation"):
        CW.w8a16_decode(x.float(), w, sw, None)
    with pytest.raises(ValueError, match="must be 2-D"):
        CW.w8a16_decode(x[0], w, sw, None)


# The in-register conversions of the W8A16 form (widen() in the kernel), modelled bit for bit:
# prmt(a, b, sel) picks output byte i from the eight bytes of (b:a) by the i-th nibble of sel.

def _prmt(a: int, b: int, sel: int) -> int:
    pool = (a & 0xFFFFFFFF) | ((b & 0xFFFFFFFF) << 32)
    return sum(((pool >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def _halves(word: int, dtype) -> list:
    """A 32-bit word as two 16-bit floats (low half first)."""
    return np.array([word & 0xFFFF, word >> 16], dtype=np.uint16).view(np.float16).astype(float).tolist() \
        if dtype == "f16" else [float(np.array([(h & 0xFFFF) << 16], dtype=np.uint32).view(np.float32)[0])
                                for h in (word & 0xFFFF, word >> 16)]


def _widen(w: int, elem: str, act: str) -> list:
    """The kernel's widen(): four bytes of one word as four values of the activation's type."""
    out = []
    if elem == "s8" and act == "f16":
        u = w ^ 0x80808080
        for sel in (0x4140, 0x4342):
            out += [v - 1152.0 for v in _halves(_prmt(u, 0x64646464, sel), "f16")]
    elif elem == "s8":
        u = w ^ 0x80808080
        f = [np.array([_prmt(u, 0x4B000000, 0x7440 + j)], dtype=np.uint32).view(np.float32)[0] - np.float32(8388736.0)
             for j in range(4)]
        bits = [int(np.array([v], dtype=np.float32).view(np.uint32)[0]) for v in f]
        for lo, hi in ((0, 1), (2, 3)):
            out += _halves(_prmt(bits[lo], bits[hi], 0x7632), "bf16")
    else:  # e4m3 -> bf16
        for sel in (0x4140, 0x4342):
            t = (_prmt(w, 0, sel) << 4) & 0xFFFFFFFF
            v = ((t & 0x08000800) * 15 + t) & 0xFFFFFFFF
            out += [h * 2.0 ** 120 for h in _halves(v, "bf16")]
    return out


@pytest.mark.parametrize("elem,act", [("s8", "f16"), ("s8", "bf16"), ("e4m3", "bf16")])
def test_widen_is_exact_for_every_byte(elem, act):
    codes = np.arange(256, dtype=np.uint8)
    if elem == "s8":
        want = codes.view(np.int8).astype(float)
    else:
        want = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).float().numpy().astype(float)
    for first in range(0, 256, 4):
        word = int(codes[first:first + 4].view("<u4")[0])
        got = _widen(word, elem, act)
        for i in range(4):
            c = first + i
            if elem == "e4m3" and (c & 0x7F) == 0x7F:
                continue  # NaN: never a quantized weight
            assert got[i] == want[c], (elem, act, hex(c), got[i], want[c])


def _mma_m16n8k16(a_regs, b_regs):
    """mma.m16n8k16 with 16-bit operands as PTX defines its fragments: a lane (g, t) holds A rows g
    and g + 8 at k 2t, 2t+1 (a0, a1) and 2t+8, 2t+9 (a2, a3), and B column g at k 2t, 2t+1 (b0)
    and 2t+8, 2t+9 (b1); each register a pair of values."""
    a, b = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        (a0, a1, a2, a3), (b0, b1) = a_regs[lane], b_regs[lane]
        a[g, 2 * t:2 * t + 2], a[g + 8, 2 * t:2 * t + 2] = a0, a1
        a[g, 2 * t + 8:2 * t + 10], a[g + 8, 2 * t + 8:2 * t + 10] = a2, a3
        b[2 * t:2 * t + 2, g], b[2 * t + 8:2 * t + 10, g] = b0, b1
    return a @ b


def test_weight_only_fragment_mapping_computes_the_product():
    """A lane's 16 bytes of rows g and g + 8 (k 16t..16t+15 of a half chunk) make four MMAs: word q
    (k 4q..4q+3) widened into (a0, a2) for row g and (a1, a3) for row g + 8, with its token's values
    4q..4q+3 of the same k as (b0, b1)."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (16, 64)).astype(float)
    x = rng.integers(-127, 128, (8, 64)).astype(float)
    c = np.zeros((16, 8))
    for q in range(4):
        a_regs, b_regs = [], []
        for lane in range(32):
            g, t = lane // 4, lane % 4
            lo, hi, xs = w[g, 16 * t:16 * t + 16], w[g + 8, 16 * t:16 * t + 16], x[g, 16 * t:16 * t + 16]
            a_regs.append((lo[4 * q:4 * q + 2], hi[4 * q:4 * q + 2], lo[4 * q + 2:4 * q + 4], hi[4 * q + 2:4 * q + 4]))
            b_regs.append((xs[4 * q:4 * q + 2], xs[4 * q + 2:4 * q + 4]))
        c += _mma_m16n8k16(a_regs, b_regs)
    np.testing.assert_array_equal(c, w @ x.T)
