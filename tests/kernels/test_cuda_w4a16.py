"""The CUDA w4a16 decode kernel (kernels/cuda/w4a16_decode.cu): on the GPU against the scheme's
reference under hypothesis; on the CPU its argument checks, its build (nvcc, no GPU needed) and a
model of the fragment mapping it relies on."""

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from qlinear_pass import fusion
from qlinear_pass import schemes as S
from qlinear_pass.kernels import cuda_build, int4_layout, cuda_w4a16 as CW
from tests.helpers import assert_each_matches, fused_inputs, kernel_case, late_copy


@st.composite
def cases(draw, max_n=300, ks=(128, 256, 384, 4096)):
    m = draw(st.integers(1, 20))
    ns = draw(st.lists(st.integers(1, max_n // 16).map(lambda b: 16 * b), min_size=1, max_size=4))
    if draw(st.booleans()):  # a row tile an SM or more (144 of 32 rows): above M = 1 the rows stay in shared memory
        ns = ns[:2] + [4608]
    return dict(
        m=m,
        ns=ns,
        k=draw(st.sampled_from(ks)),
        group_size=draw(st.sampled_from([32, 64, 128])),
        zero_points=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
        bias=draw(st.booleans()),
        scale_dtype=draw(st.sampled_from([torch.float32, None])),  # None: the activation's dtype
        **tiles_and_warps(draw, m),
    )


def tiles_and_warps(draw, m):
    """Row tiles (48 rows: 1-8 tokens) and warps a CTA (4 at M = 1 only, and not with 48 rows)."""
    row_tiles = draw(st.sampled_from([None, 1, 2, 3] if m <= 8 else [None, 1, 2]))
    return dict(row_tiles=row_tiles, warps=draw(st.sampled_from([None, 8, 4] if m == 1 and row_tiles != 3 else [None, 8])))


def check(m, ns, k, group_size, zero_points, dtype, bias, scale_dtype, row_tiles, warps=None, seed=0):
    layers, refs, x = [], [], None
    for i, n in enumerate(ns):
        x_i, p, b, _, _ = kernel_case("w4a16", m, n, k, group_size=group_size, zero_points=zero_points, dtype=dtype,
                                      bias=bias, seed=seed + i, device="cuda")
        x = x_i if x is None else x
        s = p[1].to(scale_dtype or dtype)
        z = p[2] if len(p) > 2 else None
        layers.append(CW.Layer(int4_layout.to_mma16(p[0]), s, z, b))
        refs.append(S.reference("w4a16", x, [p[0], s, z] if z is not None else [p[0], s], b))
    ys = CW.w4a16_decode_group(x, layers, group_size, row_tiles=row_tiles, warps=warps)
    for i, (y, ref) in enumerate(zip(ys, refs)):
        assert y.shape == ref.shape and y.dtype == dtype
        err = S.relative_error(y, ref)
        assert err <= S.TOLERANCE[dtype], f"layer {i} of {ns} M={m} K={k} g{group_size}: relative error {err:.3g}"


@pytest.mark.gpu
@given(cases(), st.integers(0, 2**16))
@example(dict(m=1, ns=[4096, 1024, 1024], k=4096, group_size=128, zero_points=False, dtype=torch.bfloat16, bias=False,
              scale_dtype=None, row_tiles=None), 0)  # q/k/v at decode
@example(dict(m=16, ns=[48], k=384, group_size=32, zero_points=True, dtype=torch.float16, bias=True,
              scale_dtype=torch.float32, row_tiles=2), 1)  # a 32-row tile past N, 2 token tiles
@example(dict(m=20, ns=[32], k=256, group_size=64, zero_points=True, dtype=torch.bfloat16, bias=True,
              scale_dtype=None, row_tiles=1), 2)  # M past 16: more CTAs along M
@example(dict(m=3, ns=[64, 48], k=14336, group_size=32, zero_points=True, dtype=torch.bfloat16, bias=False,
              scale_dtype=None, row_tiles=2), 3)  # long K, many groups
@example(dict(m=2, ns=[32, 16, 80], k=384, group_size=128, zero_points=True, dtype=torch.float16, bias=True,
              scale_dtype=torch.bfloat16, row_tiles=1), 4)  # 3 groups a row: zero points padded
@example(dict(m=1, ns=[4096, 4096, 1024], k=4096, group_size=128, zero_points=False, dtype=torch.bfloat16,
              bias=False, scale_dtype=None, row_tiles=None, warps=None), 5)  # 288 tiles: the rule's 4 warps
@example(dict(m=1, ns=[64, 48], k=14336, group_size=32, zero_points=True, dtype=torch.float16, bias=True,
              scale_dtype=None, row_tiles=1, warps=4), 6)  # 4 warps: 28 chunks each a tile, several groups
@example(dict(m=12, ns=[64], k=8192, group_size=64, zero_points=True, dtype=torch.bfloat16, bias=False,
              scale_dtype=None, row_tiles=2), 7)  # 16 tokens' rows past the shared memory: the ring's kernel
@example(dict(m=7, ns=[4096, 1024], k=4096, group_size=128, zero_points=False, dtype=torch.float16, bias=True,
              scale_dtype=None, row_tiles=None), 8)  # 8 tokens' rows in shared memory, the 8th zeros
@example(dict(m=16, ns=[4608], k=1024, group_size=64, zero_points=True, dtype=torch.float16, bias=True,
              scale_dtype=None, row_tiles=2), 9)  # 16 tokens' rows in shared memory (their pieces permuted)
@example(dict(m=8, ns=[4608, 32], k=2048, group_size=32, zero_points=False, dtype=torch.bfloat16, bias=False,
              scale_dtype=None, row_tiles=2), 10)  # 8 tokens' rows, groups of 32: the 3-slot ring
@example(dict(m=8, ns=[4096, 1024, 1024], k=4096, group_size=128, zero_points=False, dtype=torch.bfloat16,
              bias=False, scale_dtype=None, row_tiles=None), 11)  # q/k/v at 8 tokens: the rule's 48-row tiles
@example(dict(m=5, ns=[80, 32], k=384, group_size=32, zero_points=True, dtype=torch.float16, bias=True,
              scale_dtype=torch.float32, row_tiles=3), 12)  # 48-row tiles past N (80 and 32 rows), groups of 32
@example(dict(m=2, ns=[4608, 2304], k=1024, group_size=64, zero_points=True, dtype=torch.bfloat16, bias=True,
              scale_dtype=None, row_tiles=3), 13)  # 144 tiles of 48 rows: CTAs walking two, 6 rows zeros
def test_matches_reference_on_gpu(case, seed):
    check(**case, seed=seed)


@st.composite
def fused_cases(draw):
    """A prologue (one token), or none at any M, and a residual or none for each layer."""
    prologue = draw(st.sampled_from(["", "rmsnorm", "silu_mul"]))
    m = 1 if prologue else draw(st.integers(1, 20))
    ns = draw(st.lists(st.integers(1, 300 // 16).map(lambda b: 16 * b), min_size=1, max_size=4))
    if draw(st.booleans()):
        ns = ns[:2] + [4608]
    return dict(
        prologue=prologue, m=m, ns=ns, k=draw(st.sampled_from([128, 384, 4096, 14336])),
        group_size=draw(st.sampled_from([32, 64, 128])), zero_points=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
        residual=[draw(st.booleans()) for _ in ns], **tiles_and_warps(draw, m),
    )


def check_fused(prologue, m, ns, k, group_size, zero_points, dtype, residual, warps=None, row_tiles=None, seed=0):
    """The kernel with a prologue and residuals against fusion.py's references around the scheme's."""
    x, f = fused_inputs(prologue, m, k, ns, residual, dtype, seed)
    x2, nw = f.x2, f.norm_weight
    act = fusion.prologue_of(f, x)
    layers, refs = [], []
    for i, n in enumerate(ns):
        _, p, b, _, _ = kernel_case("w4a16", m, n, k, group_size=group_size, zero_points=zero_points, dtype=dtype,
                                    bias=i % 2 == 1, seed=seed + i, device="cuda")
        layers.append(CW.Layer(int4_layout.to_mma16(p[0]), p[1], p[2] if len(p) > 2 else None, b))
        refs.append(S.reference("w4a16", act, p, b))
    refs = fusion.add_residuals(refs, f.residuals)
    ys = CW.w4a16_decode_group(x, layers, group_size, row_tiles=row_tiles, warps=warps, prologue=prologue, x2=x2,
                               norm_weight=nw, eps=1e-5, residuals=f.residuals)
    assert [(y.shape, y.dtype) for y in ys] == [(r.shape, dtype) for r in refs]
    assert_each_matches([ys], [refs])


@pytest.mark.gpu
@given(fused_cases(), st.integers(0, 2**16))
@example(dict(prologue="rmsnorm", m=1, ns=[4096, 1024, 1024], k=4096, group_size=128, zero_points=False,
              dtype=torch.bfloat16, residual=[False] * 3, warps=None), 0)  # q/k/v
@example(dict(prologue="rmsnorm", m=1, ns=[80, 32, 4608], k=14336, group_size=32, zero_points=True,
              dtype=torch.float16, residual=[True, False, True], warps=None, row_tiles=3), 1)  # 48 rows past N, CTAs walking several
@example(dict(prologue="rmsnorm", m=1, ns=[14336, 14336], k=4096, group_size=128, zero_points=False,
              dtype=torch.bfloat16, residual=[False] * 2, warps=4), 0)  # gate/up, 4 warps
@example(dict(prologue="silu_mul", m=1, ns=[4096], k=14336, group_size=128, zero_points=True,
              dtype=torch.bfloat16, residual=[True], warps=None), 0)  # down_proj
@example(dict(prologue="rmsnorm", m=1, ns=[64, 32], k=14336, group_size=32, zero_points=True,
              dtype=torch.float16, residual=[True, False], warps=4), 0)  # 4 warps past K = 8192: 8 instead
@example(dict(prologue="", m=8, ns=[4096], k=4096, group_size=128, zero_points=False,
              dtype=torch.bfloat16, residual=[True], warps=None), 0)  # o_proj at batch 8
@example(dict(prologue="", m=13, ns=[4608, 48], k=384, group_size=64, zero_points=True,
              dtype=torch.float16, residual=[True, True], warps=None), 0)
def test_fused_matches_reference_on_gpu(case, seed):
    check_fused(**case, seed=seed)


@pytest.mark.gpu
def test_tensors_on_another_device_are_refused_on_gpu():
    x, p, b, _, _ = kernel_case("w4a16", 1, 32, 256, group_size=64, device="cuda")
    with pytest.raises(ValueError, match="layer 0: its tensors are on cpu"):
        CW.w4a16_decode(x, int4_layout.to_mma16(p[0]).cpu(), p[1], None, None, 64)
    with pytest.raises(ValueError, match=r"layer 0: an int4 weight in the MMA-fragment layout is uint8 \[N/16"):
        CW.w4a16_decode(x, p[0], p[1], None, None, 64)  # the public layout


@pytest.mark.gpu
def test_strided_activation_and_weights_on_gpu():
    x, p, b, _, ref = kernel_case("w4a16", 3, 64, 256, group_size=64, zero_points=True, bias=True, device="cuda")
    wide = torch.zeros(3, 512 + 8, dtype=x.dtype, device="cuda")
    wide[:, 8:264] = x  # rows 16-byte aligned, but the view starts 16 bytes in and is not contiguous
    w = int4_layout.to_mma16(p[0])  # [4, 16, 128]; a view of a wider buffer: blocks 20 atoms apart
    wider = torch.zeros(w.shape[0], w.shape[1] + 4, 128, dtype=torch.uint8, device="cuda")
    wider[:, 2:-2] = w
    y = CW.w4a16_decode(wide[:, 8:264], wider[:, 2:-2], p[1], p[2], b, 64)
    assert S.relative_error(y, ref) <= S.TOLERANCE[x.dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("zero_points", [False, True])
def test_one_token_past_the_shared_memory_on_gpu(zero_points):
    """One token's kernel holds the activation row in shared memory; a row longer than the device's
    shared memory runs on the 8-token kernel instead, with the same result."""
    optin = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", 227 * 1024)
    k = (optin // 2 // 128 + 1) * 128  # the row alone is past what a CTA may have
    check(1, [32, 16], k, 128, zero_points, torch.bfloat16, bias=True, scale_dtype=None, row_tiles=None)


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,ns,zero_points", [(1, 4096, [6144], False), (1, 4096, [14336, 14336], True),
                                                (16, 14336, [4096], False), (5, 384, [48, 32], True),
                                                (12, 4096, [6144], True)])
def test_dependent_launch_reads_the_activation_after_the_kernel_before_on_gpu(m, k, ns, zero_points):
    """The kernel before writes the activation late, after letting a dependent launch start
    (tests.helpers.late_copy): launched with programmatic dependent launch (eagerly and captured into
    a CUDA graph), every output is of the new activation."""
    if not _sm90():
        pytest.skip("programmatic dependent launch needs sm90+")
    layers, public = [], []
    for i, n in enumerate(ns):
        _, p, b, _, _ = kernel_case("w4a16", m, n, k, group_size=128, zero_points=zero_points, seed=10 + i, device="cuda")
        layers.append(CW.Layer(int4_layout.to_mma16(p[0]), p[1], p[2] if zero_points else None, b))
        public.append((p, b))
    xs = [kernel_case("w4a16", m, 16, k, seed=50 + j, device="cuda")[0] for j in range(3)]
    refs = [[S.reference("w4a16", x, p, b) for p, b in public] for x in xs]
    buf = xs[-1].clone()  # holds another activation until each copy lands

    eager = []
    for x in xs:
        late_copy(x, buf)
        eager.append(CW.w4a16_decode_group(buf, layers, 128, pdl=True))
    assert_each_matches(eager, refs)
    torch.cuda.synchronize()
    CW.w4a16_decode_group(buf, layers, 128)  # built and loaded before the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = []
        for x in xs:
            late_copy(x, buf)
            captured.append(CW.w4a16_decode_group(buf, layers, 128, pdl=True))
    buf.copy_(xs[-1])
    g.replay()
    torch.cuda.synchronize()
    assert_each_matches(captured, refs)


def test_dependent_launch_rule(monkeypatch):
    import torch._inductor.config as inductor_config

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert CW.pdl_for(None, cpu, False) is False  # no GPU: a plain launch
    assert CW.pdl_for(True, cpu, False) is True and CW.pdl_for(False, cpu, False) is False
    assert CW.pdl_for(True, cpu, True) is False  # a tensor written by this call: never early
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(inductor_config.triton, "enable_pdl", True)
    assert CW.pdl_for(None, gpu, False) is False  # eager: a plain launch
    capturing[0] = True
    assert CW.pdl_for(None, gpu, False) is True  # captured, behind Inductor kernels that start us early
    assert CW.pdl_for(None, gpu, True) is False
    assert CW.pdl_for(None, gpu, False, one_token=True) is False  # the one-token kernel: plain by default
    assert CW.pdl_for(True, gpu, False, one_token=True) is True
    monkeypatch.setattr(inductor_config.triton, "enable_pdl", False)
    assert CW.pdl_for(None, gpu, False) is False  # Inductor's default: nothing to gain


def test_refuses_bad_arguments():
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    w = torch.zeros(8, 128, dtype=torch.uint8)
    s = torch.ones(8, 2)
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
        CW.w4a16_decode(x, w, s, None, None, 128)
    with pytest.raises(ValueError, match="48-row tiles .* 8 warps, not 4"):
        CW.w4a16_decode(x, w, s, None, None, 128, row_tiles=3, warps=4)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        CW.w4a16_decode(x.float(), w, s, None, None, 128)
    z = torch.zeros(8, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="all have zero points or all have none"):
        CW.w4a16_decode_group(x, [CW.Layer(w, s, z, None), CW.Layer(w, s, None, None)], 128)
    assert "groups of 32, 64 or 128" in CW.check_group_size(256, 16)
    assert "groups of 32, 64 or 128" in CW.check_group_size(4096, 256)  # a scale a chunk of 128 at most
    assert "K divisible by 128" in CW.check_group_size(192, 64)
    assert CW.check_group_size(4096, 128) == "" and CW.check_group_size(4096, 32) == ""


def test_warps_rule_and_its_limits():
    assert CW.warps_for(1, 896, 132) == 4  # gate/up together at M = 1: 896 tiles of 32 rows
    assert CW.warps_for(1, 448, 132) == 4  # N = 14336
    assert CW.warps_for(1, 192, 132) == 8  # q/k/v (N = 6144): under two tiles an SM
    assert CW.warps_for(1, 128, 132) == 8  # down_proj (N = 4096): one tile an SM
    assert CW.warps_for(8, 896, 132) == 8  # more tokens: 8 warps always
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    w = torch.zeros(2, 16, 128, dtype=torch.uint8)
    with pytest.raises(ValueError, match="4 for one token"):
        CW.w4a16_decode(x, w, torch.ones(32, 2), None, None, 128, warps=4)
    with pytest.raises(ValueError, match="got 6"):
        CW.w4a16_decode(x[:1], w, torch.ones(32, 2), None, None, 128, warps=6)


@pytest.mark.gpu
def test_48_row_tiles_are_refused_past_8_tokens_on_gpu():
    x, p, _, _, _ = kernel_case("w4a16", 1, 96, 256, group_size=128, device="cuda")
    w = int4_layout.to_mma16(p[0])
    with pytest.raises(RuntimeError, match="row_tiles 3 .* needs 1 to 8 tokens"):
        CW.w4a16_decode(x.repeat(9, 1), w, p[1], None, None, 128, row_tiles=3)
    with pytest.raises(RuntimeError, match="row_tiles must be 1, 2 or 3"):
        CW.w4a16_decode(x.repeat(4, 1), w, p[1], None, None, 128, row_tiles=4)


def test_row_tiles_rule():
    assert CW.row_tiles_for(1, 28672, 132) == 2  # gate/up together: 896 tiles of 32 rows
    assert CW.row_tiles_for(1, 4096, 132) == 2  # o_proj: 128 tiles of 32 rows, about one per SM
    assert CW.row_tiles_for(1, 1024, 132) == 1  # a lone k_proj: 64 tiles of 16 rows, 32 of 32 would idle SMs
    assert CW.w4a16_row_tiles(1, 6144, 132, "rmsnorm") == 3  # q/k/v with its norm: 128 tiles of 48 rows, one round
    assert CW.w4a16_row_tiles(1, 6144, 132) == 3 and CW.w4a16_row_tiles(1, 6144, 132, group_size=256) == 3
    assert CW.w4a16_row_tiles(1, 6144, 114, "rmsnorm") == 2  # ... where they fit one round
    assert CW.w4a16_row_tiles(1, 6144, 132, group_size=32) == 1  # groups of 32 / 64 at M = 1: the 16-row rule
    assert CW.w4a16_row_tiles(1, 6144, 132, "rmsnorm", group_size=64) == 2  # ... with a prologue 32 rows
    assert CW.w4a16_row_tiles(8, 6144, 132, group_size=32) == 3  # more tokens: 48 rows for any group
    assert CW.warps_for(1, 192, 132) == 8
    assert CW.w4a16_row_tiles(8, 6144, 132) == 3  # more tokens: 128 tiles of 48 rows, one round
    assert CW.w4a16_row_tiles(4, 6144, 114) == 2  # 128 tiles of 48 rows would not fit 114 SMs in one round
    assert CW.w4a16_row_tiles(16, 6144, 132) == 2  # 16 tokens: 32 rows (48 were no faster)
    assert CW.w4a16_row_tiles(16, 14336, 132) == 2  # 448 tiles of 32 rows: 85% of 4 rounds
    assert CW.w4a16_row_tiles(1, 14336, 132) == 2  # 448 tiles: 85% of 4 rounds
    assert CW.w4a16_row_tiles(1, 28672, 132) == 2 and CW.w4a16_row_tiles(1, 4096, 132) == 2
    assert CW.w4a16_row_tiles(1, 1024, 132) == 1


def test_abi_struct_sizes():
    # the C structs: 6 pointers, 5 int64, 2 int32 a layer; the header's 7 int32 and a float end on an
    # 8-byte boundary, then two pointers
    assert torch.tensor(0).element_size() == 8
    import ctypes

    assert ctypes.sizeof(CW._Segment) == 96
    assert ctypes.sizeof(CW._Params) == 8 + 8 + 7 * 4 + 4 + 2 * 8 + CW.MAX_SEGMENTS * 96


def test_prologue_rule_and_refusals():
    assert CW.why_not_prologue("rmsnorm", 1, 4096) == "" and CW.why_not_prologue("silu_mul", 1, 14336) == ""
    assert "one token (M = 1) only, not M = 8" in CW.why_not_prologue("rmsnorm", 8, 4096)
    assert "not M = symbolic" in CW.why_not_prologue("silu_mul", None, 4096)
    assert "up to K = 16384, not 16512" in CW.why_not_prologue("rmsnorm", 1, 16512)
    assert "no prologue 'gelu'" in CW.why_not_prologue("gelu", 1, 4096)
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    layer = CW.Layer(torch.zeros(2, 16, 128, dtype=torch.uint8), torch.ones(32, 2))
    with pytest.raises(ValueError, match="one token"):
        CW.w4a16_decode_group(x, [layer], 128, prologue="rmsnorm", norm_weight=torch.ones(256, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="needs norm_weight"):
        CW.w4a16_decode_group(x[:1], [layer], 128, prologue="rmsnorm")
    with pytest.raises(ValueError, match="needs x2"):
        CW.w4a16_decode_group(x[:1], [layer], 128, prologue="silu_mul")
    with pytest.raises(ValueError, match=r"norm_weight must be torch.bfloat16 \[256\]"):
        CW.w4a16_decode_group(x[:1], [layer], 128, prologue="rmsnorm", norm_weight=torch.ones(128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="one residual"):
        CW.w4a16_decode_group(x, [layer], 128, residuals=[None, None])


@pytest.mark.slow
@pytest.mark.skipif(cuda_build.toolchain()[0] is None, reason="needs nvcc")
def test_source_compiles_for_sm80_and_sm90(tmp_path):
    times = cuda_build.compile_only(capability=(9, 0), keep=tmp_path)
    assert set(times) == set(cuda_build.LIBRARIES)
    cuda_build.compile_only(capability=(8, 0))
    # each library exports its two C functions and nothing GNU-unique: such a symbol (a static in a
    # template with external linkage) is one per process, so two builds loaded at once (two GPU
    # architectures, bench_cuda_ring.py's variants) would share the per-device launch cache
    for library in cuda_build.LIBRARIES:
        symbols = _dynamic_symbols(tmp_path / f"lib{library}.so")
        assert not [name for name, bind in symbols if bind == STB_GNU_UNIQUE], library
        prefix = library.removesuffix("_decode")
        assert {f"qlp_{prefix}_abi", f"qlp_{prefix}_decode"} <= {name for name, bind in symbols if bind == STB_GLOBAL}


STB_GLOBAL, STB_GNU_UNIQUE = 1, 10


def _dynamic_symbols(path):
    """(name, binding) of the defined symbols in an ELF64 little-endian file's .dynsym."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out = []
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != 11:  # SHT_DYNSYM
            continue
        strtab = sections[link][4]
        for j in range(size // entsize):
            st_name, st_info, _other, st_shndx = struct.unpack_from("<IBBH", data, offset + j * entsize)
            if st_shndx == 0:  # undefined: imported, not ours
                continue
            end = data.index(b"\0", strtab + st_name)
            out.append((data[strtab + st_name:end].decode(), st_info >> 4))
    return out


# --- the fragment mapping, modelled on the CPU --------------------------------------------------
# What one warp computes for one 16-row block and one sub-chunk of AS atoms, lane by lane, as the
# kernel does it (word L of each atom of the MMA-fragment layout, its nibble pairs, the
# activation pairs at 2t and 2t + 8), fed to mma.m16n8k16 as PTX defines the fragments.  If the
# layout and the kernel's reads disagreed, this would not equal the plain product.


def _mma_m16n8k16(a_frags, b_frags):
    """PTX mma.m16n8k16 row.col: a_frags[lane] = 4 pairs (a0..a3), b_frags[lane] = 2 pairs -> C [16, 8]."""
    a = np.zeros((16, 16))
    b = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        (a0, a1, a2, a3), (b0, b1) = a_frags[lane], b_frags[lane]
        a[g, 2 * t:2 * t + 2], a[g + 8, 2 * t:2 * t + 2] = a0, a1
        a[g, 2 * t + 8:2 * t + 10], a[g + 8, 2 * t + 8:2 * t + 10] = a2, a3
        b[2 * t:2 * t + 2, g], b[2 * t + 8:2 * t + 10, g] = b0, b1
    return a @ b


def _warp_sub_chunk(q, x, atoms):
    """q: [16, 16 * atoms] int4 values (rows = channels), x: [8, 16 * atoms] (tokens): the kernel's sum."""
    block = int4_layout.to_mma16(S.pack_int4(torch.from_numpy(q))).numpy()[0]  # [atoms, 128] bytes
    c = np.zeros((16, 8))
    for a in range(atoms):
        a_frags, b_frags = [], []
        for lane in range(32):
            g, t = lane // 4, lane % 4
            word = int.from_bytes(block[a, 4 * lane:4 * lane + 4].tobytes(), "little")
            # nibbles(word >> 4i): the pair in bits 0-3 and 16-19, fragment register i
            a_frags.append([((word >> 4 * i) & 0xF, (word >> (4 * i + 16)) & 0xF) for i in range(4)])
            k0 = 16 * a + 2 * t
            b_frags.append(((x[g, k0], x[g, k0 + 1]), (x[g, k0 + 8], x[g, k0 + 9])))
        c += _mma_m16n8k16(a_frags, b_frags)
    return c


@pytest.mark.parametrize("vec", [4, 8, 16])
def test_fragment_mapping_reads_the_weight_layout(vec):
    rng = np.random.default_rng(vec)
    atoms = vec // 2
    q = rng.integers(0, 16, (16, 16 * atoms)).astype(np.uint8)
    x = rng.standard_normal((8, 16 * atoms))
    np.testing.assert_allclose(_warp_sub_chunk(q, x, atoms), q.astype(np.float64) @ x.T, rtol=1e-12, atol=1e-9)
