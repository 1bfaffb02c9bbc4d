"""Calling the 8-bit-weight decode kernel (``kernels/cuda/w8a8_decode.cu``) from Python.

``w8a8_decode_group(xq, sx, layers, out_dtype)`` runs one or more layers that read the same
quantized activation (a transformer's q/k/v, gate/up) in as few launches as the kernel's segments
allow; ``w8a8_decode`` is the one-layer form.  Weights and activation are fp8 e4m3 or int8 (both
the same), [N, K] and [M, K]; the weight scale is one per channel or one per tensor, the
activation scale one per token or one per tensor (fp32; others are converted per call).

``w8a16_decode_group(x, layers)`` / ``w8a16_decode``: the weight-only form, the same weights and
weight scales with a bf16 / fp16 activation [M, K], which is also the output's dtype.

``fp8_block_decode_group(x, layers)`` / ``fp8_block_decode``: ``fp8_block``, e4m3 weights with a
scale per 128x128 block ([ceil(N/128), K/128]) and a bf16 / fp16 activation that the kernel
quantizes to e4m3 per 1x128 group as the scheme does; the output in the activation's dtype.
``fp8_block_q_decode_group(xq, sx, layers, out_dtype)`` / ``fp8_block_q_decode``: the same with the
activation already quantized (e4m3 [M, K] and fp32 scales [M, K/128]), as a compiled graph hands
it on above 8 tokens (``backends.cuda.CudaW8A8.takes_quantized_activation``).

Any M is computed (more CTAs along M), but the kernel is made for M <= 16: each CTA reads its
weight rows once per 16 tokens.

Fused around the product (``fusion.py`` has the reference of each), as in :mod:`.cuda_w4a16`:
every form takes ``residuals`` (one [M, N_i] tensor in the output dtype or None a layer), added to
the outputs as they are stored; the forms with a 16-bit activation (weight-only and
``fp8_block_decode``) also take a ``prologue`` with one token (M = 1, K <= 32768): "rmsnorm" makes
the activation ``norm_weight * rmsnorm(x, eps)`` before the kernel's first tile, "silu_mul" ``silu(x)
* x2``.

Programmatic dependent launch as in :mod:`.cuda_w4a16` (``pdl``, :func:`.cuda_w4a16.pdl_for`): the
kernel copies its first chunks' weights before the kernel ahead of it has finished.
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple, Optional, Sequence

import torch

from . import cuda_build
from .cuda_w4a16 import (PROLOGUES, aligned, pdl_for, prologue_operands, residual_operands, row_tiles_for,
                         wide_tiles_fill_better)
from .cuda_w4a16 import why_not_prologue as _why_not_prologue

#: the layers one launch serves (the kernel's MAX_SEGMENTS)
MAX_SEGMENTS = 3
#: the kernel's ABI_VERSION (Params and Segment as declared below)
ABI_VERSION = 5
ELEMS = {torch.float8_e4m3fn: 0, torch.int8: 1}
OUT_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
#: the weight-only form's activations (and outputs)
ACT_DTYPES = {torch.bfloat16: 0, torch.float16: 1}


class Layer(NamedTuple):
    """One layer: weight [N, K] (fp8 e4m3 or int8), its scale ([N], [N, 1] or one value; fp8_block:
    [ceil(N/128), K/128]), bias [N] or None."""

    w: torch.Tensor
    sw: torch.Tensor
    bias: Optional[torch.Tensor] = None


class _Segment(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("sw", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("res", ctypes.c_void_p), ("w_stride", ctypes.c_longlong), ("sw_stride", ctypes.c_longlong),
                ("out_stride", ctypes.c_longlong), ("res_stride", ctypes.c_longlong), ("n", ctypes.c_int),
                ("tiles", ctypes.c_int)]


class _Params(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("sx", ctypes.c_void_p), ("x_stride", ctypes.c_longlong),
                ("sx_stride", ctypes.c_longlong), ("m", ctypes.c_int), ("k", ctypes.c_int), ("nseg", ctypes.c_int),
                ("total_tiles", ctypes.c_int), ("prologue", ctypes.c_int), ("eps", ctypes.c_float),
                ("x2", ctypes.c_void_p), ("norm_w", ctypes.c_void_p), ("seg", _Segment * MAX_SEGMENTS)]


def check_k(k: int) -> str:
    """Why the kernel cannot run this K ("" when it can)."""
    return "" if k % 128 == 0 else f"the 8-bit-weight decode kernel walks K in chunks of 128 (K={k})"


#: the largest K a prologue takes (the kernel's PRO_MAX_K: the activation row stays in shared memory)
PROLOGUE_MAX_K = 32768


def why_not_prologue(prologue: str, m: Optional[int], k: int) -> str:
    """Why the forms with a 16-bit activation cannot make it by ``prologue`` ("rmsnorm",
    "silu_mul") as they load it ("" when they can): one token (M = 1), K up to 32768."""
    return _why_not_prologue(prologue, m, k, PROLOGUE_MAX_K)


def _library(device: torch.device) -> ctypes.CDLL:
    return cuda_build.library_for("w8a8_decode", device, prepare)


def prepare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Check that a built library matches this module's structs and declare its functions (once)."""
    return cuda_build.bind(lib, "w8a8", _Params, MAX_SEGMENTS, ABI_VERSION, [ctypes.c_int] * 5,
                           also=("w8a16", "fp8_block", "fp8_block_q"))


def warps_for(m: int, tiles: int, sms: int) -> int:
    """Warps a CTA: 4 for up to 16 tokens where the row tiles are at least two per SM, else 8.
    H200, int8 weight-only, us with 8 / 4 warps at M = 1 and at M = 8
    (benchmarks/results/h200/decode/cuda_warps; fp8 weight-only, fp8_rowwise and fp8_block alike):
    N = 28672 35.3 / 32.7 and 35.7 / 33.3, N = 14336 19.1 / 17.9 and 19.3 / 18.3 (896 and 448 tiles of
    32 rows); N = 6144 10.7 / 10.8 (192); K = 14336, N = 4096 18.4 / 25.3 (128); N = 1024 5.4 / 7.4.
    At M = 16 (.../decode/cuda_w8a16/warps16/confirm, 32-row tiles): N = 14336 int8 / fp8 weight-only
    26.6 / 25.6 against 23.1 / 22.2, fp8_block 24.3 / 21.0, fp8_rowwise 21.8 / 20.4; N = 28672
    (gate/up) int8 weight-only 44.8 / 45.6, fp8_block 40.6 / 37.8, int8_rowwise 36.6 / 33.3.  Above
    16 tokens (several CTAs along M) not measured: 8."""
    return 4 if m <= 16 and tiles >= 2 * sms else 8


def w8_row_tiles(m: int, n_total: int, sms: int, block: bool = False) -> int:
    """16-row tiles a warp: ``row_tiles_for``'s 1 or 2, but above 8 tokens

    * 3 (48 channels a tile) with a scale per channel or per tensor where 32-row tiles fill under 80%
      of the SMs' last round and 48-row ones at least 90% (one CTA of 16 tokens an SM): q/k/v
      together, N = 6144, take 128 tiles of 48 rows for one round where 192 of 32 take two;
    * for fp8_block (``block``: its tiles stay inside 128x128 weight blocks, so never 48 rows), up
      to 16 tokens, 1 where 16-row tiles make two an SM and 32-row ones do not, so the CTAs take 4
      warps (:func:`warps_for`): H200, M = 16, q/k/v 13.0 us in 32-row tiles of 8 warps, 10.9 in
      16-row tiles of 4 (benchmarks/results/h200/decode/cuda_w8a16/warps16/confirm)."""
    rows = row_tiles_for(m, n_total, sms)
    if m <= 8 or rows != 2:
        return rows
    if block:
        return 1 if warps_for(m, -(-n_total // 16), sms) == 4 != warps_for(m, -(-n_total // 32), sms) else rows
    return 3 if wide_tiles_fill_better(n_total, sms) else rows


def _scale(s: torch.Tensor, count: int, what: str) -> tuple[torch.Tensor, int]:
    """A scale as fp32 values the kernel indexes with stride 1 (``count`` of them) or 0 (one)."""
    if s.numel() == 1:
        return s.reshape(1).float(), 0
    if s.numel() != count or (s.dim() == 2 and 1 not in s.shape) or s.dim() > 2:
        raise ValueError(f"{what} of shape {tuple(s.shape)}: expected one value or {count}")
    return s.reshape(count).float().contiguous(), 1


def _block_scale(s: torch.Tensor, n: int, k: int, what: str) -> tuple[torch.Tensor, int]:
    """A 128x128-block weight scale [ceil(N/128), K/128] as fp32 rows of unit stride."""
    want = (-(-n // 128), k // 128)
    if tuple(s.shape) != want:
        raise ValueError(f"{what} of shape {tuple(s.shape)}: expected [ceil(N/128), K/128] = {list(want)}")
    s = s.float()
    if s.stride(-1) != 1:
        s = s.contiguous()
    return s, s.stride(0)


def _layers(x: torch.Tensor, layers: Sequence[Layer], weight_dtype: torch.dtype, out_dtype: torch.dtype,
            block: bool = False) -> tuple[list, bool]:
    """Each layer checked against the activation ``x`` [M, K] and made ready for the kernel:
    (weight, fp32 scale, its stride, bias in ``out_dtype`` or None, N); ``block``: the scale is per
    128x128 block.  Also whether a weight was copied here (no early weight reads then)."""
    k = x.shape[1]
    prepared = []
    for i, layer in enumerate(layers):
        n = layer.w.shape[0]
        if layer.w.dtype != weight_dtype or tuple(layer.w.shape) != (n, k):
            raise ValueError(f"layer {i}: the weight must be {weight_dtype} [N, K] = [{n}, {k}], got "
                             f"{layer.w.dtype} {tuple(layer.w.shape)}")
        if layer.bias is not None and tuple(layer.bias.shape) != (n,):
            raise ValueError(f"layer {i}: bias of shape {tuple(layer.bias.shape)}, expected [{n}]")
        elsewhere = [t.device for t in layer if t is not None and t.device != x.device]
        if elsewhere:
            raise ValueError(f"layer {i}: its tensors are on {elsewhere[0]}, the activation on {x.device}")
        what = f"layer {i}: the weight scale"
        sw, sw_stride = _block_scale(layer.sw, n, k, what) if block else _scale(layer.sw, n, what)
        bias = layer.bias.to(out_dtype).contiguous() if layer.bias is not None else None
        prepared.append((aligned(layer.w, 16, 16), sw, sw_stride, bias, n))
    return prepared, any(p[0] is not layer.w for p, layer in zip(prepared, layers))


class _Fused(NamedTuple):
    """What a launch runs around the product: the prologue ("" none) with its operands as
    :func:`.cuda_w4a16.prologue_operands` made them, and one residual or None a layer."""

    prologue: str = ""
    x2: Optional[torch.Tensor] = None
    norm_weight: Optional[torch.Tensor] = None
    eps: float = 0.0
    residuals: Optional[Sequence[Optional[torch.Tensor]]] = None


def _fused(x: torch.Tensor, what: str, prologue: str = "", x2: Optional[torch.Tensor] = None,
           norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
           residuals: Optional[Sequence[Optional[torch.Tensor]]] = None) -> _Fused:
    """The fused arguments of a form with a 16-bit activation ``x``, checked (``what`` names the form)."""
    x2, norm_weight = prologue_operands(x, prologue, x2, norm_weight, f"{what} decode", PROLOGUE_MAX_K)
    return _Fused(prologue, x2, norm_weight, eps, residuals)


def _launch(entry: str, x: torch.Tensor, sx: Optional[torch.Tensor], sx_stride: int, layers: tuple[list, bool],
            elem: int, dtype_code: int, out_dtype: torch.dtype, row_tiles: Optional[int],
            warps: Optional[int], pdl: Optional[bool], fused: _Fused = _Fused()) -> list[torch.Tensor]:
    """Run ``qlp_<entry>_decode`` over the prepared layers (what :func:`_layers` returns), MAX_SEGMENTS
    a launch: their outputs.  ``row_tiles``, ``warps`` and ``pdl`` default to :func:`w8_row_tiles`,
    :func:`warps_for` and ``pdl_for``'s rule; ``fused``: the prologue and residuals."""
    prepared, converted = layers
    m, k = x.shape
    if warps is not None and warps not in (4, 8):
        raise ValueError(f"warps a CTA: 8 or 4; got {warps}")
    outs = [torch.empty((m, n), device=x.device, dtype=out_dtype) for *_, n in prepared]
    res = residual_operands(fused.residuals, m, [n for *_, n in prepared], out_dtype, x.device)
    if m == 0 or not prepared:
        return outs
    lib = _library(x.device)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    if row_tiles is None:
        row_tiles = w8_row_tiles(m, sum(n for *_, n in prepared), sms, block=entry.startswith("fp8_block"))
    rows = 16 * row_tiles
    err = ctypes.create_string_buffer(256)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    run = getattr(lib, f"qlp_{entry}_decode")
    early = int(pdl_for(pdl, x.device, converted))
    with torch.cuda.device(x.device):
        for first in range(0, len(prepared), MAX_SEGMENTS):
            batch = range(first, min(first + MAX_SEGMENTS, len(prepared)))
            p = _Params()
            p.x, p.x_stride = x.data_ptr(), x.stride(0)
            p.sx, p.sx_stride = (sx.data_ptr(), sx_stride) if sx is not None else (None, 0)
            p.m, p.k, p.nseg = m, k, len(batch)
            p.prologue, p.eps = PROLOGUES[fused.prologue], fused.eps
            p.x2 = fused.x2.data_ptr() if fused.x2 is not None else None
            p.norm_w = fused.norm_weight.data_ptr() if fused.norm_weight is not None else None
            for j, i in enumerate(batch):
                w, sw, sw_stride, bias, n = prepared[i]
                seg = p.seg[j]
                seg.w, seg.sw, seg.out = w.data_ptr(), sw.data_ptr(), outs[i].data_ptr()
                seg.bias = bias.data_ptr() if bias is not None else None
                seg.w_stride, seg.sw_stride, seg.out_stride = w.stride(0), sw_stride, outs[i].stride(0)
                seg.res = res[i].data_ptr() if res[i] is not None else None
                seg.res_stride = res[i].stride(0) if res[i] is not None else 0
                seg.n, seg.tiles = n, -(-n // rows)
            p.total_tiles = sum(p.seg[j].tiles for j in range(len(batch)))
            w = warps if warps is not None else warps_for(m, p.total_tiles, sms)
            if run(ctypes.byref(p), elem, dtype_code, row_tiles, w, early, stream, err, len(err)):
                raise RuntimeError(f"the {entry} decode kernel failed: {err.value.decode(errors='replace')}")
    return outs


def _check_activation(x: torch.Tensor, what: str, **fused) -> _Fused:
    """The activation checked for the ``what`` form, with the ``fused`` arguments of a 16-bit one."""
    if x.dim() != 2:
        raise ValueError(f"the activation must be 2-D [M, K], got shape {tuple(x.shape)}")
    extra = _fused(x, what, **fused)
    if x.device.type != "cuda":
        raise ValueError(f"the {what} decode kernel runs on a CUDA GPU, not {x.device}")
    why = check_k(x.shape[1])
    if why:
        raise ValueError(why)
    return extra


def w8a8_decode_group(xq: torch.Tensor, sx: torch.Tensor, layers: Sequence[Layer], out_dtype: torch.dtype,
                      row_tiles: Optional[int] = None, warps: Optional[int] = None, pdl: Optional[bool] = None, *,
                      residuals: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list[torch.Tensor]:
    """``xq`` [M, K] (fp8 e4m3 or int8) with scales ``sx`` times each layer's weight -> [M, N_i] each, in
    ``out_dtype`` (plus ``residuals``, see the module's docstring)."""
    if xq.dim() == 2 and xq.dtype not in ELEMS:
        raise ValueError(f"the W8A8 decode kernel takes an fp8 e4m3 or int8 activation, not {xq.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"the W8A8 decode kernel writes bf16, fp16 or fp32, not {out_dtype}")
    _check_activation(xq, "W8A8")
    sx, sx_stride = _scale(sx, xq.shape[0], "the activation scale")
    if sx.device != xq.device:
        raise ValueError(f"the activation scale is on {sx.device}, the activation on {xq.device}")
    ready = _layers(xq, layers, xq.dtype, out_dtype)
    return _launch("w8a8", aligned(xq, 16, 16), sx, sx_stride, ready, ELEMS[xq.dtype], OUT_DTYPES[out_dtype],
                   out_dtype, row_tiles, warps, pdl, _Fused(residuals=residuals))


def w8a8_decode(xq: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, bias: Optional[torch.Tensor],
                out_dtype: torch.dtype, row_tiles: Optional[int] = None, warps: Optional[int] = None,
                pdl: Optional[bool] = None) -> torch.Tensor:
    """One layer: ``xq`` [M, K] times the weight ``w`` [N, K] -> [M, N] in ``out_dtype``."""
    return w8a8_decode_group(xq, sx, [Layer(w, sw, bias)], out_dtype, row_tiles, warps, pdl)[0]


def w8a16_decode_group(x: torch.Tensor, layers: Sequence[Layer], row_tiles: Optional[int] = None,
                       warps: Optional[int] = None, pdl: Optional[bool] = None, **fused) -> list[torch.Tensor]:
    """The weight-only form: ``x`` [M, K] (bf16 / fp16) times each layer's 8-bit weight (all fp8 e4m3
    or all int8) and its scale -> [M, N_i] each, in ``x``'s dtype.  ``fused``: ``prologue``, ``x2``,
    ``norm_weight``, ``eps``, ``residuals`` (see the module's docstring)."""
    if x.dim() == 2 and x.dtype not in ACT_DTYPES:
        raise ValueError(f"the W8A16 decode kernel takes a bf16 or fp16 activation, not {x.dtype}")
    extra = _check_activation(x, "W8A16", **fused)
    if not layers:
        return []
    weight_dtype = layers[0].w.dtype
    if weight_dtype not in ELEMS:
        raise ValueError(f"the W8A16 decode kernel takes fp8 e4m3 or int8 weights, not {weight_dtype}")
    ready = _layers(x, layers, weight_dtype, x.dtype)
    # 16-byte pieces of 16-bit values: rows a multiple of 8 elements apart
    return _launch("w8a16", aligned(x, 16, 8), None, 0, ready, ELEMS[weight_dtype], ACT_DTYPES[x.dtype], x.dtype,
                   row_tiles, warps, pdl, extra)


def w8a16_decode(x: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, bias: Optional[torch.Tensor],
                 row_tiles: Optional[int] = None, warps: Optional[int] = None, pdl: Optional[bool] = None) -> torch.Tensor:
    """One weight-only layer: ``x`` [M, K] times the weight ``w`` [N, K] -> [M, N] in ``x``'s dtype."""
    return w8a16_decode_group(x, [Layer(w, sw, bias)], row_tiles, warps, pdl)[0]


def fp8_block_decode_group(x: torch.Tensor, layers: Sequence[Layer], row_tiles: Optional[int] = None,
                           warps: Optional[int] = None, pdl: Optional[bool] = None, **fused) -> list[torch.Tensor]:
    """``fp8_block``: ``x`` [M, K] (bf16 / fp16; quantized inside the kernel per 1x128 group) times each
    layer's e4m3 weight with its 128x128-block scale -> [M, N_i] each, in ``x``'s dtype.  ``fused``: as
    :func:`w8a16_decode_group`'s (a prologue makes the activation before it is quantized)."""
    if x.dim() == 2 and x.dtype not in ACT_DTYPES:
        raise ValueError(f"the fp8_block decode kernel takes a bf16 or fp16 activation, not {x.dtype}")
    extra = _check_activation(x, "fp8_block", **fused)
    ready = _layers(x, layers, torch.float8_e4m3fn, x.dtype, block=True)
    return _launch("fp8_block", aligned(x, 16, 8), None, 0, ready, ELEMS[torch.float8_e4m3fn], ACT_DTYPES[x.dtype],
                   x.dtype, row_tiles, warps, pdl, extra)


def fp8_block_decode(x: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, bias: Optional[torch.Tensor],
                     row_tiles: Optional[int] = None, warps: Optional[int] = None, pdl: Optional[bool] = None) -> torch.Tensor:
    """One ``fp8_block`` layer: ``x`` [M, K] times ``w`` [N, K] -> [M, N] in ``x``'s dtype."""
    return fp8_block_decode_group(x, [Layer(w, sw, bias)], row_tiles, warps, pdl)[0]


def fp8_block_q_decode_group(xq: torch.Tensor, sx: torch.Tensor, layers: Sequence[Layer], out_dtype: torch.dtype,
                             row_tiles: Optional[int] = None, warps: Optional[int] = None, pdl: Optional[bool] = None,
                             *, residuals: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list[torch.Tensor]:
    """``fp8_block`` with the activation quantized before: ``xq`` [M, K] (fp8 e4m3) with its scales
    ``sx`` per 1x128 group ([M, K/128]) times each layer's e4m3 weight and 128x128-block scale ->
    [M, N_i] each, in ``out_dtype`` (plus ``residuals``, see the module's docstring)."""
    if xq.dim() == 2 and xq.dtype != torch.float8_e4m3fn:
        raise ValueError(f"the fp8_block decode kernel takes an fp8 e4m3 activation here, not {xq.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"the fp8_block decode kernel writes bf16, fp16 or fp32, not {out_dtype}")
    if xq.dim() == 2 and sx.numel() != xq.shape[0] * (xq.shape[1] // 128):
        raise ValueError(f"the activation scale of shape {tuple(sx.shape)}: expected one per 1x128 group, "
                         f"[M, K/128] = [{xq.shape[0]}, {xq.shape[1] // 128}]")
    _check_activation(xq, "fp8_block")
    m, k = xq.shape
    if sx.device != xq.device:
        raise ValueError(f"the activation scale is on {sx.device}, the activation on {xq.device}")
    sx = sx.reshape(m, k // 128).float()
    if sx.stride(1) != 1:
        sx = sx.contiguous()
    ready = _layers(xq, layers, torch.float8_e4m3fn, out_dtype, block=True)
    return _launch("fp8_block_q", aligned(xq, 16, 16), sx, sx.stride(0), ready, ELEMS[torch.float8_e4m3fn],
                   OUT_DTYPES[out_dtype], out_dtype, row_tiles, warps, pdl, _Fused(residuals=residuals))


def fp8_block_q_decode(xq: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, sw: torch.Tensor,
                       bias: Optional[torch.Tensor], out_dtype: torch.dtype, row_tiles: Optional[int] = None,
                       warps: Optional[int] = None, pdl: Optional[bool] = None) -> torch.Tensor:
    """One ``fp8_block`` layer with a quantized activation: ``xq`` [M, K] times ``w`` [N, K] -> [M, N]."""
    return fp8_block_q_decode_group(xq, sx, [Layer(w, sw, bias)], out_dtype, row_tiles, warps, pdl)[0]
