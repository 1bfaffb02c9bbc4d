"""Calling the w4a16 decode kernel (``kernels/cuda/w4a16_decode.cu``) from Python.

``w4a16_decode_group(x, layers, group_size)`` runs one or more w4a16 layers that read the same
activation (a transformer's q/k/v, gate/up) in as few launches as the kernel's segments allow;
``w4a16_decode`` is the one-layer form.  Weights in the MMA-fragment layout of
:mod:`.int4_layout` ([N/16, K/16, 128] bytes, ``int4_layout.to_mma16`` of the public layout);
scales in fp32 (others are converted per call); zero points as uint8, or none (symmetric, zero
point 8).  Any M is computed (more CTAs along M), but the kernel is made for
M <= 16: each CTA reads its weight rows once per 16 tokens.

Launches above M = 1 captured into a CUDA graph with Inductor's programmatic dependent launch on
use it too where the GPU has it (sm90+): the kernel's CTAs start while the kernel before them
finishes and load their first weights, and read the activation only once that kernel is done
(:func:`pdl_for`).
"""
from __future__ import annotations

import ctypes
from typing import NamedTuple, Optional, Sequence

import torch

from . import cuda_build, int4_layout

#: the layers one launch serves (the kernel's MAX_SEGMENTS)
MAX_SEGMENTS = 3
#: the kernel's ABI_VERSION (Params and Segment as declared below)
ABI_VERSION = 8
DTYPES = {torch.bfloat16: 0, torch.float16: 1}
#: what the kernel may compute the activation from as it loads it, with one token (M = 1): the
#: kernel's Prologue values (``fusion.PROLOGUES`` names them)
PROLOGUES = {"": 0, "rmsnorm": 1, "silu_mul": 2}
#: the largest K a prologue takes (the activation row is loaded in one round)
PROLOGUE_MAX_K = 16384


class Layer(NamedTuple):
    """One layer: weight [N/16, K/16, 128] uint8 (MMA-fragment layout), scales [N, K/G], zero points [N, K/G]
    uint8 or None, bias [N] or None."""

    w: torch.Tensor
    s: torch.Tensor
    z: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None


class _Segment(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("z", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("res", ctypes.c_void_p), ("w_stride", ctypes.c_longlong),
                ("s_stride", ctypes.c_longlong), ("z_stride", ctypes.c_longlong), ("out_stride", ctypes.c_longlong),
                ("res_stride", ctypes.c_longlong), ("n", ctypes.c_int), ("tiles", ctypes.c_int)]


class _Params(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("x_stride", ctypes.c_longlong), ("m", ctypes.c_int), ("k", ctypes.c_int),
                ("group", ctypes.c_int), ("nseg", ctypes.c_int), ("total_tiles", ctypes.c_int),
                ("pdl", ctypes.c_int), ("prologue", ctypes.c_int), ("eps", ctypes.c_float), ("x2", ctypes.c_void_p),
                ("norm_w", ctypes.c_void_p), ("seg", _Segment * MAX_SEGMENTS)]


def check_group_size(k: int, group_size: int) -> str:
    """Why the kernel cannot run K with this group size ("" when it can)."""
    if group_size not in (32, 64, 128):  # a chunk of 128 k reads 128 / G scales of a row
        return f"the int4 decode kernel takes groups of 32, 64 or 128, not {group_size}"
    if k % 128:
        return f"the int4 decode kernel needs K divisible by 128 (K={k}, group {group_size})"
    return ""


def _library(device: torch.device) -> ctypes.CDLL:
    return cuda_build.library_for("w4a16_decode", device, prepare)


def prepare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Check that a built library matches this module's structs and declare its functions (once)."""
    return cuda_build.bind(lib, "w4a16", _Params, MAX_SEGMENTS, ABI_VERSION, [ctypes.c_int] * 4)


def row_tiles_for(m: int, n_total: int, sms: int) -> int:
    """16-row tiles per warp: 2 (tiles of 32 channels, the per-chunk work shared by twice the weight
    bytes) where that still leaves about one tile per SM, else 1.  H200, g128, us with 16 / 32-row
    tiles (benchmarks/results/h200/decode/cuda_w4a16): N = 14336 M = 1 21.1 / 15.4, M = 16 36.4 /
    27.5; N = 4096 (K = 14336) M = 1 16.0 / 14.8; N = 1024 M = 1 4.6 / 5.9."""
    return 2 if n_total // 32 >= 0.9 * sms else 1


def last_round_fill(tiles: int, sms: int) -> float:
    """How full the last round of a launch of ``tiles`` row tiles, one CTA an SM, leaves the SMs:
    the tiles over the rounds' room (1.0: every round full)."""
    return tiles / (-(-tiles // sms) * sms)


def wide_tiles_fill_better(n_total: int, sms: int) -> bool:
    """Whether 48-row tiles fill the SMs' last round at least 90% where 32-row ones fill under 80%
    (q/k/v together, N = 6144 on 132 SMs: 128 tiles of 48 rows for one round, 192 of 32 for two)."""
    return last_round_fill(-(-n_total // 32), sms) < 0.8 and last_round_fill(-(-n_total // 48), sms) >= 0.9


def w4a16_row_tiles(m: int, n_total: int, sms: int, prologue: str = "", group_size: int = 128) -> int:
    """:func:`row_tiles_for`, but where 32-row tiles would fill under 80% of the SMs' last round
    (``n_total / 32`` tiles over ``sms``) and 48-row ones fit one round at least 90% full
    (:func:`wide_tiles_fill_better`), 48-row tiles (3) at M = 2-8, and at M = 1 for groups of 128 or
    more; else at M = 1 16-row tiles unless the launch has a ``prologue`` (every CTA then reads the
    whole activation row and the norm's weights or SwiGLU's second half: twice the CTAs read twice
    those bytes).  q/k/v together (N = 6144, 192 tiles of 32 rows on 132 SMs, of which 60 hold two
    CTAs and finish 1.1 us after the others) take 128 tiles of 48 rows.  H200, us
    (benchmarks/results/h200/decode/cuda_w4a16/balance): q/k/v with its RMSNorm 7.05 in 48-row tiles
    against 7.7 in 32 (the layer's four calls 44.9 against 45.3); N = 6144 without a prologue, 48 / 16
    / 32-row tiles: g128 6.7 / 7.1 / 7.3, g128 with zero points 7.1 / 7.5 / 7.8, g32 8.4 / 8.1 / 8.8
    (so groups of 32 and 64 keep the 16-row rule).  Earlier (.../cuda_w4a16/trace): 7.9 us in 192
    tiles of 32 rows and 8 warps against 8.3 in 384 of 16 and 4 warps with the RMSNorm; g128 at M = 1
    with 16 / 32-row tiles (.../cuda_w4a16/rows): N = 14336 (448 tiles, 85% full) 14.2 / 12.1; N =
    4096 (K = 14336, 128 tiles) 11.8 / 11.0; with 32 / 48-row tiles (.../cuda_w4a16/rows48): N = 6144
    M = 8 8.7 / 7.7, M = 16 10.1 / 10.1 (16 tokens keep 32)."""
    rows = row_tiles_for(m, n_total, sms)
    if rows != 2 or m > 8:
        return rows
    if (m > 1 or group_size >= 128) and -(-n_total // 48) <= sms and wide_tiles_fill_better(n_total, sms):
        return 3
    if m == 1:
        return 1 if not prologue and last_round_fill(-(-n_total // 32), sms) < 0.8 else rows
    return rows


def why_not_prologue(prologue: str, m: Optional[int], k: int, max_k: Optional[int] = PROLOGUE_MAX_K) -> str:
    """Why the kernel cannot compute the activation by ``prologue`` ("rmsnorm", "silu_mul") as it
    loads it, for M tokens (None: not known) and this K ("" when it can).  ``max_k``: the largest K
    (None: any; the 8-bit kernels', ``cuda_w8a8.PROLOGUE_MAX_K``, is another)."""
    if prologue not in PROLOGUES or not prologue:
        return f"no prologue {prologue!r} (it has {', '.join(p for p in PROLOGUES if p)})"
    if m != 1:
        return f"runs {prologue} before the linear with one token (M = 1) only, not M = {m if m is not None else 'symbolic'}"
    if max_k is not None and k > max_k:
        return f"runs {prologue} before the linear up to K = {max_k}, not {k}"
    return ""


def warps_for(m: int, tiles: int, sms: int) -> int:
    """Warps a CTA: 4 for one token where the row tiles are at least two per SM (each warp then
    walks twice the chunks of a tile between the CTA's reductions, and twice the CTAs share an SM),
    else 8.  H200, g128, M = 1, us with 8 / 4 warps (benchmarks/results/h200/decode/cuda_w4a16/
    occupancy): N = 28672 25.1 / 22.8, N = 14336 14.0 / 12.9 (896 and 448 tiles of 32 rows); N = 6144
    8.4 / 8.3 (192); K = 14336, N = 4096 12.7 / 14.1 (128); N = 1024 4.1 / 4.4 (64 tiles of 16 rows)."""
    return 4 if m == 1 and tiles >= 2 * sms else 8


def pdl_for(pdl: Optional[bool], device: torch.device, converted: bool, one_token: bool = False) -> bool:
    """Launch with programmatic dependent launch?  The kernel then reads the layers' weights before
    the kernel ahead of it in the stream has finished, so never where this call has just written them
    (``converted``: a scale made fp32, a weight or zero points copied); else ``pdl`` where given
    (``False`` for a caller that writes the weights with a kernel right before).  By default while a
    CUDA graph is captured with Inductor's own programmatic dependent launch on
    (``torch._inductor.config.triton.enable_pdl``, ``TORCHINDUCTOR_ENABLE_PDL=1``): its kernels let
    the next one start early, and ours then load weights while the norm or SwiGLU before them
    finishes.  Behind kernels that do not (Inductor's default), the early start gains nothing, and the
    kernel's prologue for it (the first slots' activation by plain loads after the wait) measured
    2-10% slower at M = 1 than the plain one (H200, benchmarks/results/h200/decode/cuda_w4a16/pdl).
    Never by default for ``one_token`` (the w4a16 kernel at M = 1, which loads each warp's share of
    the activation row once): with it, a Llama-3-8B-shaped model decoded at batch 1 slower
    behind Inductor's programmatic dependent launch than with neither (2.11x against 2.22x bf16,
    benchmarks/results/h200/e2e/x_row).  Nor, for any of these kernels, by default behind our own
    launches (gate/up after o_proj, down_proj after gate/up, nothing in between): launched early
    there, a batch-1 step was 5-7% slower (benchmarks/results/h200/e2e/early_start), and with the
    next kernel let start only as each CTA exits, 9% slower (430.4 against 391.3 tok/s,
    benchmarks/results/h200/decode/cuda_w4a16/pdl_exit)."""
    if converted:
        return False
    if pdl is not None:
        return pdl
    if one_token or device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        return False
    import torch._inductor.config as inductor_config

    return bool(getattr(inductor_config.triton, "enable_pdl", False))


def aligned(t: torch.Tensor, align: int, row_multiple: int = 1) -> torch.Tensor:
    """``t`` (2-D) with unit stride along its rows, its start on an ``align``-byte boundary and a row
    stride that is a multiple of ``row_multiple`` elements; a copy where ``t`` is not."""
    if t.stride(-1) != 1 or t.data_ptr() % align or t.stride(0) % row_multiple:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _zero_points(z: torch.Tensor) -> torch.Tensor:
    """The kernel copies zero points in 4-byte words: rows start on 4-byte boundaries and hold a whole
    last word (a padded copy where they do not)."""
    groups = z.shape[1]
    if z.stride(-1) == 1 and z.data_ptr() % 4 == 0 and z.stride(0) % 4 == 0 and z.stride(0) >= -(-groups // 4) * 4:
        return z
    padded = torch.zeros((z.shape[0], -(-groups // 4) * 4), dtype=z.dtype, device=z.device)
    padded[:, :groups] = z
    return padded


def _prologue_operand(name: str, t: torch.Tensor, shape: tuple, x: torch.Tensor) -> torch.Tensor:
    if tuple(t.shape) != shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{name} must be {x.dtype} {list(shape)} on {x.device}, got {t.dtype} {list(t.shape)} on {t.device}")
    return aligned(t.reshape(1, -1) if t.dim() == 1 else t, 16, 8)


def prologue_operands(x: torch.Tensor, prologue: str, x2: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
                      kernel: str, max_k: Optional[int] = PROLOGUE_MAX_K) -> tuple:
    """A prologue's operands checked against the 2-D activation ``x`` (its dtype and device; rows on
    16-byte boundaries, a copy where not): (x2, norm_weight), None where the prologue takes none.
    ``kernel`` names the kernel in the errors, ``max_k`` as :func:`why_not_prologue`."""
    if not prologue:
        return None, None
    why = why_not_prologue(prologue, x.shape[0], x.shape[1], max_k)
    if why:
        raise ValueError(f"the {kernel} kernel {why}")
    if prologue == "rmsnorm":
        if norm_weight is None:
            raise ValueError("an rmsnorm prologue needs norm_weight")
        return None, _prologue_operand("norm_weight", norm_weight, (x.shape[1],), x)
    if x2 is None:
        raise ValueError("a silu_mul prologue needs x2 (the up half)")
    return _prologue_operand("x2", x2, tuple(x.shape), x), None


def residual_operands(residuals: Optional[Sequence[Optional[torch.Tensor]]], m: int, ns: Sequence[int],
                      dtype: torch.dtype, device: torch.device) -> list:
    """One residual a layer, [M, N_i] in the output ``dtype`` on ``device`` (unit stride along its rows,
    a copy where not), or None: what the kernels add to each output as they store it."""
    if residuals is None:
        return [None] * len(ns)
    if len(residuals) != len(ns):
        raise ValueError(f"one residual (or None) a layer: {len(residuals)} for {len(ns)} layers")
    out = []
    for i, (r, n) in enumerate(zip(residuals, ns)):
        if r is not None and (tuple(r.shape) != (m, n) or r.dtype != dtype or r.device != device):
            raise ValueError(f"layer {i}: the residual must be {dtype} [{m}, {n}] on {device}, "
                             f"got {r.dtype} {list(r.shape)} on {r.device}")
        out.append(r if r is None or r.stride(-1) == 1 else r.contiguous())
    return out


def w4a16_decode_group(x: torch.Tensor, layers: Sequence[Layer], group_size: int,
                       row_tiles: Optional[int] = None, warps: Optional[int] = None,
                       pdl: Optional[bool] = None, *, prologue: str = "", x2: Optional[torch.Tensor] = None,
                       norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0,
                       residuals: Optional[Sequence[Optional[torch.Tensor]]] = None) -> list[torch.Tensor]:
    """``x`` [M, K] (bf16 or fp16) times each layer's int4 weight -> one [M, N_i] output each, in x's dtype.
    ``row_tiles`` (1, 2, or 3 at M <= 8: 16, 32 or 48 channels a tile; 48 at M = 1 in CTAs of 8
    warps) and ``warps`` (8, or 4 at M = 1) default to :func:`w4a16_row_tiles` and
    :func:`warps_for`; ``pdl`` (programmatic dependent launch) to :func:`pdl_for`'s rule.

    Fused around the product (``fusion.py`` has the reference of each): ``prologue`` "rmsnorm" makes
    the activation ``norm_weight * rmsnorm(x, eps)`` as the kernel loads it, "silu_mul" makes it
    ``silu(x) * x2`` (M = 1 only, :func:`why_not_prologue`); ``residuals`` (one [M, N_i] tensor or
    None a layer) are added to the outputs as they are stored."""
    if x.dim() != 2:
        raise ValueError(f"the activation must be 2-D [M, K], got shape {tuple(x.shape)}")
    x2, norm_weight = prologue_operands(x, prologue, x2, norm_weight, "int4 decode")
    if residuals is not None and len(residuals) != len(layers):
        raise ValueError(f"one residual (or None) a layer: {len(residuals)} for {len(layers)} layers")
    if len({layer.z is None for layer in layers}) > 1:
        raise ValueError("the layers of one call must all have zero points or all have none")
    if warps is not None and warps not in (4, 8) or warps == 4 and x.shape[0] != 1:
        raise ValueError(f"warps a CTA: 8, or 4 for one token (M = 1); got {warps} at M = {x.shape[0]}")
    if row_tiles == 3 and warps == 4:
        raise ValueError("48-row tiles (row_tiles 3) run in CTAs of 8 warps, not 4")
    if x.dtype not in DTYPES:
        raise ValueError(f"the int4 decode kernel takes bf16 or fp16 activations, not {x.dtype}")
    if x.device.type != "cuda":
        raise ValueError(f"the int4 decode kernel runs on a CUDA GPU, not {x.device}")
    m, k = x.shape
    why = check_group_size(k, group_size)
    if why:
        raise ValueError(why)
    groups = k // group_size
    sub = 128 // min(group_size, 128)  # groups in a 128-wide chunk: the scales copied together
    prepared = []
    converted = False  # a tensor the kernel reads early was written by this call
    for i, layer in enumerate(layers):
        try:
            n, wk = int4_layout.shape_of(layer.w)
        except ValueError as e:
            raise ValueError(f"layer {i}: {e}") from None
        if wk != k:
            raise ValueError(f"layer {i}: the weight has K={wk}, the activation K={k}")
        if tuple(layer.s.shape) != (n, groups):
            raise ValueError(f"layer {i}: scales of shape {tuple(layer.s.shape)}, expected [{n}, {groups}]")
        if layer.z is not None and (layer.z.dtype != torch.uint8 or tuple(layer.z.shape) != (n, groups)):
            raise ValueError(f"layer {i}: zero points must be uint8 [{n}, {groups}], got {layer.z.dtype} {tuple(layer.z.shape)}")
        if layer.bias is not None and tuple(layer.bias.shape) != (n,):
            raise ValueError(f"layer {i}: bias of shape {tuple(layer.bias.shape)}, expected [{n}]")
        elsewhere = [t.device for t in layer if t is not None and t.device != x.device]
        if elsewhere:
            raise ValueError(f"layer {i}: its tensors are on {elsewhere[0]}, the activation on {x.device}")
        # fp32 scales (what quantize() and the checkpoint loaders make); others are converted per call
        s = aligned(layer.s.float(), 16, sub)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        w = layer.w if layer.w.stride()[1:] == (128, 1) and layer.w.data_ptr() % 16 == 0 and layer.w.stride(0) % 16 == 0 \
            else layer.w.clone(memory_format=torch.contiguous_format)
        z = _zero_points(layer.z) if layer.z is not None else None
        converted = converted or w is not layer.w or s is not layer.s or (z is not None and z is not layer.z)
        prepared.append((w, s, z, bias.contiguous() if bias is not None else None, n))
    outs = [torch.empty((m, n), device=x.device, dtype=x.dtype) for *_, n in prepared]
    res = residual_operands(residuals, m, [n for *_, n in prepared], x.dtype, x.device)
    if m == 0 or not prepared:
        return outs
    x = aligned(x, 16, 8)
    lib = _library(x.device)
    n_total = sum(n for *_, n in prepared)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    if row_tiles is None:
        row_tiles = w4a16_row_tiles(m, n_total, sms, prologue, group_size)
    rows = 16 * row_tiles
    err = ctypes.create_string_buffer(256)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    batches = [list(range(i, min(i + MAX_SEGMENTS, len(prepared)))) for i in range(0, len(prepared), MAX_SEGMENTS)]
    early = int(pdl_for(pdl, x.device, converted, one_token=m == 1))
    with torch.cuda.device(x.device):
        for batch in batches:
            p = _Params()
            p.x, p.x_stride, p.m, p.k, p.group = x.data_ptr(), x.stride(0), m, k, group_size
            p.prologue, p.eps = PROLOGUES[prologue], eps
            p.x2 = x2.data_ptr() if prologue == "silu_mul" else None
            p.norm_w = norm_weight.data_ptr() if prologue == "rmsnorm" else None
            p.nseg = len(batch)
            for j, i in enumerate(batch):
                w, s, z, bias, n = prepared[i]
                seg = p.seg[j]
                seg.w, seg.s, seg.out = w.data_ptr(), s.data_ptr(), outs[i].data_ptr()
                seg.z = z.data_ptr() if z is not None else None
                seg.bias = bias.data_ptr() if bias is not None else None
                seg.w_stride, seg.s_stride, seg.out_stride = w.stride(0), s.stride(0), outs[i].stride(0)
                seg.res = res[i].data_ptr() if res[i] is not None else None
                seg.res_stride = res[i].stride(0) if res[i] is not None else 0
                seg.z_stride = z.stride(0) if z is not None else 0
                seg.n, seg.tiles = n, -(-n // rows)
            p.total_tiles = sum(p.seg[j].tiles for j in range(len(batch)))
            w = warps if warps is not None else 8 if row_tiles == 3 else warps_for(m, p.total_tiles, sms)
            if prologue == "rmsnorm" and w == 4 and k > PROLOGUE_MAX_K // 2:
                w = 8  # the row's pieces in one round: 4 warps take K <= 8192
            if lib.qlp_w4a16_decode(ctypes.byref(p), DTYPES[x.dtype], row_tiles, w, early, stream, err, len(err)):
                raise RuntimeError(f"the int4 decode kernel failed: {err.value.decode(errors='replace')}")
    return outs


def w4a16_decode(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], group_size: int, row_tiles: Optional[int] = None,
                 warps: Optional[int] = None, pdl: Optional[bool] = None) -> torch.Tensor:
    """One layer: ``x`` [M, K] times the int4 weight ``w`` ([N/16, K/16, 128], MMA-fragment layout) ->
    [M, N] in x's dtype."""
    return w4a16_decode_group(x, [Layer(w, s, z, bias)], group_size, row_tiles, warps, pdl)[0]
