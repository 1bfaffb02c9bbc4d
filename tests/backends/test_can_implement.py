"""``can_implement`` states every constraint of the op a kernel wraps.

For every kernel that can run on this machine, hypothesis draws layers whose N and K are off
the usual multiples (odd sizes, one column, the group size itself) next to ordinary ones.
Whenever the kernel says it can run a layer, it must run it and agree with the scheme's
reference; a "no" must come with a reason.  Shapes stay tiny, so the Triton kernels run through
Triton's interpreter on a CPU-only machine.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, note
from hypothesis import strategies as st

from qlinear_pass import schemes as S
from qlinear_pass.kernels import ops
from qlinear_pass.registry import DeviceInfo, LayerSpec, kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _runnable() -> list[str]:
    dev = DeviceInfo.of(DEVICE)
    return sorted(name for name, k in kernels().items() if k.is_supported(dev)[0])


RUNNABLE = _runnable()

#: sizes off the usual multiples, next to ordinary ones
ODD = st.one_of(st.integers(1, 40), st.sampled_from([8, 16, 24, 48, 64, 72, 96, 100, 128]))


@st.composite
def layers(draw, kernel_name: str) -> dict:
    """One layer a kernel of ``kernel_name`` might be asked to run, with its inputs."""
    kernel = kernels()[kernel_name]
    scheme = draw(st.sampled_from(sorted(kernel.schemes)))
    sch = S.get_scheme(scheme)
    group_size = None
    if scheme == "w4a16":  # K is whole groups: the quantized format cannot hold anything else
        group_size = draw(st.sampled_from(S.GROUP_SIZES))
        k = group_size * draw(st.integers(1, 3))
    elif scheme == "fp8_block":  # whole 128-wide blocks, likewise
        k = S.BLOCK * draw(st.integers(1, 2))
    else:
        k = draw(ODD)
    if sch.weight_only:
        act_input = "none"
    else:
        act_input = draw(st.sampled_from(["dynamic", "static"]))
    dtype = draw(st.sampled_from(FLOATS))
    return dict(scheme=scheme, n=draw(ODD), k=k, m=draw(st.sampled_from([1, 2, 5])), dtype=dtype,
                out_dtype=dtype, act_input=act_input, group_size=group_size,
                zero_points=scheme == "w4a16" and draw(st.booleans()), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def run_case(kernel_name: str, case: dict) -> None:
    note(repr(case))
    g = torch.Generator().manual_seed(case["seed"])
    scheme, n, k, m, dtype = case["scheme"], case["n"], case["k"], case["m"], case["dtype"]
    sch = S.get_scheme(scheme)
    p = S.quantize_weight(scheme, torch.randn(n, k, generator=g) * 0.05, group_size=case["group_size"] or 128,
                          zero_points=case["zero_points"])
    params = [None if p.get(name) is None else p[name].to(DEVICE) for name in sch.param_names]
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(n, generator=g).to(dtype).to(DEVICE) if case["bias"] else None
    act_dtype, input_scale = dtype, None
    if case["act_input"] == "static":
        x, input_scale = S.quantize_activation(scheme, x)
        act_dtype = x.dtype
    spec = LayerSpec(scheme=scheme, n=n, k=k, act_dtype=act_dtype, out_dtype=case["out_dtype"],
                     has_bias=bias is not None, group_size=case["group_size"], zero_points=case["zero_points"],
                     act_input=case["act_input"], device=DEVICE, weights_constant=True)
    kernel = kernels()[kernel_name]
    ok, why = kernel.can_implement(spec)
    if not ok:
        assert why, f"{kernel_name} refused {spec.short()} without a reason"
        return
    ref = S.reference(scheme, x, params, bias, input_scale=input_scale, out_dtype=spec.out_dtype)
    run_params = params if input_scale is None else [*params, input_scale]
    y = ops.call(kernel_name, spec, x, run_params, bias)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = S.relative_error(y, ref)
    assert err <= S.TOLERANCE[spec.out_dtype], f"{kernel_name} on {spec.short()}: relative error {err:.3g}"


#: kernels that can only run as ATen nodes the pass writes (no run() behind the op) are checked
#: through the pass in their backend's tests
BEHIND_OP = [name for name in RUNNABLE if kernels()[name].runs_behind_op]


def _case(scheme, n, k, dtype=torch.bfloat16, group_size=None, act_input="none", m=2):
    return dict(scheme=scheme, n=n, k=k, m=m, dtype=dtype, out_dtype=dtype, act_input=act_input,
                group_size=group_size, zero_points=False, bias=False, seed=0)


#: layers that showed a missing constraint once
PINNED = [
    _case("w4a16", 1000, 64, group_size=64),  # w4a16's default lm_head: int4pack on CPU wants N % 16
    _case("int8_weight_only", 16, 40),  # CPU _weight_int8pack_mm with bf16 reads K 16 at a time
    _case("fp8_rowwise", 17, 24, act_input="dynamic", m=1),
    _case("int8_rowwise", 7, 33, act_input="static", m=5),
]


@pytest.mark.parametrize("kernel_name", BEHIND_OP)
@given(data=st.data())
@example(data=None)
def test_a_kernel_that_says_yes_runs_and_agrees(kernel_name, data):
    if data is None:
        for case in PINNED:
            if case["scheme"] in kernels()[kernel_name].schemes:
                run_case(kernel_name, case)
        return
    run_case(kernel_name, data.draw(layers(kernel_name)))


def test_cpu_int4pack_states_its_n_constraint():
    """``_convert_weight_to_int4pack_for_cpu`` wants N divisible by 16."""
    spec = LayerSpec("w4a16", 1000, 64, torch.bfloat16, torch.bfloat16, group_size=64, device="cpu",
                     weights_constant=True)
    ok, why = kernels()["torch_int4pack"].can_implement(spec)
    assert not ok and "N divisible by 16" in why and "N=1000" in why
