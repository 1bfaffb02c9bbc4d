"""The decode kernel (M <= 16, every weight format) against the scheme references.

Without a GPU it runs through Triton's interpreter (small shapes, both inner paths); every
kernel mode is also compiled for sm90 in a subprocess without the interpreter; the ``gpu``
test draws Llama-sized and odd shapes, every configuration, with poisoned output memory.
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

triton = pytest.importorskip("triton")

from qlinear_pass import schemes as S  # noqa: E402
from qlinear_pass.kernels import triton_decode as D  # noqa: E402

from ..helpers import kernel_case  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
SCHEMES = ["fp8_tensor", "fp8_rowwise", "fp8_block", "int8_rowwise", "int8_weight_only", "fp8_weight_only", "w4a16"]


def modes(scheme: str, static: bool):
    sch = S.get_scheme(scheme)
    wk = {torch.int8: D.Weight.INT8, torch.uint8: D.Weight.INT4}.get(sch.weight_dtype, D.Weight.FP8)
    ws = {"tensor": D.Weight.TENSOR, "channel": D.Weight.CHANNEL, "block": D.Weight.BLOCK, "group": D.Weight.GROUP}[sch.weight_granularity]
    if sch.weight_only:
        act = D.Act.FLOAT
    elif static:
        act = {"tensor": D.Act.STATIC_TENSOR, "token": D.Act.STATIC_TOKEN, "group": D.Act.STATIC_GROUP}[sch.act_granularity]
    else:
        act = {"tensor": D.Act.DYN_TENSOR, "token": D.Act.DYN_TOKEN, "group": D.Act.DYN_GROUP}[sch.act_granularity]
    return wk, ws, act


def check(scheme, m, n, k, *, static=False, group_size=64, zero_points=False, dtype=torch.bfloat16, bias=True,
          config=None, device="cpu", seed=0, poison=False):
    sch = S.get_scheme(scheme)
    x, params, b, xs, ref = kernel_case(scheme, m, n, k, static=static, group_size=group_size,
                                        zero_points=zero_points, dtype=dtype, bias=bias, seed=seed, device=device)
    wk, ws, act = modes(scheme, static)
    sa = None if xs is None else (xs if sch.act_granularity == "group" else xs.reshape(-1))
    if poison:
        torch.full((m * n * 4 + (1 << 20),), float("nan"), device=device)
    y = D.decode_gemm(x, params[0], params[1], params[2] if len(params) > 2 else None, sa, b, dtype,
                      w_kind=wk, w_scale=ws, act=act, act_int8=sch.act_dtype == torch.int8,
                      group_size=group_size if scheme == "w4a16" else 0, config=config)
    assert y.shape == ref.shape and y.dtype == dtype
    assert not torch.isnan(y).any(), "unwritten or NaN output"
    # the split-K counters are back to zero for the next launch
    assert all(int(locks.count_nonzero()) == 0 for locks in D._LOCKS.values())
    err = S.relative_error(y, ref)
    assert err <= S.TOLERANCE[dtype], f"{scheme} M={m} N={n} K={k} static={static} {config}: relative error {err:.3g}"


@st.composite
def decode_cases(draw, max_n=48, ks=(128, 256)):
    scheme = draw(st.sampled_from(SCHEMES))
    sch = S.get_scheme(scheme)
    use_dot = draw(st.booleans())
    m = draw(st.integers(1, D.MAX_M)) if use_dot else 1
    k = draw(st.sampled_from(ks))
    return dict(
        scheme=scheme, m=m, n=draw(st.integers(1, max_n)), k=k,
        static=draw(st.booleans()) if not sch.weight_only else False,
        group_size=draw(st.sampled_from([32, 64, 128])),
        zero_points=draw(st.booleans()) if scheme == "w4a16" else False,
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])),
        bias=draw(st.booleans()),
        config=D.Config(draw(st.sampled_from([16, 32])), draw(st.sampled_from([128, 256])), 4, 2 if use_dot else 1, use_dot,
                        draw(st.sampled_from([1, 2, 4]))),
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu test covers this on a GPU")
@given(decode_cases())
@example(dict(scheme="w4a16", m=1, n=17, k=256, static=False, group_size=128, zero_points=True, dtype=torch.bfloat16,
              bias=False, config=D.Config(16, 256, 4, 1, False)))
@example(dict(scheme="fp8_tensor", m=16, n=5, k=128, static=False, group_size=64, zero_points=False, dtype=torch.float16,
              bias=True, config=D.Config(16, 128, 4, 2, True)))
@example(dict(scheme="fp8_block", m=3, n=130, k=256, static=True, group_size=64, zero_points=False, dtype=torch.bfloat16,
              bias=True, config=D.Config(32, 256, 4, 2, True)))
@example(dict(scheme="int8_rowwise", m=1, n=33, k=384, static=False, group_size=64, zero_points=False,
              dtype=torch.bfloat16, bias=True, config=D.Config(16, 128, 4, 1, False, 2)))  # 3 K tiles over 2 programs
def test_decode_matches_reference(case):
    check(**case)


def check_group(scheme, m, ns, k, *, static=False, group_size=64, zero_points=False, dtype=torch.bfloat16, bias=True,
                config=None, device="cpu", seed=0):
    """Layers reading one activation, run by decode_gemm_group: each output against its own reference."""
    sch = S.get_scheme(scheme)
    cases = [kernel_case(scheme, m, n, k, group_size=group_size, zero_points=zero_points, dtype=dtype, bias=bias,
                         seed=seed + i, device=device) for i, n in enumerate(ns)]
    x, xs = cases[0][0], None
    if static:
        x, xs = S.quantize_activation(scheme, x)
    wk, ws, act = modes(scheme, static)
    sa = None if xs is None else (xs if sch.act_granularity == "group" else xs.reshape(-1))
    layers = [D.Layer(p[0], p[1], p[2] if len(p) > 2 else None, b) for _, p, b, _, _ in cases]
    ys = D.decode_gemm_group(x, layers, sa, dtype, w_kind=wk, w_scale=ws, act=act, act_int8=sch.act_dtype == torch.int8,
                             group_size=group_size if scheme == "w4a16" else 0, config=config)
    assert all(int(locks.count_nonzero()) == 0 for locks in D._LOCKS.values())
    for i, (y, (_, p, b, _, _)) in enumerate(zip(ys, cases)):
        ref = S.reference(scheme, x, p, b, input_scale=xs, out_dtype=dtype) if static else S.reference(scheme, x, p, b)
        assert y.shape == ref.shape and y.dtype == dtype
        err = S.relative_error(y, ref)
        assert err <= S.TOLERANCE[dtype], f"{scheme} layer {i} of {ns} M={m} K={k} {config}: relative error {err:.3g}"


@st.composite
def group_cases(draw, max_tiles=3, ks=(128, 256)):
    case = draw(decode_cases(ks=ks))
    bn = case["config"].block_n
    # tile-aligned layers run in one launch; a ragged one before the last starts another
    ns = draw(st.lists(st.one_of(st.integers(1, max_tiles).map(lambda t: t * bn), st.integers(1, 40)), min_size=1, max_size=5))
    return {**{key: v for key, v in case.items() if key != "n"}, "ns": ns}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu test covers this on a GPU")
@given(group_cases())
@example(dict(scheme="fp8_rowwise", m=1, ns=[32, 16, 16], k=256, static=True, group_size=64, zero_points=False,
              dtype=torch.bfloat16, bias=False, config=D.Config(16, 128, 4, 1, False, 2)))  # q/k/v, split K
@example(dict(scheme="w4a16", m=1, ns=[32, 32], k=256, static=False, group_size=32, zero_points=True,
              dtype=torch.float16, bias=True, config=D.Config(16, 128, 4, 1, False)))  # gate/up
@example(dict(scheme="fp8_block", m=5, ns=[16, 7, 32, 16, 16], k=256, static=False, group_size=64, zero_points=False,
              dtype=torch.bfloat16, bias=True, config=D.Config(16, 128, 4, 2, True, 2)))  # ragged, more than 3
def test_group_matches_reference(case):
    check_group(**case)


@pytest.mark.gpu
@given(group_cases(max_tiles=40, ks=(128, 384, 4096)), st.integers(0, 2**16))
def test_group_on_gpu(case, seed):
    check_group(**case, device="cuda", seed=seed)


def test_default_config_runs_and_fills_the_gpu():
    """decode_config: BLOCK_K divides K (and holds whole groups), and N / BLOCK_N gives the SMs work."""
    for wk, g in ((D.Weight.FP8, 0), (D.Weight.INT4, 32), (D.Weight.INT4, 128)):
        for n, k in ((14336, 4096), (4096, 14336), (6144, 4096), (1024, 4096)):
            for m in (1, 8, 16):
                c = D.decode_config(wk, m, n, k, g, sms=132)
                assert k % c.block_k == 0 and (not g or c.block_k % g == 0)
                assert c.use_dot == (m > 1)
                assert -(-n // c.block_n) * c.split_k >= 128  # the SMs get work
                assert (k // c.block_k) // c.split_k >= 2  # each program walks a few tiles
    # K = 3 x 128: the tile shrinks to divide it
    check("w4a16", 1, 40, 384, group_size=128, device="cuda" if torch.cuda.is_available() else "cpu")


def test_bad_inputs_raise():
    x = torch.zeros(17, 128, dtype=torch.bfloat16)
    w = torch.zeros(8, 128, dtype=torch.int8)
    s = torch.ones(8)
    with pytest.raises(ValueError, match="M <= 16"):
        D.decode_gemm(x, w, s, None, None, None, torch.bfloat16, w_kind=D.Weight.INT8, w_scale=D.Weight.CHANNEL, act=D.Act.FLOAT)
    with pytest.raises(ValueError, match="K divisible by 128"):
        D.decode_gemm(x[:1, :96], w[:, :96], s, None, None, None, torch.bfloat16, w_kind=D.Weight.INT8,
                      w_scale=D.Weight.CHANNEL, act=D.Act.FLOAT)
    with pytest.raises(ValueError, match="M == 1"):
        D.decode_gemm(x[:2], w, s, None, None, None, torch.bfloat16, w_kind=D.Weight.INT8, w_scale=D.Weight.CHANNEL,
                      act=D.Act.FLOAT, config=D.Config(16, 128, 4, 1, False))


@pytest.mark.gpu
@given(decode_cases(max_n=3000, ks=(128, 384, 4096)), st.sampled_from(D.CONFIGS), st.integers(0, 2**16))
def test_decode_on_gpu(case, config, seed):
    if case["m"] > 1 and not config.use_dot:
        config = D.Config(config.block_n, 256, 4, 2, True)
    check(**{**case, "config": config}, device="cuda", seed=seed, poison=True)


# --- every mode compiles for sm90 (Triton ships ptxas), checked without the interpreter ---------

if INTERPRETED:

    @pytest.mark.slow  # an sm90 compile check (10 s on 2 cores): `make test-all` and CI run it
    def test_decode_kernel_compiles_for_sm90():
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "compiles", __file__],
                             env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        assert " passed" in out.stdout


COMPILE_CASES = [  # (weight dtype, w_kind, w_scale, act, act dtype, act_int8, group, zero, dot)
    ("fp8e4nv", D.Weight.FP8, D.Weight.CHANNEL, D.Act.DYN_TOKEN, "bf16", False, 0, False, False),
    ("fp8e4nv", D.Weight.FP8, D.Weight.CHANNEL, D.Act.DYN_TOKEN, "bf16", False, 0, False, True),
    ("fp8e4nv", D.Weight.FP8, D.Weight.TENSOR, D.Act.STATIC_TENSOR, "fp8e4nv", False, 0, False, True),
    ("fp8e4nv", D.Weight.FP8, D.Weight.BLOCK, D.Act.DYN_GROUP, "bf16", False, 0, False, True),
    ("fp8e4nv", D.Weight.FP8, D.Weight.BLOCK, D.Act.STATIC_GROUP, "fp8e4nv", False, 0, False, False),
    ("i8", D.Weight.INT8, D.Weight.CHANNEL, D.Act.DYN_TOKEN, "bf16", True, 0, False, True),
    ("i8", D.Weight.INT8, D.Weight.CHANNEL, D.Act.FLOAT, "fp16", False, 0, False, True),
    ("i8", D.Weight.INT8, D.Weight.CHANNEL, D.Act.FLOAT, "bf16", False, 0, False, False),
    ("i8", D.Weight.INT8, D.Weight.CHANNEL, D.Act.STATIC_TOKEN, "i8", True, 0, False, False),
    ("u8", D.Weight.INT4, D.Weight.GROUP, D.Act.FLOAT, "bf16", False, 128, True, False),
    ("u8", D.Weight.INT4, D.Weight.GROUP, D.Act.FLOAT, "bf16", False, 32, False, True),
]


@pytest.mark.parametrize("wdt,wk,ws,act,adt,a8,group,zero,dot", COMPILE_CASES)
def test_decode_kernel_mode_compiles(wdt, wk, ws, act, adt, a8, group, zero, dot):
    if INTERPRETED:
        pytest.skip("checked in a subprocess without the interpreter")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = D._decode_kernel
    types = {"X": f"*{adt}", "W": f"*{wdt}", "C": "*bf16", "SW": "*fp32", "ZW": "*u8", "SA": "*fp32", "BIAS": "*bf16",
             "WS": "*fp32", "LOCKS": "*i32",
             **{n: "i32" for n in ("M", "N", "K", "stride_xm", "stride_wn", "stride_cm", "stride_swn", "stride_zn", "stride_sam",
                                   "N1", "N2", "WS_N")},
             **{f"{n}{i}": t for i in (1, 2) for n, t in (("W", f"*{wdt}"), ("C", "*bf16"), ("SW", "*fp32"), ("ZW", "*u8"),
                                                          ("BIAS", "*bf16"))}}
    constexprs = {"W_KIND": wk, "W_SCALE": ws, "ACT": act, "ACT_INT8": a8, "GROUP_SIZE": group, "HAS_ZERO": zero,
                  "HAS_BIAS": True, "DT": triton.language.float16 if adt == "fp16" else triton.language.bfloat16,
                  "BLOCK_M": 16 if dot else 1, "BLOCK_N": 32, "BLOCK_K": 256, "USE_DOT": dot,
                  "SPLIT_K": 1 if wk == D.Weight.INT8 else 2, "SEGS": 1 + (COMPILE_CASES.index((wdt, wk, ws, act, adt, a8, group, zero, dot)) % 3)}
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    assert k.asm["cubin"]
