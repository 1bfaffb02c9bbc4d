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


def test_backend_name_is_known_and_its_kernels_serve_their_schemes():
    assert "cuda" in qp.available_backends(CPU)
    served = {"w4a16": ["cuda_w4a16"], "fp8_rowwise": ["cuda_w8a8"], "fp8_tensor": ["cuda_w8a8"], "int8_rowwise": ["cuda_w8a8"],
              "int8_weight_only": ["cuda_w8a16"], "fp8_weight_only": ["cuda_w8a16"], "fp8_block": ["cuda_w8a8"]}
    for scheme in S._SCHEMES:
        names = [k.name for k in R.candidates(scheme, H100) if k.backend == "cuda"]
        assert names == served.get(scheme, [])


def test_which_fusions_each_kernel_runs():
    """Residual adds at any M; a prologue with one token where the kernel loads a 16-bit activation
    (cuda_w4a16 up to K = 16384); never where the graph hands a quantized activation on."""
    w4, w8a16, w8a8 = CB.CudaW4A16(), CB.CudaW8A16(), CB.CudaW8A8()
    for kernel, scheme in [(w4, "w4a16"), (w8a16, "int8_weight_only"), (w8a16, "fp8_weight_only"), (w8a8, "fp8_block"),
                           (w8a8, "fp8_rowwise"), (w8a8, "int8_rowwise")]:
        for m in (1, 8, 16, None):
            assert kernel.why_not_fuse(spec(scheme=scheme, m=m), "residual") == ""
    for kernel, scheme in [(w4, "w4a16"), (w8a16, "int8_weight_only"), (w8a8, "fp8_block")]:
        assert kernel.why_not_fuse(spec(scheme=scheme, m=1), "rmsnorm") == ""
        assert kernel.why_not_fuse(spec(scheme=scheme, m=1, k=14336), "silu_mul") == ""
        assert "one token (M = 1) only, not M = 8" in kernel.why_not_fuse(spec(scheme=scheme, m=8), "rmsnorm")
    assert "up to K = 16384" in w4.why_not_fuse(spec(m=1, k=28672), "silu_mul")
    assert w8a16.why_not_fuse(spec(scheme="fp8_weight_only", m=1, k=28672), "silu_mul") == ""
    assert "quantized activation" in w8a8.why_not_fuse(spec(scheme="fp8_rowwise", m=1), "rmsnorm")
    assert "quantized activation" in w8a8.why_not_fuse(spec(scheme="fp8_block", m=16), "silu_mul")  # quantized above 8 tokens


def test_device_reasons(monkeypatch):
    k = CB.CudaW4A16()
    ok, why = k.is_supported(CPU)
    assert not ok and "need a CUDA GPU, this is cpu" in why
    ok, why = k.is_supported(T4)
    assert not ok and "sm80+" in why
    monkeypatch.setattr(cuda_build, "toolchain", lambda *a: (None, "nvcc was not found (install the CUDA toolkit, ...)"))
    ok, why = k.is_supported(H100)
    assert not ok and "built on first use with nvcc" in why and "nvcc was not found" in why
    monkeypatch.setattr(cuda_build, "toolchain", lambda *a: ("/usr/local/cuda/bin/nvcc", ""))
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
    monkeypatch.setattr(cuda_build, "toolchain", lambda *a: (None, "nvcc was not found"))
    with pytest.raises(qp.NoKernelError) as e:
        R.select(spec(), qp.LinearBackendConfig("cuda"), H100)
    msg = str(e.value)
    assert "cuda_w4a16" in msg and "nvcc was not found" in msg and "layers.0.self_attn.q_proj" in msg
    with pytest.raises(qp.NoKernelError) as e:
        R.select(spec(scheme="int8_weight_only", group_size=None), qp.LinearBackendConfig("cuda"), H100)
    assert "cuda_w8a16" in str(e.value) and "nvcc was not found" in str(e.value)
    monkeypatch.setattr(cuda_build, "toolchain", lambda *a: ("/usr/local/cuda/bin/nvcc", ""))
    with pytest.raises(qp.NoKernelError) as e:  # a pre-quantized fp8_block activation must be e4m3
        R.select(spec(scheme="fp8_block", group_size=None, act_input="static", act_dtype=torch.int8),
                 qp.LinearBackendConfig("cuda"), H100)
    assert "a quantized activation is fp8 e4m3" in str(e.value)
    sel = R.select(spec(scheme="fp8_block", group_size=None, act_input="static", act_dtype=torch.float8_e4m3fn),
                   qp.LinearBackendConfig("cuda"), H100)
    assert sel.kernel.name == "cuda_w8a8"


def test_w4a16_launches_early_only_on_a_weight_copy_made_before(monkeypatch):
    """The MMA-fragment copy made in this call is written by the kernel just ahead of the launch: no
    programmatic dependent launch then (pdl=False); from the next call on, the kernel's rule (None)."""
    from qlinear_pass.kernels import cuda_w4a16, int4_layout

    seen = []
    monkeypatch.setattr(cuda_w4a16, "w4a16_decode_group", lambda x, layers, g, pdl=None: seen.append(pdl) or [None] * len(layers))
    p = S.quantize_weight("w4a16", torch.randn(32, 256), group_size=128)
    params = [p["weight"], p["weight_scale"]]
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    k = CB.CudaW4A16()
    assert not int4_layout.has_mma16(params[0])
    k.run(spec(n=32, k=256), x, params, None)
    assert int4_layout.has_mma16(params[0])
    k.run_group([spec(n=32, k=256)] * 2, x, [params, params], [None, None])
    params[0].add_(0)  # a new version of the weight: its copy is made again
    k.run(spec(n=32, k=256), x, params, None)
    assert seen == [False, None, False]
    # a layer holding the layout hands the kernel its own buffer, read from the first call on
    got = []
    monkeypatch.setattr(cuda_w4a16, "w4a16_decode_group", lambda x, layers, g, pdl=None: got.append((pdl, layers[0].w)) or [None])
    packed = int4_layout.to_mma16(S.quantize_weight("w4a16", torch.randn(32, 256), group_size=128)["weight"])
    k.run(spec(n=32, k=256, weight_layout="mma16"), x, [packed, params[1]], None)
    assert got[0][0] is None and got[0][1] is packed


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


@pytest.mark.gpu
def test_gpu_layers_holding_the_mma16_layout_run_without_a_copy():
    """A model quantized with weight_layout="mma16" hands the kernel its own buffers: no second
    copy of the weights, and the same outputs as the eager modules."""
    import warnings

    from qlinear_pass.kernels import int4_layout, ops

    from ..test_graph_pass import Siblings

    ok, why = CB.CudaW4A16().is_supported(R.DeviceInfo.of("cuda"))
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    model = qp.quantize(Siblings(k=512, ns=(512, 128, 128)).to(torch.bfloat16), "w4a16", group_size=64,
                        zero_points=True, weight_layout="mma16").cuda()
    before, calls = int4_layout.copied_bytes(), ops.CALLS["cuda_w4a16"]
    for m in (1, 8):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = torch.compile(model, backend=qp.make(linear_backend="cuda"))(x)
        with torch.no_grad():
            ref = model(x)
        assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]
        torch._dynamo.reset()
        assert not [w for w in caught if str(w.message) == int4_layout.TWO_COPIES]
    assert ops.CALLS["cuda_w4a16"] > calls and int4_layout.copied_bytes() == before


def w8a8_spec(**kw):
    return spec(**{"scheme": "fp8_rowwise", "group_size": None, "act_input": "dynamic", **kw})


def test_w8a8_device_reasons(monkeypatch):
    k = CB.CudaW8A8()
    ok, why = k.is_supported(CPU)
    assert not ok and "need a CUDA GPU" in why
    ok, why = k.is_supported(R.DeviceInfo("cuda", (8, 0), "fake A100"))
    assert not ok and "sm89+" in why and "fp8 mma.sync" in why
    asked = []
    monkeypatch.setattr(cuda_build, "toolchain", lambda *a: asked.append(a) or (None, "nvcc 12.1 is older than 12.4"))
    ok, why = k.is_supported(H100)
    assert not ok and "nvcc 12.1 is older than 12.4" in why and asked == [((12, 4),)]
    monkeypatch.setattr(cuda_build, "toolchain", lambda *a: ("/usr/local/cuda/bin/nvcc", ""))
    assert k.is_supported(H100) == (True, "")


def test_w8a8_layer_limits_and_the_quantized_activation():
    k = CB.CudaW8A8()
    assert k.can_implement(w8a8_spec()) == (True, "")
    assert k.can_implement(w8a8_spec(act_input="static", act_dtype=torch.float8_e4m3fn, out_dtype=torch.float32))[0]
    ok, why = k.can_implement(w8a8_spec(k=4160))
    assert not ok and "chunks of 128" in why
    ok, why = k.can_implement(w8a8_spec(out_dtype=torch.int32))
    assert not ok and "writes bf16, fp16 or fp32" in why
    assert k.takes_quantized_activation(w8a8_spec())


def test_w8a8_fp8_block_limits():
    """fp8_block: up to 8 tokens (or a symbolic M) the kernel quantizes the 16-bit activation itself,
    writes its dtype, and leaves no quantization in the graph; above 8 the graph quantizes, and the
    kernel takes e4m3 bytes with their group scales."""
    k = CB.CudaW8A8()
    block = w8a8_spec(scheme="fp8_block")
    assert k.can_implement(block) == (True, "") and not k.takes_quantized_activation(block)
    assert [k.takes_quantized_activation(w8a8_spec(scheme="fp8_block", m=m)) for m in (1, 8, 9, 16)] == [False, False, True, True]
    ok, why = k.can_implement(w8a8_spec(scheme="fp8_block", act_dtype=torch.float32, out_dtype=torch.float32))
    assert not ok and "bf16 / fp16 activations" in why
    ok, why = k.can_implement(w8a8_spec(scheme="fp8_block", out_dtype=torch.float32))
    assert not ok and "writes the activation's dtype" in why
    assert k.can_implement(w8a8_spec(scheme="fp8_block", act_input="static", act_dtype=torch.float8_e4m3fn,
                                     out_dtype=torch.float32)) == (True, "")
    ok, why = k.can_implement(w8a8_spec(scheme="fp8_block", act_input="static", act_dtype=torch.int8))
    assert not ok and "fp8 e4m3" in why


@pytest.mark.parametrize("tokens,quantized", [(8, False), (16, True)])
def test_fp8_block_graph_quantizes_above_8_tokens(monkeypatch, tokens, quantized):
    """A compiled fp8_block q/k/v group on the cuda backend gets the 16-bit activation up to 8
    tokens, and above them the graph's e4m3 activation with its group scales, one quantization for
    the three layers (the kernel emulated by the reference)."""
    from ..helpers import random_activation
    from ..test_graph_pass import Siblings

    monkeypatch.setattr(cuda_build, "toolchain", lambda *a: ("/usr/local/cuda/bin/nvcc", ""))
    monkeypatch.setattr(R.DeviceInfo, "of", classmethod(lambda cls, d=None: H100))
    seen = []

    def run_group(self, specs, x, params, biases):
        seen.append((len(specs), specs[0].act_input, x.dtype))
        if specs[0].act_input == "static":
            return [S.reference("fp8_block", x, p[:2], b, input_scale=p[-1].reshape(x.shape[0], -1), out_dtype=s.out_dtype)
                    for s, p, b in zip(specs, params, biases)]
        return [S.reference("fp8_block", x, p, b, out_dtype=s.out_dtype) for s, p, b in zip(specs, params, biases)]

    monkeypatch.setattr(CB.CudaW8A8, "run_group", run_group)
    monkeypatch.setattr(CB.CudaW8A8, "run", lambda self, s, x, p, b: run_group(self, [s], x, [p], [b])[0])
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = qp.quantize(Siblings().to(torch.bfloat16), "fp8_block")
    x = random_activation((1, tokens, 256))
    with torch.no_grad():
        y = torch.compile(model, backend=qp.make(linear_backend="cuda", inductor=False))(x)
        ref = model(x)
    torch._dynamo.reset()
    want = ("static", torch.float8_e4m3fn) if quantized else ("dynamic", torch.bfloat16)
    assert (3, *want) in seen and (1, *want) in seen  # q/k/v as one group, and o
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]


def test_w8a8_quantizes_a_float_activation_itself():
    """Outside a graph that quantizes (act_input "dynamic"), the kernel gets what the reference
    quantization makes; with "static" it takes the activation and the last parameter as they are."""
    k = CB.CudaW8A8()
    x = torch.randn(2, 256)
    xq, sx = k._quantized(w8a8_spec(k=256), x, [None, None])
    ref_q, ref_s = S.quantize_activation("fp8_rowwise", x)
    assert torch.equal(xq.float(), ref_q.float()) and torch.equal(sx, ref_s)
    given = torch.ones(2, 1)
    assert k._quantized(w8a8_spec(k=256, act_input="static"), ref_q, [None, None, given]) == (ref_q, given)


@pytest.mark.gpu
def test_gpu_compiled_w8a8_siblings_run_in_one_call():
    """fp8_rowwise q/k/v: the graph quantizes the activation once and one cuda_w8a8 call runs all
    three.  Against the Triton backend, given the same quantized activation by the same graph, it
    may differ only by accumulation order and output rounding; against the eager modules also by
    activation values that the graph's quantization rounds to the neighbouring fp8 level."""
    from qlinear_pass.kernels import ops

    from ..test_graph_pass import Siblings

    ok, why = CB.CudaW8A8().is_supported(R.DeviceInfo.of("cuda"))
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    model = qp.quantize(Siblings(k=512, ns=(512, 128, 128)).to(torch.bfloat16), "fp8_rowwise").cuda()
    for m in (1, 8):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        before = ops.CALLS["cuda_w8a8"]
        with torch.no_grad():
            y = torch.compile(model, backend=qp.make(linear_backend="cuda"))(x)
            torch._dynamo.reset()
            y_triton = torch.compile(model, backend=qp.make(linear_backend="triton"))(x)
            torch._dynamo.reset()
            ref = model(x)
        assert ops.CALLS["cuda_w8a8"] > before
        assert S.relative_error(y, y_triton) < 5e-3
        assert S.relative_error(y, ref) < 2 * S.TOLERANCE[torch.bfloat16]


def w8a16_spec(**kw):
    return spec(**{"scheme": "int8_weight_only", "group_size": None, **kw})


def test_w8a16_device_and_layer_limits(monkeypatch):
    k = CB.CudaW8A16()
    ok, why = k.is_supported(CPU)
    assert not ok and "need a CUDA GPU" in why
    ok, why = k.is_supported(T4)
    assert not ok and "sm80+" in why
    monkeypatch.setattr(cuda_build, "toolchain", lambda *a: ("/usr/local/cuda/bin/nvcc", ""))
    assert k.is_supported(R.DeviceInfo("cuda", (8, 0), "fake A100")) == (True, "")
    assert k.can_implement(w8a16_spec()) == (True, "")
    assert k.can_implement(w8a16_spec(scheme="fp8_weight_only", act_dtype=torch.float16, out_dtype=torch.float16))[0]
    ok, why = k.can_implement(w8a16_spec(act_dtype=torch.float32, out_dtype=torch.float32))
    assert not ok and "bf16 / fp16 activations" in why
    ok, why = k.can_implement(w8a16_spec(out_dtype=torch.float32))
    assert not ok and "writes the activation's dtype" in why
    ok, why = k.can_implement(w8a16_spec(k=4160))
    assert not ok and "chunks of 128" in why
    assert not k.takes_quantized_activation(w8a16_spec())


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,kernel", [("int8_weight_only", "cuda_w8a16"), ("fp8_weight_only", "cuda_w8a16"),
                                           ("fp8_block", "cuda_w8a8")])
def test_gpu_compiled_16bit_activation_layers_run_on_their_kernel(scheme, kernel):
    """A compiled int8 / fp8 weight-only or fp8_block model runs its layers (q/k/v as a group) on our
    CUDA kernel at M = 1, 8 and 16 (fp8_block there given the graph's quantized activation), and
    matches the eager modules."""
    from qlinear_pass.kernels import ops

    from ..test_graph_pass import Siblings

    ok, why = R.get_kernel(kernel).is_supported(R.DeviceInfo.of("cuda"))
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    model = qp.quantize(Siblings(k=512, ns=(512, 128, 128)).to(torch.bfloat16), scheme).cuda()
    for m in (1, 8, 16):  # fp8_block: quantized in the graph at 16
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        before = ops.CALLS[kernel]
        with torch.no_grad():
            y = torch.compile(model, backend=qp.make(linear_backend="cuda"))(x)
            ref = model(x)
        assert ops.CALLS[kernel] > before
        assert S.relative_error(y, ref) < 2 * S.TOLERANCE[torch.bfloat16]
        torch._dynamo.reset()


#: a scheme, its kernel on the cuda backend, and whether that kernel makes its activation (a prologue)
FUSING = [("w4a16", CB.CudaW4A16, True), ("int8_weight_only", CB.CudaW8A16, True), ("fp8_weight_only", CB.CudaW8A16, True),
          ("fp8_block", CB.CudaW8A8, True), ("fp8_rowwise", CB.CudaW8A8, False)]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,kernel,prologue", FUSING)
@pytest.mark.parametrize("m", [1, 8])
def test_gpu_compiled_block_runs_norms_swiglu_and_residuals_in_the_kernel(m, scheme, kernel, prologue):
    """A Llama block on the cuda backend: at one token the RMSNorms, the SwiGLU and the residual adds
    run in the launches of a kernel that loads a 16-bit activation (tests/test_fusion.py has the same
    on the CPU with a test kernel); at 8 tokens, or where the graph quantizes the activation
    (fp8_rowwise), the residual adds only.  The outputs match the eager modules either way."""
    from ..helpers import recorded
    from ..test_fusion import Block

    ok, why = kernel().is_supported(R.DeviceInfo.of("cuda"))
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    kw = dict(group_size=128, weight_layout="mma16") if scheme == "w4a16" else {}
    model = qp.quantize(Block(hidden=1024, intermediate=2048).to(torch.bfloat16), scheme, **kw).cuda()
    # [batch, tokens, hidden] as Hugging Face models run: with 2-D activations, torch 2.11's Inductor
    # folds the reference's rounding of gate/up's output into the SwiGLU's widening (its
    # pointless_convert), leaving fp32 outputs that the kernels do not write
    x = torch.randn(1, m, 1024, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad(), recorded() as recs:
        y = torch.compile(model, backend=qp.make(linear_backend="cuda"), dynamic=False)(x)
        ref = model(x)
    torch._dynamo.reset()
    notes = {d.spec.module: d.note for r in recs for d in r.decisions}
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]
    assert {d.kernel for r in recs for d in r.decisions} == {kernel.name}
    assert "the residual add after it runs in the kernel" in notes["o_proj"]
    if m == 1 and prologue:
        assert "the RMSNorm before it runs in the kernel" in notes["q_proj"] and "RMSNorm" in notes["gate_proj"]
        assert "the SwiGLU before it and the residual add after it run in the kernel" in notes["down_proj"]
    else:
        if prologue:
            assert f"rmsnorm before it stays in the graph ({kernel.name}: runs rmsnorm before the linear with one token" \
                in notes["q_proj"]
        assert "the residual add after it runs in the kernel" in notes["down_proj"]
