"""Triton GEMMs for every scheme: W8A8 GEMMs, weight-only GEMMs, activation quantization.

Three kernels, each with compile-time modes (``tl.constexpr``), so one source
serves all schemes without branching at run time:

* ``_quant_act_kernel``: dynamic per-token / per-1x128-group quantization of
  a bf16/fp16/fp32 activation to FP8 e4m3 or INT8 (scale = amax / qmax).
* ``_w8a8_kernel``: FP8 or INT8 GEMM ``x_q @ w_q^T`` with fp32 (int32)
  accumulation; per-tensor, per-token x per-channel, or 1x128 x 128x128 block
  scales; bias and the cast in the epilogue.  Split-K (fp32 atomics into a
  zeroed buffer) keeps all SMs busy for decode shapes.  A dynamic activation
  is quantized by ``_quant_act_kernel`` first: quantizing inside the GEMM
  (each program finding its rows' amax in a first pass over K) measured
  slower on the H100 at M = 16 (88 us against 55 us, K=4096, N=28672),
  since every program re-reads the whole activation rows.
* ``_wo_kernel``: weight-only GEMM; int8 / fp8 per-channel or packed int4
  group-wise weights (zero points optional) dequantised in registers, a 16-bit
  tensor-core dot, split-K for small M.

M == 1 (and small M for some schemes) runs the decode kernel of
``triton_decode.py`` instead: one launch at the memory roofline.

The Python wrappers pick the path by M at run time, inside the custom op, so
one compiled graph serves prefill and decode.  Launch configurations come
from small per-M-bucket lists, autotuned once per (bucket, N, K) on Hopper.
"""
from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

# activation scale modes
A_TENSOR, A_TOKEN, A_GROUP = 1, 2, 3
# weight scale modes (group-wise int4 scales are applied inside the weight-only kernels)
W_TENSOR, W_CHANNEL, W_BLOCK = 1, 2, 3
# weight storage
W_INT8, W_FP8, W_INT4 = 0, 1, 2
#: packed int4 in the MMA-fragment layout of kernels/int4_layout.py ([N/16, K/16, 128] bytes): read by the
#: dequantising pass only
W_INT4_MMA16 = 3
# the same, readable inside kernels (a @jit function may only read constexpr globals)
_A_TENSOR = tl.constexpr(A_TENSOR)
_W_TENSOR, _W_BLOCK = tl.constexpr(W_TENSOR), tl.constexpr(W_BLOCK)
_W_INT4 = tl.constexpr(W_INT4)
_W_INT4_MMA16 = tl.constexpr(W_INT4_MMA16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    """The SM count of a CUDA device (read once per device); 132 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _autotune(configs, key, **kw):
    """``triton.autotune`` with results cached on disk where Triton supports it;
    under the interpreter only the first config (tuning there measures nothing)."""
    if interpreting():
        prune = kw.get("prune_configs_by", {}).get("early_config_prune")
        if prune is None:
            configs = configs[:1]
        else:
            kw["prune_configs_by"] = {"early_config_prune": lambda c, a, **k: prune(c, a, **k)[:1]}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kw["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **kw)


def _cfg(bm, bn, bk, warps, stages, split_k=1, group_m=8):
    """A launch configuration; ``split_k=None`` for kernels given SPLIT_K by their caller."""
    tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}
    if split_k is not None:
        tiles["SPLIT_K"] = split_k
    return triton.Config(tiles, num_warps=warps, num_stages=stages)


# --- activation quantization ------------------------------------------------------


@triton.jit
def _quant_act_kernel(X, Q, S, M, K, stride_xm, stride_qm, stride_sm,
                      QMAX: tl.constexpr, IS_INT8: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: per-token (GROUP == 0) or per-GROUP-wide group scales."""
    row = tl.program_id(0)
    x_row = X + row.to(tl.int64) * stride_xm
    q_row = Q + row.to(tl.int64) * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if GROUP == 0:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / QMAX
        tl.store(S + row.to(tl.int64) * stride_sm, scale)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            y = x / scale
            if IS_INT8:
                y = tl.minimum(tl.maximum(_round_half_even(y), -128.0), 127.0)
                tl.store(q_row + k0 + offs, y.to(tl.int8), mask=k0 + offs < K)
            else:
                tl.store(q_row + k0 + offs, _to_fp8(y), mask=k0 + offs < K)
    else:
        g_offs = tl.arange(0, GROUP)
        for g0 in range(0, K, GROUP):
            x = tl.load(x_row + g0 + g_offs).to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / QMAX
            tl.store(S + row.to(tl.int64) * stride_sm + g0 // GROUP, scale)
            tl.store(q_row + g0 + g_offs, _to_fp8(x / scale))


# Triton's interpreter (how CI runs these kernels) differs from the GPU in two
# places: its float -> fp8 cast does not carry a rounding into the exponent
# (127.9 -> 64), and a tensor converted to bf16/fp16 in-kernel feeds tl.dot
# wrong values.  Under the interpreter the helpers below round to the fp8 grid
# arithmetically and dot in fp32; on the GPU they are the plain cast and dot.
_INTERP = tl.constexpr(interpreting())


@triton.jit
def _fp8_grid(y):
    """Round to the e4m3 grid, ties to even, saturating at 448 (exact in fp32)."""
    a = tl.minimum(tl.abs(y), 448.0)
    e = tl.floor(tl.log2(tl.maximum(a, 0.015625)))  # 2^-6: below it the subnormal step 2^-9
    step = tl.exp2(e - 3.0)
    r = tl.minimum(_round_half_even(a / step) * step, 448.0)
    return tl.where(y < 0, -r, r)


@triton.jit
def _to_fp8(y):
    if _INTERP:
        y = _fp8_grid(y)
    return y.to(tl.float8e4nv)


@triton.jit
def _fp8_round(y):
    """fp32 -> the nearest fp8 value, as fp32."""
    if _INTERP:
        return _fp8_grid(y)
    else:
        return y.to(tl.float8e4nv).to(tl.float32)


@triton.jit
def _dot16(a, w32, acc):
    """acc += a @ w32 with w32 (fp32 values) cast to a's 16-bit dtype first."""
    if _INTERP:
        return tl.dot(a.to(tl.float32), w32, acc, out_dtype=tl.float32)
    else:
        return tl.dot(a, w32.to(a.dtype), acc, out_dtype=tl.float32)


@triton.jit
def _round_half_even(y):
    """torch.round: to nearest, ties to even (floor(y + 0.5), then the odd ties back down)."""
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


def quantize_activation(x: torch.Tensor, dtype: torch.dtype, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_q [M, K], scale [M, 1] or [M, K/group]) with amax / qmax scales."""
    m, k = x.shape
    x = x.contiguous()
    q = torch.empty((m, k), device=x.device, dtype=dtype)
    is_int8 = dtype == torch.int8
    qmax = 127.0 if is_int8 else 448.0
    s = torch.empty((m, k // group if group else 1), device=x.device, dtype=torch.float32)
    if m:
        _quant_act_kernel[(m,)](x, q, s, m, k, x.stride(0), q.stride(0), s.stride(0),
                                QMAX=qmax, IS_INT8=is_int8, GROUP=group, BLOCK_K=1024 if not group else 128)
    return q, s


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets of this program's output tile, in grouped order
    (consecutive programs share weight tiles in L2)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _store_tile(C, acc, BIAS, offs_m, offs_n, M, N, stride_cm, stride_cn, pid_k,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Bias (added once, by the first K split), then a store, or an fp32 atomic add for split-K."""
    mask_n = offs_n < N
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=mask, sem="relaxed")


# --- W8A8 GEMM ---------------------------------------------------------------------


_W8A8_CONFIGS = [
    # large M (prefill): wide tiles, deep pipelines
    _cfg(128, 256, 128, 8, 3),
    _cfg(128, 128, 128, 8, 4),
    _cfg(128, 128, 128, 4, 4),
    _cfg(64, 128, 128, 4, 4),
    # small M (decode): narrow M tile, split-K to fill the SMs
    _cfg(16, 64, 128, 4, 4, split_k=4),
    _cfg(16, 128, 128, 4, 4, split_k=2),
    _cfg(32, 64, 128, 4, 4, split_k=2),
    _cfg(64, 64, 128, 4, 4),
]


SMALL_M = 32  # at or below: narrow M tiles with split-K into an fp32 buffer


def _w8a8_prune(configs, named_args, **kwargs):
    m = named_args["M"]
    if m <= SMALL_M:
        chosen = [c for c in configs if c.kwargs["BLOCK_M"] <= SMALL_M]
    else:
        chosen = [c for c in configs if c.kwargs["BLOCK_M"] >= 64 and c.kwargs["SPLIT_K"] == 1]
        if m <= 128:
            chosen = [c for c in chosen if c.kwargs["BLOCK_M"] == 64] or chosen
    return chosen or configs[:1]


@_autotune(_W8A8_CONFIGS, key=["M_BUCKET", "N", "K", "A_SCALE", "W_SCALE", "IS_INT8"],
           prune_configs_by={"early_config_prune": _w8a8_prune}, reset_to_zero=["C"])
@triton.jit
def _w8a8_kernel(
    A, W, C, SA, SW, BIAS, M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_cn, stride_sam, stride_swn,
    A_SCALE: tl.constexpr, W_SCALE: tl.constexpr, IS_INT8: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_k = tl.program_id(1)
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = W + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk

    if IS_INT8:
        acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for kt in range(pid_k, k_tiles, SPLIT_K):
        k0 = kt * BLOCK_K
        mask_k = offs_k + k0 < K
        a = tl.load(a_ptrs + k0 * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + k0 * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if W_SCALE == _W_BLOCK:
            # one 1x128 activation group and one 128x128 weight block per K tile (BLOCK_K == 128)
            part = tl.dot(a, w, out_dtype=tl.float32)
            sa = tl.load(SA + offs_m.to(tl.int64) * stride_sam + kt, mask=mask_m, other=0.0)
            sw = tl.load(SW + (offs_n // 128) * stride_swn + kt, mask=mask_n, other=0.0)
            acc += part * sa[:, None] * sw[None, :]
        elif IS_INT8:
            acc_i += tl.dot(a, w, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, w, acc, out_dtype=tl.float32)

    if IS_INT8:
        acc = acc_i.to(tl.float32)
    if W_SCALE != _W_BLOCK:
        if A_SCALE == _A_TENSOR:
            acc = acc * tl.load(SA)
        else:
            acc = acc * tl.load(SA + offs_m.to(tl.int64) * stride_sam, mask=mask_m, other=0.0)[:, None]
        if W_SCALE == _W_TENSOR:
            acc = acc * tl.load(SW)
        else:
            acc = acc * tl.load(SW + offs_n * stride_swn, mask=mask_n, other=0.0)[None, :]
    _store_tile(C, acc, BIAS, offs_m, offs_n, M, N, stride_cm, stride_cn, pid_k, HAS_BIAS, SPLIT_K)


def _m_bucket(m: int) -> int:
    for b in (1, 16, 32, 64, 128, 256, 512, 1024, 2048):
        if m <= b:
            return b
    return 4096


def _grid(m, n):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])


def _out(m, n, device, out_dtype):
    """Small M: an fp32 buffer that split-K programs add into (zeroed); large M: the output itself."""
    if m <= SMALL_M:
        return torch.zeros((m, n), device=device, dtype=torch.float32)
    return torch.empty((m, n), device=device, dtype=out_dtype)


def w8a8_gemm(a, w, sa, sw, bias, out_dtype, *, a_scale: int, w_scale: int):
    """C = (a_q @ w_q^T) * scales + bias.  a [M, K] quantized, w [N, K]."""
    m, k = a.shape
    n = w.shape[0]
    c = _out(m, n, a.device, out_dtype)
    if m == 0:
        return c.to(out_dtype)
    sa_t = sa if sa is not None else c
    _w8a8_kernel[_grid(m, n)](
        a, w, c, sa_t, sw, bias if bias is not None else c, m, n, k, _m_bucket(m),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1),
        sa_t.stride(0) if sa_t.dim() else 0, sw.stride(0) if sw.dim() else 0,
        A_SCALE=a_scale, W_SCALE=w_scale, IS_INT8=w.dtype == torch.int8, HAS_BIAS=bias is not None,
    )
    return c if c.dtype == out_dtype else c.to(out_dtype)


# --- weight-only GEMM ------------------------------------------------------------------


_WO_CONFIGS = [
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 256, 64, 8, 3),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 128, 128, 8, 3),
    _cfg(128, 256, 128, 8, 3),
    _cfg(16, 64, 128, 4, 4, split_k=4),
    _cfg(16, 128, 128, 4, 4, split_k=2),
    _cfg(16, 64, 64, 4, 4, split_k=8),
    _cfg(32, 64, 128, 4, 4, split_k=2),
    _cfg(64, 64, 128, 4, 4),
]


def _wo_prune(configs, named_args, **kwargs):
    m = named_args["M"]
    g = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE", 0))
    if m <= SMALL_M:
        chosen = [c for c in configs if c.kwargs["BLOCK_M"] <= SMALL_M]
    else:
        chosen = [c for c in configs if c.kwargs["BLOCK_M"] >= 64 and c.kwargs["SPLIT_K"] == 1]
    if g:
        chosen = [c for c in chosen if c.kwargs["BLOCK_K"] % g == 0]
    return chosen or configs[:1]


@_autotune(_WO_CONFIGS, key=["M_BUCKET", "N", "K", "W_KIND", "GROUP_SIZE", "HAS_ZERO"],
           prune_configs_by={"early_config_prune": _wo_prune}, reset_to_zero=["C"])
@triton.jit
def _wo_kernel(
    A, W, C, SW, ZW, BIAS, M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_cn, stride_sn, stride_zn,
    W_KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_k = tl.program_id(1)
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_tiles = tl.cdiv(K, BLOCK_K)
    if W_KIND == _W_INT4:  # packed int4: [N, K/2] bytes, even k in the low nibble
        HALF: tl.constexpr = BLOCK_K // 2
        GPT: tl.constexpr = BLOCK_K // GROUP_SIZE  # groups per K tile
        offs_kh = tl.arange(0, HALF)
        w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_kh[None, :] * stride_wk
        offs_g = tl.arange(0, GPT)
        for kt in range(pid_k, k_tiles, SPLIT_K):
            k0 = kt * BLOCK_K
            a = tl.load(a_ptrs + k0 * stride_ak, mask=mask_m[:, None], other=0.0)
            packed = tl.load(w_ptrs + (k0 // 2) * stride_wk, mask=mask_n[:, None], other=0)
            q = tl.reshape(tl.join((packed & 0xF).to(tl.float32), (packed >> 4).to(tl.float32)), [BLOCK_N, BLOCK_K])
            gidx = k0 // GROUP_SIZE + offs_g
            s = tl.load(SW + offs_n[:, None].to(tl.int64) * stride_sn + gidx[None, :], mask=mask_n[:, None], other=0.0)
            if HAS_ZERO:
                z = tl.load(ZW + offs_n[:, None].to(tl.int64) * stride_zn + gidx[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
            else:
                z = tl.full([BLOCK_N, GPT], 8.0, tl.float32)
            wd = (tl.reshape(q, [BLOCK_N, GPT, GROUP_SIZE]) - z[:, :, None]) * s.to(tl.float32)[:, :, None]
            acc = _dot16(a, tl.trans(tl.reshape(wd, [BLOCK_N, BLOCK_K])), acc)
    else:  # int8 / fp8 per channel: exact cast to the activation dtype, scale in the epilogue
        w_ptrs = W + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
        for kt in range(pid_k, k_tiles, SPLIT_K):
            k0 = kt * BLOCK_K
            mask_k = offs_k + k0 < K
            a = tl.load(a_ptrs + k0 * stride_ak, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs + k0 * stride_wk, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = _dot16(a, w.to(tl.float32), acc)
        acc = acc * tl.load(SW + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    _store_tile(C, acc, BIAS, offs_m, offs_n, M, N, stride_cm, stride_cn, pid_k, HAS_BIAS, SPLIT_K)


def weight_only_gemm(a, w, sw, zw, bias, out_dtype, *, kind: int, group_size: int = 0):
    m, k = a.shape
    n = w.shape[0]
    c = _out(m, n, a.device, out_dtype)
    if m == 0:
        return c.to(out_dtype)
    _wo_kernel[_grid(m, n)](
        a, w, c, sw, zw if zw is not None else sw, bias if bias is not None else c, m, n, k, _m_bucket(m),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1),
        sw.stride(0), zw.stride(0) if zw is not None else 0,
        W_KIND=kind, GROUP_SIZE=group_size, HAS_ZERO=zw is not None, HAS_BIAS=bias is not None,
    )
    return c if c.dtype == out_dtype else c.to(out_dtype)


# --- weight-only, large M: dequantise once, then cuBLAS ------------------------------------


@triton.jit
def _dequant_kernel(W, SW, ZW, OUT, N, K, stride_wn, stride_sn, stride_zn, stride_on,
                    W_KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[n, k] = dequant(W)[n, k] in OUT's 16-bit dtype: int8 / fp8 per channel, or packed int4
    groups with optional zero points, in the public layout (low nibble = even k) or the MMA-fragment
    one (W_INT4_MMA16: stride_wn the bytes between 16-row blocks).  BLOCK_K % GROUP_SIZE == 0,
    K % BLOCK_K == 0, and for the MMA-fragment layout BLOCK_N and BLOCK_K multiples of 16."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k0 = tl.program_id(1) * BLOCK_K
    if W_KIND == _W_INT4 or W_KIND == _W_INT4_MMA16:
        GPT: tl.constexpr = BLOCK_K // GROUP_SIZE
        if W_KIND == _W_INT4:
            HALF: tl.constexpr = BLOCK_K // 2
            offs_h = tl.arange(0, HALF)
            p = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + k0 // 2 + offs_h[None, :], mask=mask_n[:, None], other=0)
            q = tl.reshape(tl.join((p & 0xF).to(tl.float32), (p >> 4).to(tl.float32)), [BLOCK_N, GPT, GROUP_SIZE])
        else:
            # value (n, k) lies in atom (n / 16, k / 16), in the word of lane 4 g + t (g = n % 8,
            # t = k % 8 / 2) as fragment value v = e + 2 hi + 4 kh (e = k % 2, hi = n % 16 / 8,
            # kh = k % 16 / 8), at nibble 4 (v % 2) + v / 2 of the word (int4_layout.py)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            r = offs_n % 16
            c = offs_k % 16
            v = (c % 2)[None, :] + 2 * (r // 8)[:, None] + 4 * (c // 8)[None, :]
            nib = v // 2 + 4 * (v % 2)
            lane = 4 * (r % 8)[:, None] + ((c % 8) // 2)[None, :]
            at = (offs_n // 16)[:, None].to(tl.int64) * stride_wn + ((offs_k // 16) * 128)[None, :] + 4 * lane + nib // 2
            b = tl.load(W + at, mask=mask_n[:, None], other=0).to(tl.int32)
            q = tl.reshape(((b >> (4 * (nib % 2))) & 0xF).to(tl.float32), [BLOCK_N, GPT, GROUP_SIZE])
        gidx = k0 // GROUP_SIZE + tl.arange(0, GPT)
        s = tl.load(SW + offs_n[:, None].to(tl.int64) * stride_sn + gidx[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(ZW + offs_n[:, None].to(tl.int64) * stride_zn + gidx[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
        else:
            z = tl.full([BLOCK_N, GPT], 8.0, tl.float32)
        w = tl.reshape((q - z[:, :, None]) * s[:, :, None], [BLOCK_N, BLOCK_K])
    else:
        offs_k = tl.arange(0, BLOCK_K)
        w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + k0 + offs_k[None, :], mask=mask_n[:, None], other=0.0)
        w = w.to(tl.float32) * tl.load(SW + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(OUT + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :], w.to(OUT.dtype.element_ty), mask=mask_n[:, None])


def dequantize(w, sw, zw, dtype: torch.dtype, *, kind: int, k: int, group_size: int = 0) -> torch.Tensor:
    """The weight as a dense [N, K] tensor of ``dtype`` (bf16 / fp16), one pass over it (``kind``
    W_INT4_MMA16: ``w`` in the MMA-fragment layout, [N/16, K/16, 128])."""
    n = w.shape[0] * (16 if kind == W_INT4_MMA16 else 1)
    if kind == W_INT4_MMA16 and w.stride()[1:] != (128, 1):
        w = w.contiguous()  # the kernel walks an atom's 128 bytes and a block's atoms by these strides
    out = torch.empty((n, k), device=w.device, dtype=dtype)
    block_k = 256 if k % 256 == 0 and (not group_size or 256 % group_size == 0) else 128
    if k % block_k or (group_size and block_k % group_size):
        raise ValueError(f"dequantize needs K divisible by {block_k} (K={k}, group {group_size})")
    _dequant_kernel[(triton.cdiv(n, 16), k // block_k)](
        w, sw, zw if zw is not None else sw, out, n, k, w.stride(0), sw.stride(0) if sw.dim() else 0,
        zw.stride(0) if zw is not None else 0, out.stride(0),
        W_KIND=kind, GROUP_SIZE=group_size, HAS_ZERO=zw is not None, BLOCK_N=16, BLOCK_K=block_k, num_warps=4,
    )
    return out


def dequant_linear(a, w, sw, zw, bias, out_dtype, *, kind: int, group_size: int = 0):
    """Large M: the weight dequantised to the activation's dtype in one pass, then cuBLAS.

    At prefill sizes the GEMM is compute-bound and cuBLAS's bf16 GEMM runs near the tensor-core
    peak; writing and reading the dense weight once costs far less than a mixed-input GEMM that
    dequantises every tile in the mainloop (see benchmarks/results/h200/decode/prefill).
    """
    wd = dequantize(w, sw, zw, a.dtype, kind=kind, k=a.shape[1], group_size=group_size)
    y = torch.nn.functional.linear(a, wd, bias)
    return y if y.dtype == out_dtype else y.to(out_dtype)


# --- weight-only, weight-stationary: the weight is the MMA's row operand ------------------------


@triton.jit
def _int4_halves(p, DT: tl.constexpr):
    """The low and high nibbles of the bytes ``p`` as ``DT`` values ``OFFSET + q`` (see _int4_offset):
    on the GPU a bit trick, no integer-to-float conversion (bf16 0x4300 | q is 128 + q, fp16 0x6400 | q
    is 1024 + q); under the interpreter plain fp32 ``q`` (OFFSET 0)."""
    if _INTERP:
        return (p & 0xF).to(tl.float32), (p >> 4).to(tl.float32)
    else:
        magic: tl.constexpr = 0x4300 if DT == tl.bfloat16 else 0x6400
        lo = ((p & 0xF).to(tl.uint16) | magic).to(DT, bitcast=True)
        hi = ((p >> 4).to(tl.uint16) | magic).to(DT, bitcast=True)
        return lo, hi


@triton.jit
def _int4_offset(DT: tl.constexpr):
    if _INTERP:
        return 0.0
    else:
        return 128.0 if DT == tl.bfloat16 else 1024.0


def _tcfg(bm, bn, bk, warps, stages):
    return _cfg(bm, bn, bk, warps, stages, split_k=None)  # the wrapper picks the split (wt_split_k)


_WT_CONFIGS = [
    # M <= 64: one token tile (BLOCK_M = M rounded up to 16 / 32 / 64), narrow weight tiles, deep rings
    _tcfg(16, 64, 256, 4, 4),
    _tcfg(16, 128, 128, 4, 4),
    _tcfg(16, 128, 256, 4, 3),
    _tcfg(16, 64, 128, 4, 6),
    # larger M: wide tiles on both sides
    _tcfg(64, 128, 128, 4, 4),
    _tcfg(128, 128, 64, 4, 4),
    _tcfg(128, 128, 128, 8, 3),
    _tcfg(256, 128, 64, 8, 3),
    _tcfg(128, 256, 64, 8, 3),
]
WT_SMALL_M = 64


def _wt_prune(configs, named_args, **kwargs):
    m, k = named_args["M"], named_args["K"]
    g = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE", 0))
    if m <= WT_SMALL_M:
        bm = max(16, triton.next_power_of_2(m))
        chosen = [c for c in configs if c.kwargs["BLOCK_M"] == 16]
        chosen = [triton.Config({**c.kwargs, "BLOCK_M": bm}, num_warps=c.num_warps, num_stages=c.num_stages) for c in chosen]
    else:
        chosen = [c for c in configs if c.kwargs["BLOCK_M"] >= 64 and (m > 128 or c.kwargs["BLOCK_M"] <= 128)]
    chosen = [c for c in chosen if k % c.kwargs["BLOCK_K"] == 0 and (not g or c.kwargs["BLOCK_K"] % g == 0 or g % c.kwargs["BLOCK_K"] == 0)]
    return chosen or configs[:1]


@_autotune(_WT_CONFIGS, key=["M_BUCKET", "N", "K", "W_KIND", "GROUP_SIZE", "HAS_ZERO", "SPLIT_K"],
           prune_configs_by={"early_config_prune": _wt_prune}, reset_to_zero=["C"])
@triton.jit
def _wo_t_kernel(
    A, W, C, SW, ZW, BIAS, M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_cn, stride_sn, stride_zn,
    W_KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C^T tile [BLOCK_N, BLOCK_M] = W tile [BLOCK_N, BLOCK_K] @ A^T tile [BLOCK_K, BLOCK_M]: the dequantised
    weight is the MMA's row operand, taken from registers (on Hopper wgmma reads its A operand from registers),
    so the weight goes global -> shared (the pipelined ring) -> registers -> tensor core, and the activation
    columns are as narrow as M (16 at decode sizes) instead of padding M to the MMA's 64 rows."""
    pid_k = tl.program_id(1)
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = A + offs_m[None, :].to(tl.int64) * stride_am + offs_k[:, None] * stride_ak  # [BLOCK_K, BLOCK_M]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_tiles = K // BLOCK_K
    DT: tl.constexpr = A.dtype.element_ty
    if W_KIND == _W_INT4:  # packed int4: [N, K/2] bytes, even k in the low nibble; K % BLOCK_K == 0
        HALF: tl.constexpr = BLOCK_K // 2
        offs_kh = tl.arange(0, HALF)
        w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_kh[None, :] * stride_wk
        s_row = SW + offs_n.to(tl.int64) * stride_sn
        z_row = ZW + offs_n.to(tl.int64) * stride_zn
        OFF = _int4_offset(DT)
        for kt in range(pid_k, k_tiles, SPLIT_K):
            k0 = kt * BLOCK_K
            at = tl.load(a_ptrs + k0 * stride_ak, mask=mask_m[None, :], other=0.0)
            p = tl.load(w_ptrs + (k0 // 2) * stride_wk, mask=mask_n[:, None], other=0)
            lo, hi = _int4_halves(p, DT)
            q = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])
            if BLOCK_K <= GROUP_SIZE:  # one group per tile: its scale and zero point are row vectors
                s = tl.load(s_row + k0 // GROUP_SIZE, mask=mask_n, other=0.0)
                if HAS_ZERO:
                    z = tl.load(z_row + k0 // GROUP_SIZE, mask=mask_n, other=0).to(tl.float32) + OFF
                else:
                    z = tl.full([BLOCK_N], 8.0, tl.float32) + OFF
                w = (q - z.to(q.dtype)[:, None]) * s.to(q.dtype)[:, None]
            else:
                GPT: tl.constexpr = BLOCK_K // GROUP_SIZE
                gidx = k0 // GROUP_SIZE + tl.arange(0, GPT)
                s = tl.load(s_row[:, None] + gidx[None, :], mask=mask_n[:, None], other=0.0)
                if HAS_ZERO:
                    z = tl.load(z_row[:, None] + gidx[None, :], mask=mask_n[:, None], other=0).to(tl.float32) + OFF
                else:
                    z = tl.full([BLOCK_N, GPT], 8.0, tl.float32) + OFF
                w = tl.reshape((tl.reshape(q, [BLOCK_N, GPT, GROUP_SIZE]) - z.to(q.dtype)[:, :, None])
                               * s.to(q.dtype)[:, :, None], [BLOCK_N, BLOCK_K])
            acc = _dot_rows(w, at, acc)
    else:  # int8 / fp8 per channel: exact cast to the activation dtype, the scale in the epilogue
        w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
        for kt in range(pid_k, k_tiles, SPLIT_K):
            k0 = kt * BLOCK_K
            at = tl.load(a_ptrs + k0 * stride_ak, mask=mask_m[None, :], other=0.0)
            w = tl.load(w_ptrs + k0 * stride_wk, mask=mask_n[:, None], other=0.0)
            acc = _dot_rows(_to_dt(w, DT), at, acc)
        acc = acc * tl.load(SW + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    _store_tile(C, tl.trans(acc), BIAS, offs_m, offs_n, M, N, stride_cm, stride_cn, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _to_dt(w, DT: tl.constexpr):
    if _INTERP:
        return w.to(tl.float32)
    else:
        return w.to(DT)


@triton.jit
def _dot_rows(w, at, acc):
    """acc += w @ at, both 16-bit on the GPU; in fp32 under the interpreter (see _INTERP)."""
    if _INTERP:
        return tl.dot(w.to(tl.float32), at.to(tl.float32), acc, out_dtype=tl.float32)
    else:
        return tl.dot(w, at, acc, out_dtype=tl.float32)


def wt_split_k(m: int, n: int, k: int, sms: int, block_n: int = 64) -> int:
    """How many K slices a small-M call splits into so every SM gets a weight tile: 1 above WT_SMALL_M."""
    if m > WT_SMALL_M:
        return 1
    tiles = triton.cdiv(n, block_n)
    split = 1
    while tiles * split * 2 <= sms * 2 and k // (split * 2) >= 512:
        split *= 2
    return split


def weight_only_gemm_t(a, w, sw, zw, bias, out_dtype, *, kind: int, group_size: int = 0, split_k: int | None = None):
    """C = a @ dequant(w)^T + bias through ``_wo_t_kernel``.  a [M, K] bf16/fp16, K a multiple of 128."""
    m, k = a.shape
    n = w.shape[0]
    if k % 128:
        raise ValueError(f"the weight-stationary GEMM walks K in 128-wide tiles (K={k})")
    if split_k is None:
        split_k = wt_split_k(m, n, k, _sm_count(a.device))
    c = (torch.zeros((m, n), device=a.device, dtype=torch.float32) if split_k > 1
         else torch.empty((m, n), device=a.device, dtype=out_dtype))
    if m == 0:
        return c.to(out_dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)  # noqa: E731
    _wo_t_kernel[grid](
        a, w, c, sw, zw if zw is not None else sw, bias if bias is not None else c, m, n, k, _m_bucket(m),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), c.stride(0), c.stride(1),
        sw.stride(0), zw.stride(0) if zw is not None else 0,
        W_KIND=kind, GROUP_SIZE=group_size, HAS_ZERO=zw is not None, HAS_BIAS=bias is not None, SPLIT_K=split_k,
    )
    return c if c.dtype == out_dtype else c.to(out_dtype)
