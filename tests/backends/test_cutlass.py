"""CUTLASS backend: reasons, limits and errors everywhere; the Python glue against the reference on
CPU (the extension emulated in torch); the real kernels against the reference on a Hopper GPU."""
import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qlinear_pass as qp
from qlinear_pass import registry as R
from qlinear_pass import schemes as S
from qlinear_pass.backends import cutlass as CU
from qlinear_pass.kernels import cutlass_build as B

# imported here, not inside a test: importing a test module inside a running @given trips
# hypothesis's nested-@given check
from ..test_graph_pass import Siblings
from .test_triton import run_direct

H100 = R.DeviceInfo("cuda", (9, 0), "fake H100")
B200 = R.DeviceInfo("cuda", (10, 0), "fake B200")
CPU = R.DeviceInfo("cpu")
KERNELS = {"fp8_tensor": "cutlass_fp8", "fp8_rowwise": "cutlass_fp8", "int8_rowwise": "cutlass_int8",
           "fp8_block": "cutlass_fp8_block"}  # the W8A8 families; w4a16 has its own tests below


def spec(scheme="fp8_rowwise", **kw):
    base = dict(scheme=scheme, n=4096, k=4096, act_dtype=torch.bfloat16, out_dtype=torch.bfloat16, device="cuda",
                act_input="dynamic", module="layers.0.mlp.down_proj")
    base.update(kw)
    return R.LayerSpec(**base)


WEIGHT_ONLY = {"w4a16": "cutlass_w4a16", "int8_weight_only": "cutlass_int8_weight_only",
               "fp8_weight_only": "cutlass_fp8_weight_only"}


def test_one_kernel_per_family_covers_every_scheme():
    for scheme, name in {**KERNELS, **WEIGHT_ONLY}.items():
        assert [k.name for k in R.candidates(scheme, H100) if k.backend == "cutlass"] == [name]


def test_device_reasons():
    k = CU.CutlassFp8()
    ok, why = k.is_supported(CPU)
    assert not ok and "CUDA GPU" in why
    ok, why = k.is_supported(B200)
    assert not ok and "sm90a" in why and "sm100" in why


def _with_toolchain(mp: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """``mp`` patching in a machine where everything the build needs is present."""
    # imported first: it binds cutlass_build's nvcc by name, and must not bind the stand-in below
    from qlinear_pass.kernels import cuda_build  # our own CUDA kernels' nvcc, too

    mp.setattr(torch.version, "cuda", "13.0")
    mp.setattr(B, "nvcc", lambda: ("/opt/cuda/bin/nvcc", (13, 0), ""))
    mp.setattr(B, "cutlass_include", lambda: ("/opt/cutlass/include", ""))
    mp.setattr(B, "ninja_available", lambda: True)
    mp.setattr(cuda_build, "toolchain", lambda *a: ("/opt/cuda/bin/nvcc", ""))
    return mp


@pytest.fixture
def toolchain_ok(monkeypatch):
    """A machine where everything the build needs is present (each test then takes one thing away)."""
    return _with_toolchain(monkeypatch)


def test_toolchain_reasons(toolchain_ok):
    k = CU.CutlassInt8()
    assert k.is_supported(H100) == (True, "")
    toolchain_ok.setattr(torch.version, "cuda", "12.8")
    ok, why = k.is_supported(H100)
    assert not ok and "nvcc 13.0" in why and "CUDA 12.8" in why
    toolchain_ok.setattr(torch.version, "cuda", None)
    ok, why = k.is_supported(H100)
    assert not ok and "without CUDA" in why


def test_missing_tools_reasons(toolchain_ok):
    k = CU.CutlassFp8Block()
    toolchain_ok.setattr(B, "ninja_available", lambda: False)
    assert "pip install ninja" in k.is_supported(H100)[1]
    toolchain_ok.setattr(B, "cutlass_include", lambda: (None, "the CUTLASS headers are not installed (pip install nvidia-cutlass, ...)"))
    assert "nvidia-cutlass" in k.is_supported(H100)[1]
    toolchain_ok.setattr(B, "nvcc", lambda: (None, (12, 1), "nvcc 12.1 at /x/nvcc is too old for sm90a CUTLASS kernels"))
    assert "too old" in k.is_supported(H100)[1]


def test_nvcc_version_is_read_and_checked(monkeypatch, tmp_path):
    for release, ok in (("12.1", False), ("12.4", True), ("13.0", True)):
        home = tmp_path / release
        (home / "bin").mkdir(parents=True)
        (home / "include").mkdir()
        (home / "include" / "cuda_runtime.h").write_text("")
        nvcc = home / "bin" / "nvcc"
        nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
        nvcc.chmod(0o755)
        monkeypatch.setenv("CUDA_HOME", str(home))  # looked up first, as torch.utils.cpp_extension does
        B.nvcc.cache_clear()
        path, version, why = B.nvcc()
        assert version == tuple(map(int, release.split(".")))
        assert (path is not None) == ok, why
        if not ok:
            assert "too old" in why and "12.3" in why
    B.nvcc.cache_clear()


def test_headers_missing_or_found(monkeypatch, tmp_path):
    monkeypatch.setenv("QLINEAR_PASS_CUTLASS_DIR", str(tmp_path))
    inc, why = B.cutlass_include()
    assert inc is None and "QLINEAR_PASS_CUTLASS_DIR" in why and "blockwise" in why
    for f in ("cute/tensor.hpp", "cutlass/gemm/collective/collective_builder.hpp",
              "cutlass/gemm/collective/sm90_mma_tma_gmma_ss_warpspecialized_fp8_blockwise_scaling.hpp"):
        (tmp_path / "include" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "include" / f).write_text("")
    assert B.cutlass_include() == (tmp_path / "include", "")


def test_alignment_and_dtype_limits():
    k = CU.CutlassFp8()
    assert k.can_implement(spec(n=4104, k=4112)) == (True, "")
    ok, why = k.can_implement(spec(k=4100))
    assert not ok and "K divisible by 16" in why
    ok, why = k.can_implement(spec(n=4100))
    assert not ok and "N divisible by 8" in why
    ok, why = k.can_implement(spec(out_dtype=torch.float32))
    assert not ok and "bfloat16 or float16" in why
    ok, why = CU.CutlassFp8Block().can_implement(spec("fp8_block", k=4112))
    assert not ok and "128-wide" in why
    assert CU.CutlassInt8().can_implement(spec("int8_rowwise", out_dtype=torch.float16)) == (True, "")


def test_explicit_cutlass_without_hopper_is_an_error_naming_why():
    with pytest.raises(qp.NoKernelError) as e:
        R.select(spec("int8_rowwise"), qp.LinearBackendConfig("cutlass"), B200)
    msg = str(e.value)
    assert "layers.0.mlp.down_proj" in msg and "cutlass_int8" in msg and "sm90a" in msg and "Fixes" in msg
    with pytest.raises(qp.NoKernelError) as e:
        R.select(spec("w4a16", group_size=32, act_input="none"), qp.LinearBackendConfig("cutlass"), H100)
    assert "cutlass_w4a16" in str(e.value)  # named, with why it cannot run


def test_compile_on_cpu_raises_before_running():
    from ..helpers import linear_model, random_activation

    m = linear_model(256, 64, "fp8_block")
    with pytest.raises(qp.NoKernelError, match="cutlass_fp8_block: the CUTLASS kernels need a CUDA GPU"):
        torch.compile(m, backend=qp.make(linear_backend="cutlass", inductor=False))(random_activation((4, 256)))


def test_fallback_to_auto_warns(toolchain_ok):
    cfg = qp.LinearBackendConfig("cutlass", on_unsupported="fallback")
    with pytest.warns(UserWarning, match="falling back to auto"):
        sel = R.select(spec("fp8_rowwise", n=4100, module="fallback.case"), cfg, H100)
    assert sel.fallback and sel.kernel.backend != "cutlass"


def _auto_winners(scheme):
    return {b: R._first_fit(spec(scheme, m=b or 8192), H100, "auto", b)[0].name for b in R.M_BUCKETS}


def test_auto_on_hopper_ranks_cutlass_by_m(toolchain_ok):
    """Where the benchmarks put it (benchmarks/results/h100/cutlass and h100/decode/cuda_w8a8; the
    sm90 rows of ranking.py): our CUDA decode kernel up to M = 16, CUTLASS above."""
    cutlass_from_128 = {1: "cuda_w8a8", 16: "cuda_w8a8", 128: "cutlass_fp8", 1024: "cutlass_fp8", None: "cutlass_fp8"}
    assert _auto_winners("fp8_rowwise") == cutlass_from_128
    assert _auto_winners("fp8_tensor") == cutlass_from_128
    assert _auto_winners("int8_rowwise") == {**cutlass_from_128, 128: "cutlass_int8", 1024: "cutlass_int8", None: "cutlass_int8"}
    block = _auto_winners("fp8_block")
    assert block[1] == block[16] == "cuda_w8a8"  # h100/decode/cuda_w8a8_fp8_block, h200/e2e/fp8_block_cuda_m1
    from qlinear_pass.backends import flashinfer as FI

    if FI._flashinfer() is not None:
        assert {block[b] for b in R.M_BUCKETS[2:]} == {"flashinfer_deepgemm_fp8_block"}
    toolchain_ok.setattr(FI, "_flashinfer", lambda: None)
    without = _auto_winners("fp8_block")
    assert [without[b] for b in R.M_BUCKETS] == ["cuda_w8a8"] * 2 + ["cutlass_fp8_block"] * 3


def test_auto_plan_runs_the_cuda_decode_kernel_to_m16_and_cutlass_above(toolchain_ok):
    sel = R.select(spec("fp8_rowwise", m=None), qp.LinearBackendConfig(), H100)
    assert sel.kernel_name == "cuda_w8a8@16;cutlass_fp8"
    sel = R.select(spec("int8_rowwise", m=None), qp.LinearBackendConfig(), H100)
    assert sel.kernel_name == "cuda_w8a8@16;cutlass_int8"


def test_auto_without_our_nvcc_runs_triton_at_m1_and_cutlass_int8_at_every_m(toolchain_ok):
    from qlinear_pass.kernels import cuda_build

    toolchain_ok.setattr(cuda_build, "toolchain", lambda *a: (None, "nvcc was not found"))
    assert R.select(spec("fp8_rowwise", m=None), qp.LinearBackendConfig(), H100).kernel_name == "triton_w8a8@1;cutlass_fp8"
    sel = R.select(spec("int8_rowwise", m=None), qp.LinearBackendConfig(), H100)
    assert sel.kernel.name == "cutlass_int8" and not sel.plan


def test_auto_elsewhere_never_picks_cutlass():
    for device in (CPU, B200):
        for scheme in KERNELS:
            assert "cutlass" not in R.select(spec(scheme, m=None, device=device.type), qp.LinearBackendConfig(), device).kernel_name


# --- the Python glue, with the extension emulated -----------------------------------------------


def cuh_configs() -> dict:
    """{family: [tile configuration names, by index]} as qlp_gemm.cuh lists them."""
    text = (B.SOURCE_DIR / "qlp_gemm.cuh").read_text()
    out = {}
    for family, struct in (("fp8", "Fp8Configs"), ("int8", "Int8Configs"), ("fp8_block", "Fp8BlockConfigs"),
                           ("w4a16", "W4A16Configs"), ("int8_wo", "W8A16Configs"), ("fp8_wo", "W8A16Configs")):
        body = text.split(f"struct {struct} {{", 1)[1].split("};\n\n", 1)[0] + "};"
        names = re.findall(r'static constexpr const char\* name = "([^"]+)";', body)
        listed = re.search(r"using List = ConfigList<([^>]*)>;", body).group(1)
        assert [c.strip() for c in listed.split(",")] == [f"C{i}" for i in range(len(names))], family
        out[family] = names
    return out


def test_tile_config_names_configurations_the_sources_build():
    configs = cuh_configs()
    assert set(configs) == set(B.FAMILIES)
    for family, names in configs.items():
        assert len(names) == len(set(names)) >= 2, family
        picked = {CU.tile_config(family, m, n, k) for m in (1, 16, 64, 65, 128, 129, 1024, 4096, 65536)
                  for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (128, 8), (8192, 64))}
        assert picked <= set(names), (family, picked - set(names))
    with pytest.raises(ValueError, match="unknown CUTLASS kernel family"):
        CU.tile_config("fp4", 1, 8, 16)


@pytest.mark.parametrize("family", ["w4a16", "int8_wo", "fp8_wo"])
@pytest.mark.parametrize("m, n, k, want", [
    (1024, 14336, 4096, "128x256x64 cooperative stream-K"),  # 448 tiles: the 4th wave 39% full
    (1024, 6144, 4096, "128x256x64 cooperative stream-K"),   # 192 tiles: the 2nd wave 45% full
    (1024, 4096, 14336, "128x256x64 cooperative"),           # 128 tiles: one wave, 97% full
    (4096, 14336, 4096, "128x256x64 cooperative"),
    (4096, 4096, 14336, "128x256x64 cooperative"),
    (128, 6144, 4096, "64x128x64 pingpong"),                 # 48 tiles of 128 x 128
    (128, 4096, 14336, "128x128x64 cooperative stream-K"),   # 32 tiles, but a long K to split
    (128, 14336, 4096, "128x128x64 cooperative stream-K"),   # 112 tiles
    (128, 1024, 4096, "128x128x64 cooperative stream-K"),    # 8 tiles: pingpong's rule not measured there
])
def test_weight_only_prefill_tiles_follow_the_waves(family, m, n, k, want):
    assert CU.tile_config(family, m, n, k) == want


@pytest.mark.parametrize("m, group, want", [
    (17, 128, "128x32x128 cooperative stream-K"),
    (32, 256, "128x32x128 cooperative stream-K"),
    (33, 128, "128x64x128 cooperative stream-K"),
    (64, 128, "128x64x128 cooperative stream-K"),
    (32, 64, "128x32x64 cooperative stream-K"),   # K 128 tiles need groups of a multiple of 128
    (64, 64, "128x64x64 cooperative stream-K"),
    (128, 128, "128x128x64 cooperative stream-K"),
])
def test_w4a16_small_m_tiles_follow_tokens_and_group(m, group, want):
    assert CU.tile_config("w4a16", m, 14336, 4096, group) == want
    assert want in cuh_configs()["w4a16"]


@pytest.mark.parametrize("family", ["int8_wo", "fp8_wo"])
def test_8bit_weight_only_small_m_tiles_take_k128(family):
    assert CU.tile_config(family, 16, 6144, 4096) == "128x32x128 cooperative stream-K"
    assert CU.tile_config(family, 32, 4096, 14336) == "128x32x128 cooperative stream-K"
    assert CU.tile_config(family, 64, 6144, 4096) == "128x64x128 cooperative stream-K"
    assert CU.tile_config(family, 65, 6144, 4096) == "64x128x64 pingpong"


@pytest.mark.parametrize("group, want", [(128, "128x32x128 cooperative stream-K"), (64, "128x32x64 cooperative stream-K")])
def test_w4a16_kernel_runs_the_tiles_of_its_group(monkeypatch, group, want):
    kernel = R.get_kernel("cutlass_w4a16")
    ran = []

    class Recording(_FakeModule):
        def gemm(self, *args):
            ran.append(self.configs()[args[-1]])
            return super().gemm(*args)

    monkeypatch.setattr(type(kernel), "module", lambda self: Recording(self.family))
    monkeypatch.setattr(CU, "_CONFIG_INDICES", {})
    run_direct("w4a16", 32, 256, 512, act_input="none", group_size=group, kernel="cutlass_w4a16")
    assert ran == [want]


def test_a_configuration_the_build_lacks_is_named(monkeypatch):
    kernel = R.get_kernel("cutlass_int8")
    monkeypatch.setattr(type(kernel), "module", lambda self: _FakeModule(self.family))
    monkeypatch.setattr(CU, "_CONFIG_INDICES", {})
    assert kernel.config_index(1, 4096, 4096) == cuh_configs()["int8"].index(CU.tile_config("int8", 1, 4096, 4096))
    with pytest.raises(RuntimeError, match="has no tile configuration '1x1x1'.*64x128x256 c1x8"):
        kernel.config_index(1, 4096, 4096, "1x1x1")


class _FakeModule:
    """The extension's gemm() as the C++ computes it (same checks on sizes and layouts), in torch."""

    def __init__(self, family):
        self.family = family

    def configs(self):
        return cuh_configs()[self.family]

    def gemm(self, *args, **kwargs):
        run = {"w4a16": self._w4a16, "int8_wo": self._wo8, "fp8_wo": self._wo8}.get(self.family, self._w8a8)
        return run(*args, **kwargs)

    def _wo8(self, x, w, scale, bias, out, config):
        m, k = x.shape
        n = w.shape[0]
        assert 0 <= config < len(self.configs())
        assert w.dtype == {"int8_wo": torch.int8, "fp8_wo": torch.float8_e4m3fn}[self.family] and w.shape == (n, k)
        assert x.is_contiguous() and w.is_contiguous() and scale.dtype == torch.float32 and scale.shape == (n,)
        assert out.shape == (m, n) and out.dtype == x.dtype
        y = (x.float() @ w.float().t()) * scale
        if bias is not None:
            assert bias.dtype == out.dtype and bias.shape == (n,)
            y = y + bias.float()
        out.copy_(y)
        return out

    def _w4a16(self, x, w, scale, zero, group_size, bias, out, config):
        from qlinear_pass.kernels import int4_layout

        m, k = x.shape
        n = 16 * w.shape[0]
        assert 0 <= config < len(self.configs())
        tile_k = int(self.configs()[config].split()[0].split("x")[2])
        assert group_size % tile_k == 0, "CUTLASS's mixed-input mainloop needs groups of a multiple of its K tile"
        assert x.is_contiguous() and w.is_contiguous() and int4_layout.shape_of(w) == (n, k)  # MMA-fragment layout
        w = int4_layout.from_mma16(w)
        # MN-major group scales and folded zero points in x's dtype: q * scale + zero
        assert scale.dtype == zero.dtype == x.dtype and scale.shape == zero.shape == (k // group_size, n)
        assert scale.is_contiguous() and zero.is_contiguous()
        assert out.shape == (m, n) and out.dtype == x.dtype
        q = torch.stack([w & 0xF, w >> 4], dim=-1).reshape(n, k).float()
        wd = q * scale.float().t().repeat_interleave(group_size, 1) + zero.float().t().repeat_interleave(group_size, 1)
        y = x.float() @ wd.to(x.dtype).float().t()
        if bias is not None:
            assert bias.dtype == out.dtype and bias.shape == (n,)
            y = y + bias.float()
        out.copy_(y)
        return out

    def _w8a8(self, a, b, scale_a, scale_b, bias, out, config):
        m, k = a.shape
        n = b.shape[0]
        assert 0 <= config < len(self.configs())
        assert a.is_contiguous() and b.is_contiguous() and scale_a.dtype == scale_b.dtype == torch.float32
        assert scale_a.is_contiguous() and scale_b.is_contiguous()
        assert out.shape == (m, n) and out.dtype in (torch.bfloat16, torch.float16)
        assert bias is None or (bias.dtype == out.dtype and bias.shape == (n,))
        if self.family == "fp8_block":
            # MN-major activation scales, rows padded to a multiple of 4
            assert scale_a.shape == (k // 128, -(-m // 4) * 4) and scale_b.numel() == -(-n // 128) * (k // 128)
            xd = S.dequantize_activation("fp8_block", a, scale_a[:, :m].t())
            wd = S.dequantize_weight("fp8_block", [b, scale_b.view(-1, k // 128)], k)
            y = xd @ wd.t()
        else:
            assert scale_a.numel() in (1, m) and scale_b.numel() in (1, n)
            y = (a.float() @ b.float().t()) * scale_a.view(-1, 1) * scale_b.view(1, -1)
        if bias is not None:
            y = y + bias.float()
        out.copy_(y)
        return out


@pytest.mark.parametrize("scheme", list(KERNELS))
@pytest.mark.parametrize("act_input", ["dynamic", "static"])
@pytest.mark.parametrize("m,dtype", [(1, torch.bfloat16), (5, torch.float16), (33, torch.bfloat16)])
def test_glue_against_reference_with_the_extension_emulated(monkeypatch, scheme, act_input, m, dtype):
    kernel = R.get_kernel(KERNELS[scheme])
    monkeypatch.setattr(type(kernel), "module", lambda self: _FakeModule(self.family))
    g = torch.Generator().manual_seed(m)
    n, k = 136, 384
    p = S.quantize_weight(scheme, torch.randn(n, k, generator=g) * 0.05)
    params = [p["weight"], p["weight_scale"]]
    x = (torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-3, 4, (m, k // 128), generator=g).float()).repeat_interleave(128, 1)).to(dtype)
    bias = torch.randn(n, generator=g, dtype=torch.float32)  # a float32 bias: the glue casts it
    s = R.LayerSpec(scheme, n, k, dtype, dtype, has_bias=True, act_input=act_input)
    if act_input == "static":
        xq, xs = S.quantize_activation(scheme, x)
        ref = S.reference(scheme, xq, params, bias, input_scale=xs, out_dtype=dtype)
        x, params = xq, params + [xs]
    else:
        ref = S.reference(scheme, x, params, bias).to(dtype)
    y = kernel.run(s, x, params, bias)
    assert y.dtype == dtype and S.relative_error(y, ref) < S.TOLERANCE[dtype]


def test_the_pass_keeps_the_quantization_in_the_graph(toolchain_ok):
    """Under an explicit cutlass backend the op receives the graph's quantized activation."""
    from qlinear_pass.kernels import ops

    from ..helpers import linear_model, random_activation

    seen = []
    kernel = R.get_kernel("cutlass_fp8")
    toolchain_ok.setattr(type(kernel), "module", lambda self: _FakeModule(self.family))
    toolchain_ok.setattr(R.DeviceInfo, "of", classmethod(lambda cls, d=None: H100))
    orig = CU.CutlassFp8.run

    def spy(self, spec_, x, params, bias):
        seen.append((spec_.act_input, x.dtype))
        return orig(self, spec_, x, params, bias)

    toolchain_ok.setattr(CU.CutlassFp8, "run", spy)
    m = linear_model(256, 64, "fp8_rowwise", bias=True)
    x = random_activation((3, 256))
    before = ops.CALLS["cutlass_fp8"]
    with torch.no_grad():
        y = torch.compile(m, backend=qp.make(linear_backend="cutlass", inductor=False))(x)
    assert ops.CALLS["cutlass_fp8"] == before + 1
    assert seen == [("static", torch.float8_e4m3fn)]
    ref = S.reference("fp8_rowwise", x, m[0].params, m[0].bias)
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]


# --- on a Hopper GPU --------------------------------------------------------------------------


def _hopper_or_skip(name):
    ok, why = R.get_kernel(name).is_supported(R.DeviceInfo.of("cuda"))
    if not ok:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", list(KERNELS))
@given(m=st.integers(1, 4096), n8=st.integers(1, 64), k16=st.integers(1, 48),
       act_input=st.sampled_from(["dynamic", "static"]), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       bias=st.booleans(), seed=st.integers(0, 99))
def test_gpu_against_reference(scheme, m, n8, k16, act_input, dtype, bias, seed):
    """M 1..4096, N any multiple of 8, K any multiple of 16 (of 128 for fp8_block)."""
    _hopper_or_skip(KERNELS[scheme])
    k = k16 * 128 if scheme == "fp8_block" else k16 * 16 * 7
    run_direct(scheme, m, n8 * 8 * 3, min(k, 8192), act_input=act_input, dtype=dtype, bias=bias, seed=seed,
               device="cuda", poison=True, kernel=KERNELS[scheme])


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8_rowwise", "int8_rowwise", "fp8_block"])
def test_gpu_every_tile_configuration(scheme):
    """Every configuration the family builds, whichever M tile_config would give it: decode and
    prefill M (odd ones too), a long K with few output tiles and a small layer."""
    _hopper_or_skip(KERNELS[scheme])
    kernel = R.get_kernel(KERNELS[scheme])
    names = list(kernel.module().configs())
    assert names == cuh_configs()[kernel.family]
    for name in names:
        for m, n, k in ((1, 4096, 4096), (37, 1536, 2048), (130, 2048, 14336), (1027, 1024, 4096), (4096, 384, 640)):
            k = -(-k // 128) * 128 if scheme == "fp8_block" else k
            for act_input in ("dynamic", "static"):
                run_direct(scheme, m, n, k, act_input=act_input, device="cuda", poison=True, kernel=KERNELS[scheme],
                           seed=m, bias=m % 2 == 1, config=name)


@pytest.mark.gpu
def test_gpu_compiled_model_with_inductor():
    """The whole route: Inductor fuses the quantization, the op runs the CUTLASS GEMM."""
    from qlinear_pass.kernels import ops

    from ..helpers import linear_model, random_activation

    _hopper_or_skip("cutlass_fp8")
    for scheme in KERNELS:
        m = linear_model(1024, 512, scheme, bias=True).cuda()
        x = random_activation((2, 37, 1024)).cuda()
        name = KERNELS[scheme]
        before = ops.CALLS[name]
        with torch.no_grad():
            with qp.linear_backend("cutlass"):
                y = torch.compile(m, backend=qp.make())(x)
            ref = S.reference(scheme, x, m[0].params, m[0].bias)
        assert ops.CALLS[name] == before + 1
        assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16], scheme
        torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [8, 37])
def test_gpu_fp8_block_graph_writes_the_scales_mn_major(monkeypatch, tokens):
    """With M fixed, the compiled graph writes the activation scales in the layout the GEMM loads,
    and the op hands that buffer on without a copy (M = 37: the padded rows too)."""
    from ..helpers import linear_model, random_activation

    _hopper_or_skip("cutlass_fp8_block")
    real = CU.mn_major_scales
    shared = []

    def spy(scale):
        out = real(scale)
        shared.append(out.untyped_storage().data_ptr() == scale.untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(CU, "mn_major_scales", spy)
    m = linear_model(1024, 512, "fp8_block", bias=True).cuda()
    x = random_activation((tokens, 1024)).cuda()
    with torch.no_grad():
        with qp.linear_backend("cutlass"):
            y = torch.compile(m, backend=qp.make(), dynamic=False)(x)
        ref = S.reference("fp8_block", x, m[0].params, m[0].bias)
    torch._dynamo.reset()
    assert shared == [True]
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8_rowwise", "fp8_block"])
def test_gpu_compiled_siblings_share_one_quantization(monkeypatch, scheme):
    """Under Inductor, q/k/v's GEMMs read one quantized activation (fp8_block: one MN-major scale
    buffer too), and every output matches the eager modules."""
    from ..helpers import random_activation

    _hopper_or_skip(KERNELS[scheme])
    inputs = []
    orig = CU._CutlassKernel.run

    def spy(self, spec_, x, params, bias, config=None):
        inputs.append((spec_.n, x.untyped_storage().data_ptr(), params[-1].untyped_storage().data_ptr()))
        return orig(self, spec_, x, params, bias, config)

    monkeypatch.setattr(CU._CutlassKernel, "run", spy)
    torch.manual_seed(0)
    model = qp.quantize(Siblings(k=512, ns=(512, 256, 256)).to(torch.bfloat16), scheme).cuda()
    x = random_activation((1, 37, 512)).cuda()
    with torch.no_grad():
        with qp.linear_backend("cutlass"):
            y = torch.compile(model, backend=qp.make(), dynamic=False)(x)
        ref = model(x)
    torch._dynamo.reset()
    assert S.relative_error(y, ref) < 2 * S.TOLERANCE[torch.bfloat16]
    qkv = [i for i in inputs if i[0] in (512, 256)]
    assert len(qkv) == 3 and len({i[1] for i in qkv}) == 1 and len({i[2] for i in qkv}) == 1, inputs


@pytest.mark.gpu
def test_gpu_binding_rejects_bad_input():
    _hopper_or_skip("cutlass_fp8")
    mod = R.get_kernel("cutlass_fp8").module()
    a = torch.zeros(4, 64, device="cuda", dtype=torch.float8_e4m3fn)
    b = torch.zeros(32, 64, device="cuda", dtype=torch.float8_e4m3fn)
    one = torch.ones(1, device="cuda")
    out = torch.empty(4, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="b must be 2-D"):
        mod.gemm(a, b[0], one, one, None, out, 0)
    with pytest.raises(RuntimeError, match="scale_a has 3 values, expected 4"):
        mod.gemm(a, b, torch.ones(3, device="cuda"), one, None, out, 0)
    with pytest.raises(RuntimeError, match="K % 16 == 0"):
        mod.gemm(a[:, :40].contiguous(), b[:, :40].contiguous(), one, one, None, out, 0)
    with pytest.raises(RuntimeError, match="out must be bfloat16 or float16"):
        mod.gemm(a, b, one, one, None, out.float(), 0)
    with pytest.raises(RuntimeError, match="no tile configuration 99"):
        mod.gemm(a, b, one, one, None, out, 99)
    block = R.get_kernel("cutlass_fp8_block").module()
    a, b = torch.zeros(5, 256, device="cuda", dtype=torch.float8_e4m3fn), torch.zeros(32, 256, device="cuda", dtype=torch.float8_e4m3fn)
    sb, out = torch.ones(1, 2, device="cuda"), torch.empty(5, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"MN-major activation scales, \[K/128, M rounded up to a multiple of 4\] = \[2, 8\]"):
        block.gemm(a, b, torch.ones(5, 2, device="cuda"), sb, None, out, 0)  # row-major [M, K/128]
    assert block.gemm(a, b, torch.ones(2, 8, device="cuda"), sb, None, out, 0).abs().sum().item() == 0


# --- w4a16 ---------------------------------------------------------------------------------------


def w4a16_spec(**kw):
    return spec("w4a16", **{"group_size": 128, "act_input": "none", **kw})


def test_w4a16_limits_name_the_reason():
    kernel = R.get_kernel("cutlass_w4a16")
    assert kernel.can_implement(w4a16_spec()) == (True, "")
    assert kernel.can_implement(w4a16_spec(group_size=64, zero_points=True))[0]
    ok, why = kernel.can_implement(w4a16_spec(group_size=32))
    assert not ok and "groups of 64" in why and "groups of 32" in why
    ok, why = kernel.can_implement(w4a16_spec(act_dtype=torch.float32, out_dtype=torch.float32))
    assert not ok and "bf16 / fp16" in why
    ok, why = kernel.can_implement(w4a16_spec(out_dtype=torch.float32))
    assert not ok and "writes the activation's dtype" in why
    ok, why = kernel.can_implement(w4a16_spec(n=4104))
    assert not ok and "N and K divisible by 16" in why
    assert not kernel.takes_quantized_activation(w4a16_spec()) and kernel.opaque and kernel.runs_behind_op


@pytest.mark.parametrize("m,group,zp,dtype", [(1, 128, False, torch.bfloat16), (7, 64, True, torch.float16),
                                              (130, 128, True, torch.bfloat16)])
@pytest.mark.parametrize("layout", ["public", "mma16"])
def test_w4a16_glue_against_reference_with_the_extension_emulated(monkeypatch, m, group, zp, dtype, layout):
    """Scales transposed to MN-major in the activation dtype, zero points folded into -zero * scale
    (8 where the layer has none), the bias cast, the weight in the MMA-fragment layout (the layer's
    own, or a copy of a public one): what the extension is given computes the reference."""
    from qlinear_pass.kernels import int4_layout

    from ..helpers import kernel_case

    kernel = R.get_kernel("cutlass_w4a16")
    monkeypatch.setattr(type(kernel), "module", lambda self: _FakeModule(self.family))
    n, k = 144, 512
    x, params, bias, _, ref = kernel_case("w4a16", m, n, k, group_size=group, zero_points=zp, dtype=dtype, seed=m)
    if layout == "mma16":
        params = [int4_layout.to_mma16(params[0]), *params[1:]]
    s = R.LayerSpec("w4a16", n, k, dtype, dtype, has_bias=True, group_size=group, zero_points=zp, act_input="none",
                    weight_layout=layout)
    y = kernel.run(s, x, params, bias.float())
    assert y.dtype == dtype and S.relative_error(y, ref) < S.TOLERANCE[dtype]


def test_w4a16_group_params_are_made_once_and_remade_when_the_weights_change(monkeypatch):
    kernel = CU.CutlassW4A16()
    p = S.quantize_weight("w4a16", torch.randn(64, 256) * 0.05, group_size=128, zero_points=True)
    scale, zero = p["weight_scale"], p["weight_zero"]
    s1, z1 = kernel.group_params(scale, zero, torch.bfloat16)
    assert s1.shape == z1.shape == (2, 64) and s1.dtype == torch.bfloat16
    assert torch.equal(s1.float(), scale.t().to(torch.bfloat16).float())
    assert torch.equal(z1, (-zero.float() * scale).t().to(torch.bfloat16))
    assert kernel.group_params(scale, zero, torch.bfloat16)[0] is s1  # cached
    assert kernel.group_params(scale, zero, torch.float16)[0].dtype == torch.float16  # per dtype
    scale.mul_(2)  # an in-place update (a checkpoint loaded into the layer) makes them again
    s2, _ = kernel.group_params(scale, zero, torch.bfloat16)
    assert torch.equal(s2.float(), scale.t().to(torch.bfloat16).float())
    _, z_sym = kernel.group_params(scale, None, torch.bfloat16)  # no zero points: 8
    assert torch.equal(z_sym, (-8 * scale).t().to(torch.bfloat16))
    del scale, s1, s2, p
    import gc

    gc.collect()
    assert len(kernel._groups) == 0  # kept no longer than the layer's scale


@pytest.mark.gpu
@given(m=st.integers(1, 4096), n8=st.integers(1, 64), kg=st.integers(1, 32), group=st.sampled_from([64, 128]),
       zp=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.float16]), bias=st.booleans(),
       seed=st.integers(0, 99))
def test_gpu_w4a16_against_reference(m, n8, kg, group, zp, dtype, bias, seed):
    """M 1..4096, N any multiple of 16, K any multiple of the group (64 / 128), up to 8192."""
    _hopper_or_skip("cutlass_w4a16")
    k = min(kg * group, 8192 // group * group)
    run_direct("w4a16", m, n8 * 16 * 3, k, act_input="none", group_size=group, zero_points=zp, dtype=dtype,
               bias=bias, seed=seed, device="cuda", poison=True, kernel="cutlass_w4a16")


@pytest.mark.gpu
def test_gpu_w4a16_layers_holding_the_mma16_layout_run_without_a_copy():
    import warnings

    from qlinear_pass.kernels import int4_layout

    from ..helpers import random_activation
    from ..test_graph_pass import Siblings

    _hopper_or_skip("cutlass_w4a16")
    torch.manual_seed(0)
    model = qp.quantize(Siblings(k=512, ns=(512, 256, 256)).to(torch.bfloat16), "w4a16", weight_layout="mma16").cuda()
    x = random_activation((1, 37, 512)).cuda()
    before = int4_layout.copied_bytes()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with qp.linear_backend("cutlass"):
            y = torch.compile(model, backend=qp.make(), dynamic=False)(x)
    with torch.no_grad():
        ref = model(x)
    torch._dynamo.reset()
    assert S.relative_error(y, ref) < 2 * S.TOLERANCE[torch.bfloat16]
    assert int4_layout.copied_bytes() == before
    assert not [w for w in caught if str(w.message) == int4_layout.TWO_COPIES]


@pytest.mark.gpu
def test_gpu_w4a16_every_tile_configuration():
    _hopper_or_skip("cutlass_w4a16")
    kernel = R.get_kernel("cutlass_w4a16")
    names = list(kernel.module().configs())
    assert names == cuh_configs()["w4a16"]
    for name in names:
        for m, n, k in ((1, 4096, 4096), (37, 1536, 2048), (130, 2048, 14336), (1027, 1024, 4096), (4096, 384, 640)):
            run_direct("w4a16", m, n, k, act_input="none", group_size=128 if k % 128 == 0 else 64,
                       zero_points=m % 2 == 0, device="cuda", poison=True, kernel="cutlass_w4a16", seed=m,
                       bias=m % 2 == 1, config=name)


@pytest.mark.gpu
def test_gpu_w4a16_binding_rejects_bad_input():
    _hopper_or_skip("cutlass_w4a16")
    mod = R.get_kernel("cutlass_w4a16").module()
    x = torch.zeros(4, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(2, 16, 128, device="cuda", dtype=torch.uint8)  # [N/16, K/16, 128]: N 32, K 256
    s = torch.ones(2, 32, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(4, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="atoms of 16 rows x 16 k"):
        mod.gemm(x, w[:, :8].contiguous(), s, s, 128, None, out, 0)
    with pytest.raises(RuntimeError, match=r"uint8 \[N/16, K/16, 128\]"):
        mod.gemm(x, torch.zeros(32, 128, device="cuda", dtype=torch.uint8), s, s, 128, None, out, 0)  # public layout
    with pytest.raises(RuntimeError, match="group size must be a multiple of 64"):
        mod.gemm(x, w, s, s, 32, None, out, 0)
    with pytest.raises(RuntimeError, match=r"scale and zero must be \[K / group_size, N\] = \[2, 32\]"):
        mod.gemm(x, w, s.t().contiguous(), s, 128, None, out, 0)
    with pytest.raises(RuntimeError, match="scale must be BFloat16"):
        mod.gemm(x, w, s.float(), s, 128, None, out, 0)
    with pytest.raises(RuntimeError, match="no tile configuration 99"):
        mod.gemm(x, w, s, s, 128, None, out, 99)


# --- int8 / fp8 weight-only ----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8_weight_only", "fp8_weight_only"])
def test_weight_only_8bit_limits_name_the_reason(scheme):
    kernel = R.get_kernel(WEIGHT_ONLY[scheme])
    assert kernel.can_implement(spec(scheme, act_input="none")) == (True, "")
    ok, why = kernel.can_implement(spec(scheme, act_input="none", k=4104))
    assert not ok and "K of 16" in why
    ok, why = kernel.can_implement(spec(scheme, act_input="none", act_dtype=torch.float32, out_dtype=torch.float32))
    assert not ok and "bf16 / fp16" in why
    assert kernel.opaque and not kernel.takes_quantized_activation(spec(scheme, act_input="none"))


@pytest.mark.parametrize("scheme", ["int8_weight_only", "fp8_weight_only"])
@pytest.mark.parametrize("m,dtype", [(1, torch.bfloat16), (33, torch.float16), (130, torch.bfloat16)])
def test_weight_only_8bit_glue_against_reference_with_the_extension_emulated(monkeypatch, scheme, m, dtype):
    from ..helpers import kernel_case

    kernel = R.get_kernel(WEIGHT_ONLY[scheme])
    monkeypatch.setattr(type(kernel), "module", lambda self: _FakeModule(self.family))
    n, k = 136, 384
    x, params, bias, _, ref = kernel_case(scheme, m, n, k, dtype=dtype, seed=m)
    s = R.LayerSpec(scheme, n, k, dtype, dtype, has_bias=True, act_input="none")
    y = kernel.run(s, x, params, bias.float())
    assert y.dtype == dtype and S.relative_error(y, ref) < S.TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8_weight_only", "fp8_weight_only"])
@given(m=st.integers(1, 4096), n8=st.integers(1, 64), k16=st.integers(1, 48),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), bias=st.booleans(), seed=st.integers(0, 99))
def test_gpu_weight_only_8bit_against_reference(scheme, m, n8, k16, dtype, bias, seed):
    """M 1..4096, N any multiple of 8, K any multiple of 16."""
    _hopper_or_skip(WEIGHT_ONLY[scheme])
    run_direct(scheme, m, n8 * 8 * 3, min(k16 * 16 * 7, 8192), act_input="none", dtype=dtype, bias=bias, seed=seed,
               device="cuda", poison=True, kernel=WEIGHT_ONLY[scheme])


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8_weight_only", "fp8_weight_only"])
def test_gpu_weight_only_8bit_every_tile_configuration(scheme):
    _hopper_or_skip(WEIGHT_ONLY[scheme])
    kernel = R.get_kernel(WEIGHT_ONLY[scheme])
    names = list(kernel.module().configs())
    assert names == cuh_configs()[kernel.family]
    for name in names:
        for m, n, k in ((1, 4096, 4096), (37, 1536, 2048), (130, 2048, 14336), (1027, 1024, 4096), (4096, 384, 640)):
            run_direct(scheme, m, n, k, act_input="none", device="cuda", poison=True, kernel=WEIGHT_ONLY[scheme],
                       seed=m, bias=m % 2 == 1, config=name)


@pytest.mark.gpu
def test_gpu_weight_only_8bit_binding_rejects_bad_input():
    _hopper_or_skip("cutlass_int8_weight_only")
    mod = R.get_kernel("cutlass_int8_weight_only").module()
    x = torch.zeros(4, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(32, 256, device="cuda", dtype=torch.int8)
    s = torch.ones(32, device="cuda")
    out = torch.empty(4, 32, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="w must be Char"):
        mod.gemm(x, w.float(), s, None, out, 0)
    with pytest.raises(RuntimeError, match="scale has 16 values, expected 32"):
        mod.gemm(x, w, s[:16].contiguous(), None, out, 0)
    with pytest.raises(RuntimeError, match="x is \\[4, 256\\] but w is \\[32, 128\\]"):
        mod.gemm(x, w[:, :128].contiguous(), s, None, out, 0)
    with pytest.raises(RuntimeError, match="no tile configuration 99"):
        mod.gemm(x, w, s, None, out, 99)


def test_the_pass_builds_a_weight_only_family_at_compile_time_not_in_the_first_forward(toolchain_ok):
    """prepare(): the family is loaded (built on a machine that has not built it) while the pass
    runs, before the op's first call, also when the kernel only appears in a per-M plan."""
    from ..helpers import linear_model, random_activation

    events = []
    kernel = R.get_kernel("cutlass_w4a16")
    toolchain_ok.setattr(R.DeviceInfo, "of", classmethod(lambda cls, d=None: H100))
    toolchain_ok.setattr(type(kernel), "module", lambda self: events.append("module") or _FakeModule(self.family))
    orig = CU.CutlassW4A16.run

    def spy(self, *args, **kwargs):
        events.append("run")
        return orig(self, *args, **kwargs)

    toolchain_ok.setattr(CU.CutlassW4A16, "run", spy)
    m = linear_model(256, 64, "w4a16", bias=True, group_size=128)
    x = random_activation((40, 256))
    with torch.no_grad():
        y = torch.compile(m, backend=qp.make(linear_backend="cutlass", inductor=False))(x)
    assert events[:2] == ["module", "run"], events
    ref = S.reference("w4a16", x, m[0].params, m[0].bias)
    assert S.relative_error(y, ref) < S.TOLERANCE[torch.bfloat16]


def _cutlass_graph(toolchain_ok, model, x):
    """``model(x)`` compiled on the CUTLASS backend with the extensions emulated, patching through
    ``toolchain_ok`` (a MonkeyPatch): (output, the graph's nodes after the pass, {module: its
    qlinear_pass::linear node})."""
    from qlinear_pass import graph_pass
    from qlinear_pass.spec import LayerSpec

    for name in set(KERNELS.values()):
        toolchain_ok.setattr(type(R.get_kernel(name)), "module", lambda self: _FakeModule(self.family))
    toolchain_ok.setattr(R.DeviceInfo, "of", classmethod(lambda cls, d=None: H100))
    graphs = []
    orig = graph_pass.rewrite

    def spy(graph, cfg, record, device=None):
        orig(graph, cfg, record, device)
        graphs.append(list(graph.nodes))

    toolchain_ok.setattr(graph_pass, "rewrite", spy)
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(model, backend=qp.make(linear_backend="cutlass", inductor=False))(x)
    (nodes,) = graphs
    ops = {LayerSpec.from_json(n.args[4]).module: n for n in nodes if n.target == torch.ops.qlinear_pass.linear.default}
    return y, nodes, ops


@pytest.mark.parametrize("scheme", list(KERNELS))
def test_siblings_share_one_quantization_of_their_activation(toolchain_ok, scheme):
    """q/k/v each quantize the normed activation in the graph; the kernels get one quantization
    (and, block-scaled, one MN-major scale buffer), so Inductor computes it once, not three times."""
    from qlinear_pass import graph_pass

    from ..helpers import random_activation

    torch.manual_seed(0)
    model = qp.quantize(Siblings().to(torch.bfloat16), scheme)
    x = random_activation((1, 5, 256))
    y, nodes, ops = _cutlass_graph(toolchain_ok, model, x)
    with torch.no_grad():
        assert S.relative_error(y, model(x)) < S.TOLERANCE[torch.bfloat16]
    assert sorted(ops) == ["k", "o", "q", "v"]
    inputs = {name: graph_pass._root(n.args[0]) for name, n in ops.items()}
    assert inputs["q"] is inputs["k"] is inputs["v"] and inputs["o"] is not inputs["q"]
    scales = {name: n.args[1][-1] for name, n in ops.items()}
    assert scales["q"] is scales["k"] is scales["v"] and scales["o"] is not scales["q"]
    views = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
    quantized = [n for n in nodes if n.op == "call_function" and n.target not in views
                 and getattr(n.meta.get("val"), "dtype", None) in (torch.float8_e4m3fn, torch.int8)]
    assert len(quantized) == 2, [n.format_node() for n in quantized]  # h's and x's


# each example compiles; the sharing depends on which of q/k/v have the same scheme, which the two
# pinned examples and half the usual drawn ones cover
@settings(max_examples=max(1, settings.default.max_examples // 2))
@given(schemes=st.lists(st.sampled_from(list(KERNELS)), min_size=3, max_size=3))
@example(schemes=["fp8_rowwise", "fp8_block", "fp8_rowwise"])
@example(schemes=["fp8_rowwise", "fp8_tensor", "int8_rowwise"])  # per token, per tensor, int8: three chains
def test_siblings_share_a_quantization_only_when_it_is_the_same(schemes):
    """q/k/v quantized with any mix of schemes: the layers of one scheme read one quantization,
    layers of different schemes each their own, and every output is still right."""
    from qlinear_pass import graph_pass

    from ..helpers import random_activation

    torch.manual_seed(0)
    model = Siblings().to(torch.bfloat16)
    for name, scheme in zip("qkv", schemes):
        qp.quantize(model, scheme, include=[name])
    qp.quantize(model, "fp8_rowwise")  # o
    x = random_activation((1, 5, 256))
    with pytest.MonkeyPatch.context() as mp:  # patched anew for each example
        y, _, ops = _cutlass_graph(_with_toolchain(mp), model, x)
    with torch.no_grad():
        assert S.relative_error(y, model(x)) < S.TOLERANCE[torch.bfloat16]
    inputs = {name: graph_pass._root(ops[name].args[0]) for name in "qkv"}
    for a, sa in zip("qkv", schemes):
        for b, sb in zip("qkv", schemes):
            assert (inputs[a] is inputs[b]) == (sa == sb), (a, b, schemes)
