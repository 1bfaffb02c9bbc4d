"""Shared test helpers: small quantized models, compiling with the pass, recorded decisions."""
from __future__ import annotations

import torch

import qlinear_pass as qp
from qlinear_pass import schemes as S
from qlinear_pass.graph_pass import watch

ALL_SCHEMES = S.SCHEMES if hasattr(S, "SCHEMES") else tuple(s.name for s in S.all_schemes())


def linear_model(k: int, n: int, scheme: str, *, bias=False, dtype=torch.bfloat16, group_size=128, zero_points=False, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.5)
    m = torch.nn.Sequential(lin).to(dtype)
    return qp.quantize(m, scheme, group_size=group_size if scheme == "w4a16" else None, zero_points=zero_points)


def random_activation(shape, dtype=torch.bfloat16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def recorded():
    """Collect the CompileRecords made inside the block."""
    return watch()


def kernels_of(records) -> list:
    return [d.kernel for r in records for d in r.decisions]


def compile_and_run(model, x, backend=None, *, inductor=False, dynamic=None):
    with torch.no_grad(), recorded() as recs:
        f = torch.compile(model, backend=qp.make(backend, inductor=inductor), dynamic=dynamic)
        y = f(x)
    return y, recs
