"""FlashInfer backends: selection, reasons and errors everywhere; numbers on a Hopper GPU."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qlinear_pass as qp
from qlinear_pass import registry as R
from qlinear_pass import schemes as S
from qlinear_pass.backends import flashinfer as FI

pytest.importorskip("flashinfer")

H100 = R.DeviceInfo("cuda", (9, 0), "fake H100")
B200 = R.DeviceInfo("cuda", (10, 0), "fake B200")
L40 = R.DeviceInfo("cuda", (8, 9), "fake L40S")
A100 = R.DeviceInfo("cuda", (8, 0), "fake A100")


def spec(scheme="fp8_block", **kw):
    base = dict(scheme=scheme, n=4096, k=4096, act_dtype=torch.bfloat16, out_dtype=torch.bfloat16, device="cuda",
                act_input="dynamic", module="layers.3.mlp.up_proj")
    base.update(kw)
    return R.LayerSpec(**base)


def test_backends_by_compute_capability():
    on_h100 = qp.available_backends(H100)
    assert on_h100["flashinfer_cublas"]["fp8_tensor"][0]
    assert on_h100["flashinfer_deepgemm"]["fp8_block"][0]
    ok, why = on_h100["flashinfer_cutlass"]["fp8_block"]
    assert not ok and "sm100" in why and "sm90" in why  # FlashInfer's own answer, naming what it needs
    ok, why = on_h100["flashinfer_trtllm"]["fp8_block"]
    assert not ok and "sm100" in why
    on_b200 = qp.available_backends(B200)
    assert on_b200["flashinfer_cutlass"]["fp8_block"][0] and on_b200["flashinfer_trtllm"]["fp8_block"][0]
    ok, why = on_b200["flashinfer_deepgemm"]["fp8_block"]
    assert not ok and "Hopper" in why
    assert qp.available_backends(L40)["flashinfer_cublas"]["fp8_tensor"][0]
    ok, why = qp.available_backends(A100)["flashinfer_cublas"]["fp8_tensor"]
    assert not ok and "sm89" in why


def test_cpu_and_missing_library_reasons(monkeypatch):
    ok, why = FI.FlashInferCublas().is_supported(R.DeviceInfo("cpu"))
    assert not ok and "CUDA GPU" in why
    monkeypatch.setattr(FI, "_flashinfer", lambda: None)
    ok, why = FI.FlashInferDeepGemm().is_supported(H100)
    assert not ok and "pip install 'qlinear_pass[flashinfer]'" in why


def test_explicit_sm100_backend_on_hopper_is_an_error_naming_why():
    with pytest.raises(qp.NoKernelError) as e:
        R.select(spec(), qp.LinearBackendConfig("flashinfer_cutlass"), H100)
    msg = str(e.value)
    assert "layers.3.mlp.up_proj" in msg and "flashinfer_cutlass_fp8_block" in msg and "sm100" in msg


def test_alignment_and_dtype_limits():
    dg = FI.FlashInferDeepGemm()
    ok, why = dg.can_implement(spec(n=4100))
    assert not ok and "divisible by 64" in why
    ok, why = dg.can_implement(spec(out_dtype=torch.float16))
    assert not ok and "bfloat16 only" in why
    ok, why = FI.FlashInferCublas().can_implement(spec("fp8_tensor", out_dtype=torch.float32))
    assert not ok and "bf16 or fp16" in why
    ok, why = FI.FlashInferTrtllmBlock().can_implement(spec(k=128))
    assert not ok and "K >= 256" in why


def test_auto_prefers_our_kernels_and_keeps_flashinfer_as_candidate():
    names = [k.name for k in R.candidates("fp8_block", H100)]
    assert names.index("triton_w8a8") < names.index("flashinfer_deepgemm_fp8_block") < names.index("emulation")


@given(m=st.integers(1, 37), kb=st.integers(1, 4), seed=st.integers(0, 100))
def test_mn_major_scale_layout(m, kb, seed):
    """The kernel reads scales[kb * ceil4(M) + m]: check the memory, not just the values."""
    scale = torch.rand(m, kb, generator=torch.Generator().manual_seed(seed))
    out = FI.mn_major_scales(scale)
    assert out.shape == (m, kb)
    ld = -(-m // 4) * 4
    storage = torch.tensor(out.untyped_storage().tolist(), dtype=torch.uint8).view(torch.float32)
    for i in range(m):
        for j in range(kb):
            assert storage[j * ld + i] == scale[i, j]


# --- on a Hopper GPU ---------------------------------------------------------------------------

GPU_KERNELS = [("fp8_tensor", "flashinfer_cublas_fp8"), ("fp8_tensor", "flashinfer_cudnn_fp8"),
               ("fp8_block", "flashinfer_deepgemm_fp8_block")]


def _run(scheme, kernel_name, m, n, k, act_input, seed):
    from .test_triton import run_direct

    kernel = R.get_kernel(kernel_name)
    ok, why = kernel.is_supported(R.DeviceInfo.of("cuda"))
    if not ok:
        pytest.skip(why)
    return run_direct(scheme, m, n, k, act_input=act_input, seed=seed, device="cuda", bias=True, poison=True,
                      kernel=kernel_name)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,kernel", GPU_KERNELS)
@given(m=st.sampled_from([1, 7, 31, 32, 100, 1024, 4096]), n=st.sampled_from([256, 1024, 4096]),
       kb=st.sampled_from([2, 8, 32]), act_input=st.sampled_from(["dynamic", "static"]), seed=st.integers(0, 99))
def test_gpu_against_reference(scheme, kernel, m, n, kb, act_input, seed):
    _run(scheme, kernel, m, n, kb * 128, act_input, seed)


@pytest.mark.gpu
def test_gpu_row_major_activation_scales_are_wrong():
    """The trap this backend avoids: row-major [M, K/128] scales run, and give a wrong result."""
    fi = FI._flashinfer()
    if not FI.FlashInferDeepGemm().is_supported(R.DeviceInfo.of("cuda"))[0]:
        pytest.skip("needs Hopper")
    from qlinear_pass.kernels import triton_gemm as T

    g = torch.Generator().manual_seed(0)
    m, n, k = 64, 1024, 2048
    w = S.quantize_weight("fp8_block", torch.randn(n, k, generator=g) * 0.05)
    x = (torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-4, 5, (m, k // 128), generator=g).float()).repeat_interleave(128, 1)).bfloat16().cuda()
    wq, ws = w["weight"].cuda(), w["weight_scale"].cuda()
    xq, xs = T.quantize_activation(x, S.FP8, group=128)
    ref = S.reference("fp8_block", xq, [wq, ws], input_scale=xs, out_dtype=torch.bfloat16)
    right = fi.gemm.fp8_blockscale_gemm_sm90(xq, wq, FI.mn_major_scales(xs), ws, out_dtype=torch.bfloat16)
    wrong = fi.gemm.fp8_blockscale_gemm_sm90(xq, wq, xs.contiguous(), ws, out_dtype=torch.bfloat16)
    assert S.relative_error(right, ref) < S.TOLERANCE[torch.bfloat16]
    assert S.relative_error(wrong, ref) > 0.05


class _FakeGemm:
    """FlashInfer's GEMM entry points as the kernels compute them, in torch: tests our glue on CPU.

    ``fp8_blockscale_gemm_sm90`` reads its activation scales the way the CUDA kernel does: from
    the tensor's storage, MN-major, with M padded to a multiple of 4.
    """

    @staticmethod
    def bmm_fp8(a, b, a_scale, b_scale, dtype, out=None, backend="cublas"):
        assert a.dim() == 3 and b.dim() == 3 and b.stride(-2) == 1  # B column-major
        return ((a.float() @ b.float()) * a_scale * b_scale).to(dtype)

    @staticmethod
    def fp8_blockscale_gemm_sm90(input, weight, input_scale=None, weight_scale=None, out=None, out_dtype=None):
        m, k = input.shape
        ld = -(-m // 4) * 4
        flat = torch.tensor(input_scale.untyped_storage().tolist(), dtype=torch.uint8).view(torch.float32)
        flat = flat[input_scale.storage_offset():]
        sa = torch.stack([flat[j * ld: j * ld + m] for j in range(k // 128)], dim=1)  # [M, K/128]
        xd = S.dequantize_activation("fp8_block", input, sa)
        wd = S.dequantize_weight("fp8_block", [weight, weight_scale], k)
        return (xd @ wd.t()).to(torch.bfloat16)

    @staticmethod
    def gemm_fp8_nt_groupwise(a, b, a_scale, b_scale, scale_major_mode=None, mma_sm=1,
                              scale_granularity_mnk=(1, 128, 128), out=None, out_dtype=None, backend="cutlass"):
        assert scale_major_mode == "K" and a_scale.is_contiguous()
        xd = S.dequantize_activation("fp8_block", a, a_scale)
        wd = S.dequantize_weight("fp8_block", [b, b_scale], a.shape[1])
        return (xd @ wd.t()).to(out_dtype)


@pytest.mark.parametrize("kernel,scheme", [("flashinfer_cublas_fp8", "fp8_tensor"), ("flashinfer_cutlass_fp8", "fp8_tensor"),
                                           ("flashinfer_deepgemm_fp8_block", "fp8_block"),
                                           ("flashinfer_cutlass_fp8_block", "fp8_block"), ("flashinfer_trtllm_fp8_block", "fp8_block")])
@pytest.mark.parametrize("act_input", ["dynamic", "static"])
@pytest.mark.parametrize("m", [1, 5, 8])
def test_glue_against_reference_with_the_library_emulated(monkeypatch, kernel, scheme, act_input, m):
    from types import SimpleNamespace

    monkeypatch.setattr(FI, "_flashinfer", lambda: SimpleNamespace(gemm=_FakeGemm))
    monkeypatch.setattr(FI, "_announce_jit", lambda *a: None)
    g = torch.Generator().manual_seed(m)
    n, k = 256, 512
    p = S.quantize_weight(scheme, torch.randn(n, k, generator=g) * 0.05)
    params = [p["weight"], p["weight_scale"]]
    x = (torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-3, 4, (m, k // 128), generator=g).float()).repeat_interleave(128, 1)).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    s = R.LayerSpec(scheme, n, k, torch.bfloat16, torch.bfloat16, has_bias=True, act_input=act_input)
    if act_input == "static":
        xq, xs = S.quantize_activation(scheme, x)
        ref = S.reference(scheme, xq, params, bias, input_scale=xs, out_dtype=torch.bfloat16)
        x, params = xq, params + [xs]
    else:
        ref = S.reference(scheme, x, params, bias)
    y = R.get_kernel(kernel).run(s, x, params, bias)
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]
