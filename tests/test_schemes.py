import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qlinear_pass import schemes as S

SCHEMES = [s.name for s in S.all_schemes()]


@given(
    scheme=st.sampled_from(SCHEMES),
    n=st.integers(1, 40),
    kb=st.integers(1, 3),
    group=st.sampled_from(S.GROUP_SIZES),
    zp=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantize_round_trip_within_bound(scheme, n, kb, group, zp, seed):
    k = kb * 128
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-4, 4, (n, 1), generator=g).float())
    zp = zp and scheme == "w4a16"
    p = S.quantize_weight(scheme, w, group_size=group, zero_points=zp)
    params = [p[name] for name in S.get_scheme(scheme).param_names]
    dq = S.dequantize_weight(scheme, params, k)
    bound = S.weight_error_bound(scheme, w, group_size=group)
    assert dq.shape == w.shape
    assert ((dq - w).abs() <= bound).all(), float(((dq - w).abs() - bound).max())


def test_weight_storage_dtypes_and_shapes():
    w = torch.randn(200, 256)
    assert S.quantize_weight("fp8_tensor", w)["weight_scale"].shape == ()
    assert S.quantize_weight("fp8_rowwise", w)["weight"].dtype == torch.float8_e4m3fn
    assert S.quantize_weight("fp8_block", w)["weight_scale"].shape == (2, 2)
    assert S.quantize_weight("int8_rowwise", w)["weight"].dtype == torch.int8
    p = S.quantize_weight("w4a16", w, group_size=64, zero_points=True)
    assert p["weight"].shape == (200, 128) and p["weight"].dtype == torch.uint8
    assert p["weight_scale"].shape == (200, 4) and p["weight_zero"].dtype == torch.uint8
    assert int(p["weight_zero"].max()) <= 15


def test_fp8_saturates_instead_of_overflowing():
    w = torch.tensor([[1.0, -1e30, 3.0, 0.0]] * 2)
    q = S.quantize_weight("fp8_rowwise", w)["weight"].float()
    assert torch.isfinite(q).all() and q.abs().max() == 448.0


def test_int4_pack_round_trip():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = S.pack_int4(q)
    assert packed.shape == (5, 32)
    assert (packed[:, 0] & 15 == q[:, 0]).all()  # even k in the low nibble
    assert torch.equal(S.unpack_int4(packed), q)


def test_bad_group_size_and_k():
    with pytest.raises(ValueError, match="group size"):
        S.quantize_weight("w4a16", torch.randn(4, 96), group_size=48)
    with pytest.raises(ValueError, match="multiple of the group size 64"):
        S.quantize_weight("w4a16", torch.randn(4, 96), group_size=64)
    with pytest.raises(ValueError, match="multiple of 128"):
        S.quantize_weight("fp8_block", torch.randn(4, 96))


@pytest.mark.parametrize("scheme", ["fp8_tensor", "fp8_rowwise", "fp8_block", "int8_rowwise"])
def test_activation_quantization_scales(scheme):
    x = torch.randn(6, 256) * torch.tensor([1e-3, 1, 10, 100, 0.5, 3.0])[:, None]
    q, s = S.quantize_activation(scheme, x)
    sch = S.get_scheme(scheme)
    gran = sch.act_granularity
    assert q.dtype == sch.act_dtype
    if gran == "token":
        assert s.shape == (6, 1)
        torch.testing.assert_close(s, x.abs().amax(1, keepdim=True) / sch.qmax)
    elif gran == "group":
        assert s.shape == (6, 2)
    else:
        assert s.shape == ()
    back = S.dequantize_activation(scheme, q, s)
    assert S.relative_error(back, x) < 0.05


def test_reference_matches_manual_math():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 128, dtype=torch.bfloat16)
    w = torch.randn(16, 128)
    b = torch.randn(16)
    p = S.quantize_weight("int8_weight_only", w)
    y = S.reference("int8_weight_only", x, [p["weight"], p["weight_scale"]], b)
    manual = (x.float() @ (p["weight"].float() * p["weight_scale"][:, None]).t() + b).to(torch.bfloat16)
    assert y.shape == (3, 4, 16) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, manual)


def test_reference_static_input_needs_out_dtype():
    w = S.quantize_weight("fp8_tensor", torch.randn(16, 32))
    xq, xs = S.quantize_activation("fp8_tensor", torch.randn(4, 32))
    with pytest.raises(ValueError, match="out_dtype"):
        S.reference("fp8_tensor", xq, [w["weight"], w["weight_scale"]], input_scale=xs)
    y = S.reference("fp8_tensor", xq, [w["weight"], w["weight_scale"]], input_scale=xs, out_dtype=torch.float16)
    assert y.dtype == torch.float16


def test_relative_error_flags_nan():
    assert S.relative_error(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")
