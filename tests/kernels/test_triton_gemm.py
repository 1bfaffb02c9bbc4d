"""Every Triton kernel mode compiles for Hopper (sm90) on any machine: Triton ships ptxas.

The interpreter checks what the kernels compute; this checks what the interpreter does not:
that the GPU compiler accepts them (globals must be constexpr, dtypes must meet in dots, ...).
The tests run in a subprocess without TRITON_INTERPRET, which replaces @jit functions.
"""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):

    @pytest.mark.slow
    def test_kernels_compile_for_sm90():
        env = {**os.environ, "TRITON_INTERPRET": "0"}  # "0": conftest.py leaves a set value alone
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                             env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        assert " passed" in out.stdout


from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qlinear_pass.kernels import triton_gemm as T  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

SM90 = GPUTarget("cuda", 90, 32)

def _jit(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel

def compile_for_sm90(kernel, types: dict, constexprs: dict, cfg=None):
    """``kernel`` compiled for sm90; with ``cfg`` (a triton.Config), its tile sizes, warps and stages."""
    if INTERPRETED:
        pytest.skip("checked in a subprocess without the interpreter")
    fn = _jit(kernel)
    options = {}
    if cfg is not None:
        constexprs = {**constexprs, **cfg.kwargs}
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=SM90, options=options)

def _ints(*names):
    return {n: "i32" for n in names}

W8A8_CASES = [  # (activation dtype, scale modes, int8?, config)
    ("fp8e4nv", T.A_TOKEN, T.W_CHANNEL, False, T._W8A8_CONFIGS[0]),
    ("fp8e4nv", T.A_TENSOR, T.W_TENSOR, False, T._W8A8_CONFIGS[4]),
    ("fp8e4nv", T.A_GROUP, T.W_BLOCK, False, T._W8A8_CONFIGS[1]),
    ("i8", T.A_TOKEN, T.W_CHANNEL, True, T._W8A8_CONFIGS[5]),
]

@pytest.mark.parametrize("act,a_scale,w_scale,is_int8,cfg", W8A8_CASES)
def test_w8a8_kernel_compiles(act, a_scale, w_scale, is_int8, cfg):
    types = {"A": f"*{act}", "W": f"*{act}", "C": "*fp32", "SA": "*fp32", "SW": "*fp32", "BIAS": "*bf16",
             **_ints("M", "N", "K", "M_BUCKET", "stride_am", "stride_ak", "stride_wn", "stride_wk", "stride_cm",
                     "stride_cn", "stride_sam", "stride_swn")}
    k = compile_for_sm90(T._w8a8_kernel, types, {"A_SCALE": a_scale, "W_SCALE": w_scale, "IS_INT8": is_int8,
                                                 "HAS_BIAS": True, **cfg.kwargs})
    assert k.asm["cubin"]

@pytest.mark.parametrize("kind,wdt,group,zero,cfg", [
    (T.W_INT4, "u8", 128, True, T._WO_CONFIGS[3]),
    (T.W_INT4, "u8", 32, False, T._WO_CONFIGS[5]),
    (T.W_INT8, "i8", 0, False, T._WO_CONFIGS[0]),
    (T.W_FP8, "fp8e4nv", 0, False, T._WO_CONFIGS[2]),
])
def test_weight_only_kernel_compiles(kind, wdt, group, zero, cfg):
    types = {"A": "*bf16", "W": f"*{wdt}", "C": "*bf16", "SW": "*fp32", "ZW": "*u8", "BIAS": "*bf16",
             **_ints("M", "N", "K", "M_BUCKET", "stride_am", "stride_ak", "stride_wn", "stride_wk", "stride_cm",
                     "stride_cn", "stride_sn", "stride_zn")}
    k = compile_for_sm90(T._wo_kernel, types, {"W_KIND": kind, "GROUP_SIZE": group, "HAS_ZERO": zero,
                                               "HAS_BIAS": False, **cfg.kwargs})
    assert k.asm["cubin"]

@pytest.mark.parametrize("qdt,is_int8,group", [("fp8e4nv", False, 0), ("fp8e4nv", False, 128), ("i8", True, 0)])
def test_quantize_kernel_compiles(qdt, is_int8, group):
    types = {"X": "*bf16", "Q": f"*{qdt}", "S": "*fp32", **_ints("M", "K", "stride_xm", "stride_qm", "stride_sm")}
    k = compile_for_sm90(T._quant_act_kernel, types, {"QMAX": 127.0 if is_int8 else 448.0, "IS_INT8": is_int8,
                                                      "GROUP": group, "BLOCK_K": 1024 if not group else 128})
    assert k.asm["cubin"]


@pytest.mark.parametrize("kind,wdt,group,zero", [(T.W_INT4, "u8", 128, True), (T.W_INT4, "u8", 32, False),
                                                 (T.W_INT4_MMA16, "u8", 128, True), (T.W_INT4_MMA16, "u8", 32, False),
                                                 (T.W_INT8, "i8", 0, False), (T.W_FP8, "fp8e4nv", 0, False)])
def test_dequant_kernel_compiles(kind, wdt, group, zero):
    types = {"W": f"*{wdt}", "SW": "*fp32", "ZW": "*u8", "OUT": "*bf16",
             **_ints("N", "K", "stride_wn", "stride_sn", "stride_zn", "stride_on")}
    k = compile_for_sm90(T._dequant_kernel, types, {"W_KIND": kind, "GROUP_SIZE": group, "HAS_ZERO": zero,
                                                    "BLOCK_N": 16, "BLOCK_K": 256})
    assert k.asm["cubin"]


@pytest.mark.parametrize("kind,wdt,group,zero,cfg", [
    (T.W_INT4, "u8", 128, False, T._WT_CONFIGS[1]),   # one group per K tile
    (T.W_INT4, "u8", 32, True, T._WT_CONFIGS[0]),     # eight groups per K tile
    (T.W_INT4, "u8", 128, True, T._WT_CONFIGS[7]),    # prefill tile, two warpgroups
    (T.W_INT8, "i8", 0, False, T._WT_CONFIGS[5]),
    (T.W_FP8, "fp8e4nv", 0, False, T._WT_CONFIGS[8]),
])
@pytest.mark.parametrize("act", ["bf16", "fp16"])
def test_weight_stationary_kernel_compiles(kind, wdt, group, zero, cfg, act):
    types = {"A": f"*{act}", "W": f"*{wdt}", "C": f"*{act}", "SW": "*fp32", "ZW": "*u8", "BIAS": f"*{act}",
             **_ints("M", "N", "K", "M_BUCKET", "stride_am", "stride_ak", "stride_wn", "stride_wk", "stride_cm",
                     "stride_cn", "stride_sn", "stride_zn")}
    k = compile_for_sm90(T._wo_t_kernel, types, {"W_KIND": kind, "GROUP_SIZE": group, "HAS_ZERO": zero,
                                                 "HAS_BIAS": True, "SPLIT_K": 1}, cfg)
    assert k.asm["cubin"]
    assert "wgmma" in k.asm["ptx"]  # Hopper tensor cores, the weight from registers
