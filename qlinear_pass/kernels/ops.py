"""``qlinear_pass::linear``: the custom op every opaque kernel runs behind (and
``qlinear_pass::linear_group``, the same for sibling layers that read one activation;
``qlinear_pass::linear_fused``, either with the norm or SwiGLU before and the residual add after
that ``fusion.fuse`` moved into it; and
``qlinear_pass::int4_from_mma16``, through which a w4a16 layer holding the MMA-fragment layout
reads its weight back).

The graph pass replaces a matched linear by a call of this op carrying the
chosen kernel's name (or, under ``auto`` with a dynamic M, a per-M plan such
as ``triton_w8a8@1;flashinfer_deepgemm_fp8_block``) and the layer spec.  Inductor keeps it as an opaque call
(its fake implementation gives the output shape), so a symbolic M needs no
recompile, and the kernel itself may pick a path by M at run time.

The two strings are what survives Inductor's FX-graph cache from one process to the next;
the op resolves them once per process into a :class:`Handle` (the spec, the kernel objects
of the plan), and each call after the first is one dictionary lookup.
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
from typing import Optional

import torch

from .. import fusion, registry
from . import int4_layout
from .. import schemes as S
from ..spec import LayerSpec, parse_plan

#: how often each kernel ran through the op (kernel name -> calls); for tests and debugging
CALLS: collections.Counter = collections.Counter()


class Handle:
    """The op's two strings, resolved: the layer spec and ``[(largest M or None, name, kernel)]``."""

    __slots__ = ("spec", "plan", "generation")

    def __init__(self, kernel: str, spec: str) -> None:
        self.spec = LayerSpec.from_json(spec)
        self.plan = tuple((limit, name, registry.get_kernel(name)) for limit, name in parse_plan(kernel))
        self.generation = registry.generation()

    def pick(self, x: torch.Tensor) -> tuple:
        """(name, kernel) for this activation's M."""
        plan = self.plan
        if len(plan) == 1:
            return plan[0][1], plan[0][2]
        m = x.numel() // max(x.shape[-1], 1)
        return next((name, k) for limit, name, k in plan if limit is None or m <= limit)


_HANDLES: dict = {}


def handle(kernel: str, spec: str, cls: type = Handle) -> Handle:
    """The resolved handle of one call site (cached; re-resolved if kernels were re-registered);
    ``cls`` GroupHandle for a ``linear_group`` call's list of specs."""
    key = (cls, kernel, spec)
    h = _HANDLES.get(key)
    if h is None or h.generation != registry.generation():
        h = _HANDLES[key] = cls(kernel, spec)
    return h


# The ops are defined with torch.library's low-level API, their Python functions registered as the
# CompositeExplicitAutograd kernels, so a call goes from the dispatcher straight to them: a prefill
# makes hundreds of calls without CUDA graphs, and ``torch.library.custom_op``'s wrappers (autograd
# redispatch, alias checks) cost several microseconds of host time each.  Their outputs never alias
# their inputs; they have no autograd formula (the pass rewrites inference graphs only).
_LIB = torch.library.Library("qlinear_pass", "FRAGMENT")
_LIB.define("linear(Tensor x, Tensor?[] params, Tensor? bias, str kernel, str spec) -> Tensor")
_LIB.define("linear_group(Tensor x, Tensor?[] params, Tensor?[] biases, str kernel, str specs) -> Tensor[]")


def linear(
    x: torch.Tensor,
    params: list[Optional[torch.Tensor]],
    bias: Optional[torch.Tensor],
    kernel: str,
    spec: str,
) -> torch.Tensor:
    """``qlinear_pass::linear``: the layer ``spec`` (JSON) on the kernel or per-M plan ``kernel``."""
    h = handle(kernel, spec)
    name, k = h.pick(x)
    s = h.spec
    CALLS[name] += 1
    out = k.run(s, x, params, bias)
    if out.shape[-1] != s.n or out.dtype != s.out_dtype:
        raise RuntimeError(f"kernel {name} returned {tuple(out.shape)} {out.dtype}, expected [..., {s.n}] {s.out_dtype}")
    return out


_LIB.impl("linear", linear, "CompositeExplicitAutograd")


@torch.library.register_fake("qlinear_pass::linear", lib=_LIB)
def _(x, params, bias, kernel, spec):
    s = handle(kernel, spec).spec
    return x.new_empty((*x.shape[:-1], s.n), dtype=s.out_dtype)


class GroupHandle(Handle):
    """A ``linear_group`` call site: the plan and its layers' specs."""

    __slots__ = ("specs",)

    def __init__(self, kernel: str, specs: str) -> None:
        texts = json.loads(specs)
        super().__init__(kernel, texts[0])
        self.specs = tuple(LayerSpec.from_json(t) for t in texts)


def linear_group(
    x: torch.Tensor,
    params: list[Optional[torch.Tensor]],
    biases: list[Optional[torch.Tensor]],
    kernel: str,
    specs: str,
) -> list[torch.Tensor]:
    """Layers that read the same activation ``x``, run by one kernel (``Kernel.run_group``): one
    output per layer.  ``params`` holds each layer's parameters in turn (the same count each);
    ``specs`` is a JSON list of the layers' specs."""
    return _run_layers(kernel, specs, x, params, lambda k, layers, chunks: k.run_group(layers, x, chunks, biases))


def _run_layers(kernel: str, specs: str, x: torch.Tensor, params: list, call) -> list[torch.Tensor]:
    """The layers ``specs`` on the kernel the plan picks for ``x``: ``call(kernel, layer specs,
    each layer's parameters)``, its outputs checked against the specs."""
    h = handle(kernel, specs, GroupHandle)
    name, k = h.pick(x)
    per = len(params) // len(h.specs)
    chunks = [params[i * per:(i + 1) * per] for i in range(len(h.specs))]
    CALLS[name] += len(h.specs)
    outs = call(k, h.specs, chunks)
    for s, out in zip(h.specs, outs):
        if out.shape[-1] != s.n or out.dtype != s.out_dtype:
            raise RuntimeError(f"kernel {name} returned {tuple(out.shape)} {out.dtype} for {s.module or s.short()}, "
                               f"expected [..., {s.n}] {s.out_dtype}")
    return list(outs)


_LIB.impl("linear_group", linear_group, "CompositeExplicitAutograd")


@torch.library.register_fake("qlinear_pass::linear_group", lib=_LIB)
def _(x, params, biases, kernel, specs):
    return [x.new_empty((*x.shape[:-1], s.n), dtype=s.out_dtype) for s in handle(kernel, specs, GroupHandle).specs]


_LIB.define("linear_fused(Tensor x, Tensor? x2, Tensor?[] params, Tensor?[] biases, Tensor?[] residuals, "
            "Tensor? norm_weight, float eps, str prologue, str kernel, str specs) -> Tensor[]")


def linear_fused(
    x: torch.Tensor,
    x2: Optional[torch.Tensor],
    params: list[Optional[torch.Tensor]],
    biases: list[Optional[torch.Tensor]],
    residuals: list[Optional[torch.Tensor]],
    norm_weight: Optional[torch.Tensor],
    eps: float,
    prologue: str,
    kernel: str,
    specs: str,
) -> list[torch.Tensor]:
    """``linear_group`` of the layers ``specs`` on the activation that ``prologue`` makes of ``x``
    ("rmsnorm": ``norm_weight * rmsnorm(x, eps)``; "silu_mul": ``silu(x) * x2``; "": x itself), each
    output plus its residual (or None): ``Kernel.run_fused``, see ``fusion.py``."""
    fused = fusion.Fused(prologue, x2, norm_weight, eps, residuals)
    return _run_layers(kernel, specs, x, params, lambda k, layers, chunks: k.run_fused(layers, x, chunks, biases, fused))


_LIB.impl("linear_fused", linear_fused, "CompositeExplicitAutograd")


@torch.library.register_fake("qlinear_pass::linear_fused", lib=_LIB)
def _(x, x2, params, biases, residuals, norm_weight, eps, prologue, kernel, specs):
    return [x.new_empty((*x.shape[:-1], s.n), dtype=s.out_dtype) for s in handle(kernel, specs, GroupHandle).specs]


# A w4a16 layer that holds its weight in the MMA-fragment layout (``kernels/int4_layout.py``) hands
# it to the model as the public bytes through this op: one node the pattern matcher recognises
# (``patterns.common.build_match`` hands the kernels the packed tensor itself), and the reference
# math everywhere else.
_LIB.define("int4_from_mma16(Tensor packed) -> Tensor")
_LIB.impl("int4_from_mma16", int4_layout.from_mma16, "CompositeExplicitAutograd")


@torch.library.register_fake("qlinear_pass::int4_from_mma16", lib=_LIB)
def _(packed):
    n, k = int4_layout.shape_of(packed)
    return packed.new_empty((n, k // 2))


#: the op above, as it appears in a post-grad graph
FROM_MMA16 = torch.ops.qlinear_pass.int4_from_mma16.default


def call(kernel: str, spec: LayerSpec, x: torch.Tensor, params, bias=None) -> torch.Tensor:
    """Run ``kernel`` through the op (what a compiled graph does), e.g. from tests."""
    return torch.ops.qlinear_pass.linear(x, list(params), bias, kernel, spec.to_json())


def quantize_activation(scheme: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dynamic activation's quantization for a kernel running behind the op: ``(x_q, scale)``.

    Per-token and per-group scales come from our one-kernel Triton quantizer where Triton can run
    (a GPU, or its interpreter); otherwise, and for per-tensor scales, from the scheme's torch code.
    """
    s = S.get_scheme(scheme)
    triton_runs = x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if s.act_granularity != "tensor" and triton_runs and importlib.util.find_spec("triton") is not None:
        from . import triton_gemm as T

        return T.quantize_activation(x, s.act_dtype, group=S.BLOCK if s.act_granularity == "group" else 0)
    return S.quantize_activation(s, x)


def mn_major_scales(scale: torch.Tensor) -> torch.Tensor:
    """``[M, G]`` per-group activation scales stored MN-major: a contiguous float32 ``[G, M4]``
    tensor, M4 = M rounded up to a multiple of 4 (16-byte rows, as TMA loads them), the pad zero.

    The block-scaled GEMMs on Hopper (ours in CUTLASS, FlashInfer's) read a tile's scales as one
    contiguous column; ``out[:, :M].t()`` is the ``[M, G]`` view of the same values.  A ``scale``
    that already is such a view (strides ``(1, M4)`` over a float32 ``[G, M4]`` buffer, which
    ``emit.mn_major_scale_view`` has the compiled graph write) is returned as that buffer, uncopied:
    a prefill calls this hundreds of times, and the copy cost host time on every call.
    """
    m, groups = scale.shape
    m4 = -(-m // 4) * 4
    if (scale.dtype == torch.float32 and scale.stride() == (1, m4) and scale.storage_offset() == 0
            and scale.untyped_storage().nbytes() >= groups * m4 * 4):
        return scale.as_strided((groups, m4), (m4, 1))
    out = torch.empty((groups, m4), device=scale.device, dtype=torch.float32)
    out[:, :m] = scale.t()
    if m4 != m:
        out[:, m:] = 0
    return out
