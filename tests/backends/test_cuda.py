"""CUDA backend: reasons and limits everywhere; on a GPU, a compiled model runs its w4a16 layers
through the CUDA decode kernel (sibling layers in one call) and matches the reference."""
import pytest
import torch

import qlinear_pass as qp
from qlinear_pass import registry as R
from qlinear_pass import schemes as S
from qlinear_pass.backends import cuda as CB
from qlinear_pass.kernels import cuda_build

H100 = R.DeviceInfo("cuda", (9, 0), "fake H100")
T4 = R.DeviceInfo("cuda", (7, 5), "fake T4")
CPU = R.DeviceInfo("cpu")


def spec(**kw):
    base = dict(scheme="w4a16", n=4096, k=4096, act_dtype=torch.bfloat16, out_dtype=torch.bfloat16, device="cuda",
                group_size=128, module="layers.0.self_attn.q_proj")
    base.update(kw)
    return R.LayerSpec(**base)


def test_backend_name_is_known_and_serves_w4a16_only():
    assert "cuda" in qp.available_backends(CPU)
    for scheme in S._SCHEMES:
        names = [k.name for k in R.candidates(scheme, H100) if k.backend == "cuda"]
        assert names == (["cuda_w4a16"] if scheme == "w4a16" else [])


def test_device_reasons(monkeypatch):
    k = CB.CudaW4A16()
    ok, why = k.is_supported(CPU)
    assert not ok and "need a CUDA GPU, this is cpu" in why
    ok, why = k.is_supported(T4)
    assert not ok and "sm80+" in why
    monkeypatch.setattr(cuda_build, "toolchain", lambda: (None, "nvcc was not found (install the CUDA toolkit, ...)"))
    ok, why = k.is_supported(H100)
    assert not ok and "built on first use with nvcc" in why and "nvcc was not found" in why
    monkeypatch.setattr(cuda_build, "toolchain", lambda: ("/usr/local/cuda/bin/nvcc", ""))
    assert k.is_supported(H100) == (True, "")


def test_layer_limits():
    k = CB.CudaW4A16()
    assert k.can_implement(spec()) == (True, "")
    assert k.can_implement(spec(group_size=32, zero_points=True, act_dtype=torch.float16, out_dtype=torch.float16))[0]
    ok, why = k.can_implement(spec(act_dtype=torch.float32, out_dtype=torch.float32))
    assert not ok and "bf16 / fp16 activations" in why
    ok, why = k.can_implement(spec(out_dtype=torch.float32))
    assert not ok and "writes the activation's dtype" in why
    ok, why = k.can_implement(spec(k=4160, group_size=32))
    assert not ok and "K divisible by 128" in why


def test_explicit_cuda_without_nvcc_is_an_error_naming_why(monkeypatch):
    monkeypatch.setattr(cuda_build, "toolchain", lambda: (None, "nvcc was not found"))
    with pytest.raises(qp.NoKernelError) as e:
        R.select(spec(), qp.LinearBackendConfig("cuda"), H100)
    msg = str(e.value)
    assert "cuda_w4a16" in msg and "nvcc was not found" in msg and "layers.0.self_attn.q_proj" in msg
    with pytest.raises(qp.NoKernelError) as e:
        R.select(spec(scheme="fp8_rowwise", group_size=None, act_input="dynamic"), qp.LinearBackendConfig("cuda"), H100)
    assert "no kernel for scheme 'fp8_rowwise'" in str(e.value)


def test_running_on_cpu_tensors_is_refused():
    k = CB.CudaW4A16()
    p = S.quantize_weight("w4a16", torch.randn(32, 256), group_size=128)
    with pytest.raises(ValueError, match="runs on a CUDA GPU"):
        k.run(spec(n=32, k=256, device="cpu"), torch.randn(1, 256, dtype=torch.bfloat16), [p["weight"], p["weight_scale"]], None)


@pytest.mark.gpu
def test_gpu_compiled_siblings_run_in_one_call():
    """q/k/v of one activation become one linear_group call on the CUDA kernel, at M = 1 and 8."""
    from qlinear_pass.kernels import ops

    from ..test_graph_pass import Siblings

    ok, why = CB.CudaW4A16().is_supported(R.DeviceInfo.of("cuda"))
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    model = qp.quantize(Siblings(k=512, ns=(512, 128, 128)).to(torch.bfloat16), "w4a16", group_size=64,
                        zero_points=True).cuda()
    for m in (1, 8):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        before = ops.CALLS["cuda_w4a16"]
        with torch.no_grad():
            y = torch.compile(model, backend=qp.make(linear_backend="cuda"))(x)
            ref = model(x)
        assert ops.CALLS["cuda_w4a16"] > before
        assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]
        torch._dynamo.reset()
