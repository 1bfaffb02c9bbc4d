"""The correctness contract, shared by every backend's tests.

A (scheme, backend) pair runs a quantized linear through the whole pass
(matcher, selection, kernel) and must agree with the scheme's float32
reference within ``schemes.TOLERANCE`` for the output dtype.
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

import qlinear_pass as qp
from qlinear_pass import schemes as S

from ..helpers import kernels_of, linear_model, random_activation, recorded


@st.composite
def layer_cases(draw, scheme: str, *, max_m: int = 33, k_choices=(128, 256), n_choices=(16, 48, 64, 80), dtypes=None):
    dtypes = dtypes or [torch.bfloat16, torch.float16, torch.float32]
    lead = draw(st.sampled_from([(1,), (2,), (5,), (max_m,), (2, 3)]))
    return dict(
        k=draw(st.sampled_from(k_choices)),
        n=draw(st.sampled_from(n_choices)),
        lead=lead,
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        group_size=draw(st.sampled_from(S.GROUP_SIZES)),
        zero_points=draw(st.booleans()) if scheme == "w4a16" else False,
        seed=draw(st.integers(0, 1000)),
    )


def edge_cases(scheme: str, *, dtype=torch.bfloat16) -> list[dict]:
    """Pinned layers every conformance test runs besides the drawn ones: one row (the decode
    path), a 3-D input with bias, a narrow N and the smallest group."""
    base = dict(k=128, n=16, bias=False, dtype=dtype, group_size=32, zero_points=False, seed=7)
    return [
        {**base, "lead": (1,)},
        {**base, "lead": (2, 3), "n": 80, "bias": True, "zero_points": scheme == "w4a16"},
    ]


def check_drawn_or_pinned(scheme: str, backend: str, data, *, strategy=None, dtype=torch.bfloat16, **kw):
    """The body of a conformance test taking ``data`` from ``@given(data=st.data())``, and
    ``None`` from ``@example(data=None)``: then it runs the :func:`edge_cases`."""
    pinned = edge_cases(scheme, dtype=dtype)
    if data is None:
        for case in pinned:
            check_against_reference(scheme, backend, case, **kw)
        return
    case = data.draw(strategy if strategy is not None else layer_cases(scheme), label="case")
    if any({**case, "seed": None} == {**p, "seed": None} for p in pinned):
        return  # an edge case but for its seed (hypothesis draws the simplest case first): run by @example
    check_against_reference(scheme, backend, case, **kw)


def check_against_reference(scheme: str, backend: str, case: dict, *, device="cpu", expect_kernel=None):
    torch._dynamo.reset()
    m = linear_model(case["k"], case["n"], scheme, bias=case["bias"], dtype=case["dtype"],
                     group_size=case["group_size"], zero_points=case["zero_points"], seed=case["seed"]).to(device)
    x = random_activation((*case["lead"], case["k"]), case["dtype"], seed=case["seed"] + 1).to(device)
    q = m[0]
    with torch.no_grad(), recorded() as recs:
        y = torch.compile(m, backend=qp.make(backend, inductor=False))(x)
        ref = S.reference(scheme, x, q.params, q.bias)
    kernels = kernels_of(recs)
    assert len(kernels) == 1, recs
    if expect_kernel is not None:
        assert kernels == [expect_kernel]
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = S.relative_error(y, ref)
    assert err <= S.TOLERANCE[case["dtype"]], f"{kernels[0]}: relative error {err:.3g} for {case}"
    return kernels[0]
