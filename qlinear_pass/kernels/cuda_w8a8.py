"""Calling the W8A8 decode kernel (``kernels/cuda/w8a8_decode.cu``) from Python.

``w8a8_decode_group(xq, sx, layers, out_dtype)`` runs one or more layers that read the same
quantized activation (a transformer's q/k/v, gate/up) in as few launches as the kernel's segments
allow; ``w8a8_decode`` is the one-layer form.  Weights and activation are fp8 e4m3 or int8 (both
the same), [N, K] and [M, K]; the weight scale is one per channel or one per tensor, the
activation scale one per token or one per tensor (fp32; others are converted per call).  Any M is
computed (more CTAs along M), but the kernel is made for M <= 16: each CTA reads its weight rows
once per 16 tokens.
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple, Optional, Sequence

import torch

from . import cuda_build
from .cuda_w4a16 import aligned, row_tiles_for

#: the layers one launch serves (the kernel's MAX_SEGMENTS)
MAX_SEGMENTS = 3
#: the kernel's ABI_VERSION (Params and Segment as declared below)
ABI_VERSION = 1
ELEMS = {torch.float8_e4m3fn: 0, torch.int8: 1}
OUT_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


class Layer(NamedTuple):
    """One layer: weight [N, K] (fp8 e4m3 or int8), its scale ([N], [N, 1] or one value), bias [N] or None."""

    w: torch.Tensor
    sw: torch.Tensor
    bias: Optional[torch.Tensor] = None


class _Segment(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("sw", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("w_stride", ctypes.c_longlong), ("sw_stride", ctypes.c_longlong), ("out_stride", ctypes.c_longlong),
                ("n", ctypes.c_int), ("tiles", ctypes.c_int)]


class _Params(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("sx", ctypes.c_void_p), ("x_stride", ctypes.c_longlong),
                ("sx_stride", ctypes.c_longlong), ("m", ctypes.c_int), ("k", ctypes.c_int), ("nseg", ctypes.c_int),
                ("total_tiles", ctypes.c_int), ("seg", _Segment * MAX_SEGMENTS)]


def check_k(k: int) -> str:
    """Why the kernel cannot run this K ("" when it can)."""
    return "" if k % 128 == 0 else f"the W8A8 decode kernel walks K in chunks of 128 (K={k})"


def _library(device: torch.device) -> ctypes.CDLL:
    return cuda_build.library_for("w8a8_decode", device, prepare)


def prepare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Check that a built library matches this module's structs and declare its functions (once)."""
    return cuda_build.bind(lib, "w8a8", _Params, MAX_SEGMENTS, ABI_VERSION, [ctypes.c_int, ctypes.c_int, ctypes.c_int])


def _scale(s: torch.Tensor, count: int, what: str) -> tuple[torch.Tensor, int]:
    """A scale as fp32 values the kernel indexes with stride 1 (``count`` of them) or 0 (one)."""
    if s.numel() == 1:
        return s.reshape(1).float(), 0
    if s.numel() != count or (s.dim() == 2 and 1 not in s.shape) or s.dim() > 2:
        raise ValueError(f"{what} of shape {tuple(s.shape)}: expected one value or {count}")
    return s.reshape(count).float().contiguous(), 1


def w8a8_decode_group(xq: torch.Tensor, sx: torch.Tensor, layers: Sequence[Layer], out_dtype: torch.dtype,
                      row_tiles: Optional[int] = None) -> list[torch.Tensor]:
    """``xq`` [M, K] (fp8 e4m3 or int8) with scales ``sx`` times each layer's weight -> [M, N_i] each, in ``out_dtype``."""
    if xq.dim() != 2:
        raise ValueError(f"the activation must be 2-D [M, K], got shape {tuple(xq.shape)}")
    if xq.dtype not in ELEMS:
        raise ValueError(f"the W8A8 decode kernel takes an fp8 e4m3 or int8 activation, not {xq.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"the W8A8 decode kernel writes bf16, fp16 or fp32, not {out_dtype}")
    if xq.device.type != "cuda":
        raise ValueError(f"the W8A8 decode kernel runs on a CUDA GPU, not {xq.device}")
    m, k = xq.shape
    why = check_k(k)
    if why:
        raise ValueError(why)
    sx, sx_stride = _scale(sx, m, "the activation scale")
    prepared = []
    for i, layer in enumerate(layers):
        n = layer.w.shape[0]
        if layer.w.dtype != xq.dtype or tuple(layer.w.shape) != (n, k):
            raise ValueError(f"layer {i}: the weight must be {xq.dtype} [N, K] = [{n}, {k}] like the activation, got "
                             f"{layer.w.dtype} {tuple(layer.w.shape)}")
        if layer.bias is not None and tuple(layer.bias.shape) != (n,):
            raise ValueError(f"layer {i}: bias of shape {tuple(layer.bias.shape)}, expected [{n}]")
        elsewhere = [t.device for t in (*layer, sx) if t is not None and t.device != xq.device]
        if elsewhere:
            raise ValueError(f"layer {i}: its tensors are on {elsewhere[0]}, the activation on {xq.device}")
        sw, sw_stride = _scale(layer.sw, n, f"layer {i}: the weight scale")
        bias = layer.bias.to(out_dtype).contiguous() if layer.bias is not None else None
        prepared.append((aligned(layer.w, 16, 16), sw, sw_stride, bias, n))
    outs = [torch.empty((m, n), device=xq.device, dtype=out_dtype) for *_, n in prepared]
    if m == 0 or not prepared:
        return outs
    xq = aligned(xq, 16, 16)
    lib = _library(xq.device)
    if row_tiles is None:
        row_tiles = row_tiles_for(m, sum(n for *_, n in prepared), torch.cuda.get_device_properties(xq.device).multi_processor_count)
    rows = 16 * row_tiles
    err = ctypes.create_string_buffer(256)
    stream = torch.cuda.current_stream(xq.device).cuda_stream
    with torch.cuda.device(xq.device):
        for first in range(0, len(prepared), MAX_SEGMENTS):
            batch = range(first, min(first + MAX_SEGMENTS, len(prepared)))
            p = _Params()
            p.x, p.sx, p.x_stride, p.sx_stride = xq.data_ptr(), sx.data_ptr(), xq.stride(0), sx_stride
            p.m, p.k, p.nseg = m, k, len(batch)
            for j, i in enumerate(batch):
                w, sw, sw_stride, bias, n = prepared[i]
                seg = p.seg[j]
                seg.w, seg.sw, seg.out = w.data_ptr(), sw.data_ptr(), outs[i].data_ptr()
                seg.bias = bias.data_ptr() if bias is not None else None
                seg.w_stride, seg.sw_stride, seg.out_stride = w.stride(0), sw_stride, outs[i].stride(0)
                seg.n, seg.tiles = n, -(-n // rows)
            p.total_tiles = sum(p.seg[j].tiles for j in range(len(batch)))
            if lib.qlp_w8a8_decode(ctypes.byref(p), ELEMS[xq.dtype], OUT_DTYPES[out_dtype], row_tiles, stream, err, len(err)):
                raise RuntimeError(f"the W8A8 decode kernel failed: {err.value.decode(errors='replace')}")
    return outs


def w8a8_decode(xq: torch.Tensor, sx: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, bias: Optional[torch.Tensor],
                out_dtype: torch.dtype, row_tiles: Optional[int] = None) -> torch.Tensor:
    """One layer: ``xq`` [M, K] times the weight ``w`` [N, K] -> [M, N] in ``out_dtype``."""
    return w8a8_decode_group(xq, sx, [Layer(w, sw, bias)], out_dtype, row_tiles)[0]
