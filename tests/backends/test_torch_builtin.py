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


def test_torch_backend_has_no_block_or_fp8_weight_only_kernel():
    table = qp.available_backends("cpu")["torch"]
    assert table["fp8_block"] == (False, "no kernel for this scheme")
    assert table["fp8_weight_only"] == (False, "no kernel for this scheme")
    assert table["fp8_rowwise"][0]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8_tensor", "fp8_rowwise", "int8_weight_only", "w4a16"])
@given(data=st.data())
def test_torch_kernels_on_gpu(scheme, data):
    strategy = layer_cases(scheme, max_m=300, k_choices=(256, 512), n_choices=(64, 256), dtypes=[torch.bfloat16])
    check_drawn_or_pinned(scheme, "auto" if scheme == "int8_weight_only" else "torch", data, strategy=strategy,
                          device="cuda")
