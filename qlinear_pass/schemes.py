"""Schemes: the math of each quantized linear, and its one float32 reference.

A scheme says how weights (and, for W8A8 schemes, activations) are quantized.
Every kernel of every backend is checked against :func:`reference`.

Canonical parameters (what kernels receive, in this order):

============== ============================ =====================================
scheme         weight                       scales (float32)
============== ============================ =====================================
fp8_tensor     [N, K] float8_e4m3fn         weight_scale []
fp8_rowwise    [N, K] float8_e4m3fn         weight_scale [N]
fp8_block      [N, K] float8_e4m3fn         weight_scale [ceil(N/128), K/128]
int8_rowwise   [N, K] int8                  weight_scale [N]
int8_weight_only [N, K] int8                weight_scale [N]
fp8_weight_only  [N, K] float8_e4m3fn       weight_scale [N]
w4a16          [N, K/2] uint8 (two int4 a   weight_scale [N, K/g], optional
               byte, low nibble = even k)   weight_zero [N, K/g] uint8 (0..15)
============== ============================ =====================================

Activations of W8A8 schemes are quantized dynamically: per tensor
(``fp8_tensor``), per token (``fp8_rowwise``, ``int8_rowwise``) or per 1x128
group (``fp8_block``), with ``scale = amax(|x|) / qmax``.  A layer may instead
receive an already-quantized activation and its scale (``input_scale``), as
user code calling ``torch._scaled_mm`` does.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from .config import SCHEMES, normalize_scheme

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
INT4_LEVELS = 15
BLOCK = 128
AMAX_EPS = 1e-12
GROUP_SIZES = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    #: storage dtype of the quantized weight
    weight_dtype: torch.dtype
    #: "tensor", "channel", "block" (128x128) or "group" (1 x group_size along K)
    weight_granularity: str
    #: activation quantization: None (weight-only), "tensor", "token" or "group" (1x128)
    act_granularity: Optional[str]
    #: activation storage dtype when quantized (None for weight-only)
    act_dtype: Optional[torch.dtype]
    description: str

    @property
    def weight_only(self) -> bool:
        return self.act_granularity is None

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.act_dtype == FP8 else INT8_MAX

    @property
    def param_names(self) -> tuple[str, ...]:
        if self.name == "w4a16":
            return ("weight", "weight_scale", "weight_zero")
        return ("weight", "weight_scale")


_SCHEMES = {
    s.name: s
    for s in (
        Scheme("fp8_tensor", FP8, "tensor", "tensor", FP8, "FP8 e4m3 weights and activations, one scale each"),
        Scheme("fp8_rowwise", FP8, "channel", "token", FP8, "FP8 e4m3, per-channel weight and dynamic per-token activation scales"),
        Scheme("fp8_block", FP8, "block", "group", FP8, "FP8 e4m3, 128x128 weight blocks and dynamic 1x128 activation groups"),
        Scheme("int8_rowwise", torch.int8, "channel", "token", torch.int8, "INT8, per-channel weight and dynamic per-token symmetric activation scales"),
        Scheme("int8_weight_only", torch.int8, "channel", None, None, "INT8 per-channel weights, activations stay in their dtype"),
        Scheme("fp8_weight_only", FP8, "channel", None, None, "FP8 e4m3 per-channel weights, activations stay in their dtype"),
        Scheme("w4a16", torch.uint8, "group", None, None, "INT4 group-wise weights (symmetric or with zero points), 16-bit activations"),
    )
}
assert tuple(_SCHEMES) == SCHEMES


def get_scheme(name: str) -> Scheme:
    return _SCHEMES[normalize_scheme(name)]


def all_schemes() -> tuple[Scheme, ...]:
    return tuple(_SCHEMES.values())


# --- weights -------------------------------------------------------------


def _fp8_cast(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _int8_cast(t: torch.Tensor) -> torch.Tensor:
    return t.round().clamp(-128, 127).to(torch.int8)


def quantize_weight(
    scheme: "str | Scheme", w: torch.Tensor, *, group_size: int = 128, zero_points: bool = False
) -> dict[str, Optional[torch.Tensor]]:
    """Quantize a float weight [N, K]: amax scales, round to nearest, saturate.

    Returns the canonical parameters (see the module docstring).
    """
    s = scheme if isinstance(scheme, Scheme) else get_scheme(scheme)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    w32 = w.detach().float()
    if s.name == "w4a16":
        return _quantize_int4(w32, group_size, zero_points)
    if s.weight_granularity == "tensor":
        scale = (w32.abs().amax().clamp_min(AMAX_EPS) / FP8_MAX).reshape(())
        return {"weight": _fp8_cast(w32 / scale), "weight_scale": scale}
    if s.weight_granularity == "block":
        if k % BLOCK:
            raise ValueError(f"fp8_block needs K to be a multiple of {BLOCK}, got K={k}")
        nb = -(-n // BLOCK)
        padded = torch.zeros(nb * BLOCK, k, dtype=torch.float32, device=w.device)
        padded[:n] = w32
        blocks = padded.reshape(nb, BLOCK, k // BLOCK, BLOCK)
        scale = blocks.abs().amax(dim=(1, 3)).clamp_min(AMAX_EPS) / FP8_MAX
        q = _fp8_cast(w32 / _expand_block(scale, n, k))
        return {"weight": q, "weight_scale": scale}
    # per output channel
    qmax = FP8_MAX if s.weight_dtype == FP8 else INT8_MAX
    scale = w32.abs().amax(dim=1).clamp_min(AMAX_EPS) / qmax
    cast = _fp8_cast if s.weight_dtype == FP8 else _int8_cast
    return {"weight": cast(w32 / scale[:, None]), "weight_scale": scale}


def _quantize_int4(w32: torch.Tensor, group_size: int, zero_points: bool) -> dict:
    n, k = w32.shape
    if group_size not in GROUP_SIZES:
        raise ValueError(f"w4a16 group size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"w4a16 needs K to be a multiple of the group size {group_size}, got K={k}")
    g = w32.reshape(n, k // group_size, group_size)
    if zero_points:
        lo = g.amin(-1).clamp(max=0.0)
        hi = g.amax(-1).clamp(min=0.0)
        scale = ((hi - lo) / INT4_LEVELS).clamp_min(AMAX_EPS)
        zero = (-lo / scale).round().clamp(0, INT4_LEVELS)
        q = (g / scale[..., None]).round() + zero[..., None]
        zero_t: Optional[torch.Tensor] = zero.to(torch.uint8)
    else:
        scale = g.abs().amax(-1).clamp_min(AMAX_EPS) / 7.0
        q = (g / scale[..., None]).round() + 8
        zero_t = None
    q = q.clamp(0, INT4_LEVELS).to(torch.uint8).reshape(n, k)
    return {"weight": pack_int4(q), "weight_scale": scale, "weight_zero": zero_t}


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, K/2] uint8, the even k in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even K, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] uint8 values 0..15."""
    lo = packed & 15
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _expand_block(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[ceil(N/128), ceil(K/128)] block scales -> [N, K]."""
    return scale.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]


def dequantize_weight(scheme: "str | Scheme", params: Sequence[Optional[torch.Tensor]], k: int) -> torch.Tensor:
    """Canonical parameters -> float32 weight [N, K]."""
    s = scheme if isinstance(scheme, Scheme) else get_scheme(scheme)
    w, scale = params[0], params[1]
    if s.name == "w4a16":
        zero = params[2] if len(params) > 2 else None
        n = w.shape[0]
        q = unpack_int4(w).float()
        groups = scale.shape[-1]
        z = zero.float() if zero is not None else 8.0
        if zero is not None:
            z = z[..., None]
        return ((q.reshape(n, groups, k // groups) - z) * scale.float()[..., None]).reshape(n, k)
    wf = w.float()
    if s.weight_granularity == "tensor":
        return wf * scale.float()
    if s.weight_granularity == "block":
        return wf * _expand_block(scale.float(), w.shape[0], k)
    return wf * scale.float().reshape(-1, 1)


# --- activations ---------------------------------------------------------


def quantize_activation(scheme: "str | Scheme", x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of a 2-D ``x`` [M, K]: ``(x_q, x_scale)``.

    x_scale is [] (tensor), [M, 1] (token) or [M, K/128] (group).  The
    constants are literals on purpose: under ``dynamic=True`` Dynamo turns a
    float read from an attribute or a global into a graph input, and a
    quantization with an unknown divisor can no longer be recognised.
    """
    s = scheme if isinstance(scheme, Scheme) else get_scheme(scheme)
    fp8 = s.act_dtype == FP8
    xf = x.float()
    m, k = xf.shape
    if s.act_granularity == "tensor":
        amax = xf.abs().amax().clamp_min(1e-12)
        scale = amax / 448.0 if fp8 else amax / 127.0
        xs = xf / scale
    elif s.act_granularity == "token":
        amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
        scale = amax / 448.0 if fp8 else amax / 127.0
        xs = xf / scale
    elif s.act_granularity == "group":
        g = xf.reshape(m, k // 128, 128)
        amax = g.abs().amax(dim=-1).clamp_min(1e-12)
        scale = amax / 448.0 if fp8 else amax / 127.0
        xs = (g / scale[..., None]).reshape(m, k)
    else:
        raise ValueError(f"scheme {s.name} has no activation quantization")
    if fp8:
        return xs.clamp(-448.0, 448.0).to(FP8), scale
    return xs.round().clamp(-128.0, 127.0).to(torch.int8), scale


def dequantize_activation(scheme: "str | Scheme", xq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scheme if isinstance(scheme, Scheme) else get_scheme(scheme)
    xf = xq.float()
    if s.act_granularity == "group":
        m, k = xf.shape
        return (xf.reshape(m, k // 128, 128) * scale.float()[..., None]).reshape(m, k)
    return xf * scale.float()


# --- the reference ---------------------------------------------------------


def reference(
    scheme: "str | Scheme",
    x: torch.Tensor,
    params: Sequence[Optional[torch.Tensor]],
    bias: Optional[torch.Tensor] = None,
    *,
    input_scale: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The float32 reference of ``scheme``: dequantise, matmul, add bias, cast.

    ``x`` has any leading dims and K last.  For W8A8 schemes ``x`` is either a
    float activation (quantized here dynamically) or, with ``input_scale``, an
    already-quantized one.  The output has ``x``'s dtype unless ``out_dtype``
    says otherwise (required when ``x`` is already quantized).
    """
    s = scheme if isinstance(scheme, Scheme) else get_scheme(scheme)
    k = x.shape[-1]
    lead = x.shape[:-1]
    if out_dtype is None:
        if not x.is_floating_point() or x.dtype == FP8:
            raise ValueError("reference() needs out_dtype when x is already quantized")
        out_dtype = x.dtype
    x2 = x.reshape(-1, k)
    if s.weight_only:
        xd = x2.float()
    else:
        if input_scale is None:
            xq, xs = quantize_activation(s, x2)
        else:
            xq, xs = x2, input_scale
        xd = dequantize_activation(s, xq, xs)
    wd = dequantize_weight(s, params, k)
    y = xd @ wd.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*lead, wd.shape[0])


#: Largest relative Frobenius error ``|out - ref| / |ref|`` a kernel may show,
#: by output dtype.  It covers the output rounding and the odd activation
#: value that a kernel's own quantization rounds to the neighbouring level.
TOLERANCE = {
    torch.float32: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float16: 4e-3,
}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out32, ref32 = out.float(), ref.float()
    if not torch.isfinite(out32).all():
        return float("inf")
    denom = ref32.norm().item()
    return (out32 - ref32).norm().item() / max(denom, 1e-30)


def weight_error_bound(scheme: "str | Scheme", w: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """An elementwise bound on |dequant(quant(w)) - w| (half a quantization step, fp8 relative)."""
    s = scheme if isinstance(scheme, Scheme) else get_scheme(scheme)
    w32 = w.float()
    n, k = w32.shape
    if s.name == "w4a16":
        g = w32.reshape(n, k // group_size, group_size)
        step = (g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)) / INT4_LEVELS
        step = torch.maximum(step, g.abs().amax(-1) / 7.0)
        return (step[..., None] * 0.5 + 1e-6).expand_as(g).reshape(n, k) * 1.01
    if s.weight_dtype == FP8:
        # e4m3: 3 mantissa bits -> relative half-ulp 2^-4; subnormal floor at scale * 2^-10
        scale = quantize_weight(s, w, group_size=group_size)["weight_scale"]
        return w32.abs() * 2.0**-4 + _scale_floor(s, scale, n, k)
    scale = w32.abs().amax(dim=1, keepdim=True) / INT8_MAX
    return scale * 0.5 + 1e-7


def _scale_floor(s: Scheme, scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    if s.weight_granularity == "tensor":
        full = scale.float().expand(n, k)
    elif s.weight_granularity == "block":
        full = _expand_block(scale.float(), n, k)
    else:
        full = scale.float().reshape(-1, 1).expand(n, k)
    return full * 2.0**-9
