import dataclasses

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import qlinear_pass as qp
from qlinear_pass.registry import DeviceInfo, LayerSpec, get_kernel

from .conformance import check_drawn_or_pinned, layer_cases

CPU_PAIRS = [
    ("fp8_tensor", "torch_scaled_mm"),
    ("fp8_rowwise", "torch_scaled_mm"),
    ("int8_rowwise", "torch_int_mm"),
    ("int8_weight_only", "torch_int8pack"),
    ("w4a16", "torch_int4pack"),
]


@pytest.mark.parametrize("scheme,kernel", CPU_PAIRS)
@given(data=st.data())
@example(data=None)
def test_torch_kernels_agree_with_reference_on_cpu(scheme, kernel, data):
    from qlinear_pass.backends.torch_builtin import cpu_rowwise_scaled_mm

    if scheme == "fp8_rowwise" and not cpu_rowwise_scaled_mm():
        pytest.skip(f"torch {torch.__version__}'s CPU _scaled_mm has no rowwise scales")
    check_drawn_or_pinned(scheme, "torch", data, expect_kernel=kernel)


def spec(scheme, **kw):
    base = dict(scheme=scheme, n=4096, k=4096, act_dtype=torch.bfloat16, out_dtype=torch.bfloat16, device="cuda")
    base.update(kw)
    return LayerSpec(**base)


def test_honest_reasons_on_cuda_devices():
    a100 = DeviceInfo("cuda", (8, 0), "fake A100")
    ok, why = get_kernel("torch_scaled_mm").is_supported(a100)
    assert not ok and "sm89" in why
    ok, why = get_kernel("torch_int_mm").can_implement(spec("int8_rowwise", m=None))
    assert not ok and "M > 16" in why and "dynamic" in why
    ok, why = get_kernel("torch_int_mm").can_implement(spec("int8_rowwise", m=8))
    assert not ok and "M=8" in why
    assert get_kernel("torch_int_mm").can_implement(spec("int8_rowwise", m=64))[0]
    ok, why = get_kernel("torch_scaled_mm").can_implement(spec("fp8_rowwise", out_dtype=torch.float16))
    assert not ok and "bfloat16 only" in why
    ok, why = get_kernel("torch_scaled_mm").can_implement(spec("fp8_tensor", n=100))
    assert not ok and "divisible by 16" in why
    ok, why = get_kernel("torch_int4pack").can_implement(spec("w4a16", group_size=128, weights_constant=False))
    assert not ok and "parameters/buffers" in why
    ok, why = get_kernel("torch_int4pack").can_implement(spec("w4a16", group_size=128, weights_constant=True, act_dtype=torch.float16))
    assert not ok and "bfloat16" in why


def test_torch_backend_has_no_fp8_weight_only_kernel_and_block_scales_only_on_hopper():
    table = qp.available_backends("cpu")["torch"]
    assert table["fp8_block"] == (False, "torch_scaled_mm_block: torch._scaled_mm takes (1x128, 128x128) block "
                                         "scales on CUDA GPUs only, not cpu")
    assert table["fp8_weight_only"] == (False, "no kernel for this scheme")
    assert table["fp8_rowwise"][0]
    block = get_kernel("torch_scaled_mm_block")
    ok, why = block.is_supported(DeviceInfo("cuda", (8, 9), "fake L40S"))
    assert not ok and "Hopper (sm90)" in why
    ok, why = block.can_implement(spec("fp8_block", out_dtype=torch.float16))
    assert not ok and "writes bfloat16" in why
    ok, why = block.can_implement(spec("fp8_block", k=384))
    assert not ok and "K divisible by 512" in why
    assert block.can_implement(spec("fp8_block"))[0]


def _cublas_block_scaled_mm(a, b, scale_a, scale_b, out_dtype=None):
    """torch._scaled_mm's (1x128, 128x128) block-scaled GEMM as cuBLASLt takes it on a GPU: the layouts
    checked as torch checks them there, the math in float32 (the CPU's _scaled_mm has no block scales)."""
    m, k = a.shape
    n = b.shape[1]
    assert a.stride(1) == 1 and b.stride(0) == 1, "A row-major, B column-major"
    assert m % 4 == 0 and scale_a.shape == (m, k // 128) and scale_a.stride() == (1, m)
    assert scale_b.shape == (k // 128, -(-n // 128)) and scale_b.stride() == (1, k // 128)
    assert scale_a.dtype == scale_b.dtype == torch.float32 and out_dtype == torch.bfloat16
    sa = scale_a.repeat_interleave(128, 1)
    sb = scale_b.repeat_interleave(128, 0).repeat_interleave(128, 1)[:, :n]
    return ((a.float() * sa) @ (b.float() * sb)).to(out_dtype)


def test_block_scales_are_tried_on_real_tensors_while_the_pass_runs_under_fake_ones(monkeypatch):
    """The pass asks is_supported while the compile's fake tensors are in effect: the one-off trial of
    torch._scaled_mm with block scales still runs on real tensors (its result is read)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qlinear_pass.backends.torch_builtin import block_scaled_mm_error

    monkeypatch.setattr(torch, "_scaled_mm", _cublas_block_scaled_mm)
    with FakeTensorMode():
        assert block_scaled_mm_error.__wrapped__(torch.device("cpu")) == ""
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: torch.zeros(16, 256, dtype=torch.bfloat16))
    assert "wrong result" in block_scaled_mm_error.__wrapped__(torch.device("cpu"))


@pytest.mark.parametrize("static", [False, "rows", "columns"])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)])
def test_block_scaled_glue_hands_cublas_its_layouts(monkeypatch, static, lead):
    """torch_scaled_mm_block's run on a CPU, with _scaled_mm replaced by a stand-in that asserts the
    layouts cuBLASLt needs: the scheme reference's result, for a dynamic and a graph-quantized
    activation (row-major scales, copied to columns, or the columns the compiled graph writes),
    with a bias and a 3-D activation."""
    from qlinear_pass.kernels.ops import mn_major_scales
    from qlinear_pass import schemes as S

    from ..helpers import linear_model, random_activation

    monkeypatch.setattr(torch, "_scaled_mm", _cublas_block_scaled_mm)
    q = linear_model(512, 192, "fp8_block", bias=True)[0]
    x = random_activation((*lead, 512))
    s = spec("fp8_block", n=192, k=512, has_bias=True, device="cpu")
    inputs, params = x, list(q.params)
    if static:
        xq, sa = S.quantize_activation("fp8_block", x.reshape(-1, 512))
        s = dataclasses.replace(s, act_input="static", act_dtype=torch.float8_e4m3fn)
        if static == "columns":  # as emit.mn_major_scale_view has the graph write them
            sa = mn_major_scales(sa.reshape(xq.shape[0], -1))[:, :xq.shape[0]].t()
        inputs, params = xq, params + [sa]
    y = get_kernel("torch_scaled_mm_block").run(s, inputs, params, q.bias)
    ref = S.reference("fp8_block", x, q.params, q.bias)
    assert y.shape == (*inputs.shape[:-1], 192) and y.dtype == ref.dtype
    assert S.relative_error(y.reshape(ref.shape), ref) <= S.TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8_tensor", "fp8_rowwise", "fp8_block", "int8_weight_only", "w4a16"])
@given(data=st.data())
def test_torch_kernels_on_gpu(scheme, data):
    ks = (512, 1024) if scheme == "fp8_block" else (256, 512)  # torch's block scales: K in whole 512s
    strategy = layer_cases(scheme, max_m=300, k_choices=ks, n_choices=(64, 256), dtypes=[torch.bfloat16])
    check_drawn_or_pinned(scheme, "auto" if scheme == "int8_weight_only" else "torch", data, strategy=strategy,
                          device="cuda")


@pytest.mark.gpu
@pytest.mark.inductor
@pytest.mark.parametrize("rows", [4, 5])
def test_block_scales_through_inductor_on_a_gpu(rows):
    """fp8_block on the torch backend with Inductor: the graph quantizes the activation (with M a
    multiple of 4 it also writes the scales as the columns cuBLASLt reads), torch._scaled_mm runs
    the GEMM, and the output is the scheme reference's."""
    from qlinear_pass import schemes as S

    from ..helpers import linear_model, random_activation, recorded

    ok, why = get_kernel("torch_scaled_mm_block").is_supported(DeviceInfo.of("cuda"))
    if not ok:
        pytest.skip(why)
    model = linear_model(512, 256, "fp8_block", bias=True).cuda()
    x = random_activation((1, rows, 512)).cuda()
    with torch.no_grad(), recorded() as recs:
        y = torch.compile(model, backend=qp.make("torch", inductor=True))(x)
        ref = S.reference("fp8_block", x, model[0].params, model[0].bias)
    assert [d.kernel for r in recs for d in r.decisions] == ["torch_scaled_mm_block"]
    assert y.shape == ref.shape and S.relative_error(y, ref) <= S.TOLERANCE[torch.bfloat16]
