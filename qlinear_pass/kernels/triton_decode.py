"""Decode-sized GEMMs (M <= 16) for every weight format: one launch per linear, at the memory roofline.

At decode sizes a linear is bound by reading its weight once: the kernel's job is to keep every
SM streaming weight bytes.  ``_decode_kernel`` does that without the three-kernel pattern of a
split-K GEMV (zero fill, atomics, convert):

* each program owns ``BLOCK_N`` output channels and a share of K; where N alone gives too few
  programs, K is split over ``SPLIT_K`` programs whose partial sums go to a workspace, and the
  last program of each tile to arrive (a per-tile counter, which it resets) adds them and runs
  the epilogue, so the output is written once, in its dtype, by one kernel;
* weights are read as ``[BLOCK_N, BLOCK_K]`` tiles of their stored layout (K contiguous), so
  each thread issues 16-byte loads; packed int4 stays packed in its public layout (low nibble =
  even k): the even and odd k of a tile are two half-width operands, split from a contiguous
  read of the activation in registers, so the weight's nibbles are never interleaved;
* 4- and 8-bit integers become fp32 without the int -> float converter, which runs at a quarter
  of the FMA rate: on the GPU by a few lines of PTX that work on four packed bytes at once
  (``_INT8X4_TO_F32``: a byte permute under the exponent of 2**23 and one add; ``_INT4X8_TO_F32``:
  two nibbles under an fp16 exponent per AND/OR, one convert per value, the bias folded into the
  zero point), under the interpreter by the same idea in Triton ops (``_small_int_to_f32``);
* a W8A8 layer's dynamic activation quantization happens inside the program: every program
  finds the scales of the M <= 16 rows itself (the activation is a few KB, read from L2), so the
  linear stays one launch;
* two inner paths: ``USE_DOT`` runs ``acc[BLOCK_N, 16] += w @ x^T`` on the tensor cores (the
  weight as the wide operand, the M <= 16 rows padded to 16; native fp8 / int8 dots for a
  quantized activation, exact 16-bit operands for a float one); without it (M == 1) an fp32
  FMA reduction.

The launch configuration comes from ``decode_config``, a rule read off the sweeps of
``benchmarks/bench_decode.py``.  Which layers take this kernel is the Triton backend's choice
(``backends/triton.py``): every scheme at M == 1, ``fp8_block`` up to M = 16.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .triton_gemm import _INTERP, _fp8_round, _round_half_even, _sm_count, _to_fp8, interpreting

#: the most activation rows the decode kernel serves
MAX_M = 16


class Act:
    """How the kernel receives the activation (the ``ACT`` constexpr)."""

    FLOAT = 0  # weight-only: the activation is used as it is
    DYN_TOKEN = 1  # quantize per row here (scale = amax / qmax)
    DYN_TENSOR = 2  # quantize with one scale for all rows, found here
    DYN_GROUP = 3  # quantize per 1x128 group here (fp8_block)
    STATIC_TOKEN = 4  # already quantized; one scale per row in SA
    STATIC_TENSOR = 5  # already quantized; one scale in SA
    STATIC_GROUP = 6  # already quantized; [M, K/128] scales in SA


class Weight:
    """Weight storage (``W_KIND``) and its scales (``W_SCALE``)."""

    INT8, FP8, INT4 = 0, 1, 2
    TENSOR, CHANNEL, BLOCK, GROUP = 0, 1, 2, 3


_FLOAT = tl.constexpr(Act.FLOAT)
_DYN_TOKEN = tl.constexpr(Act.DYN_TOKEN)
_DYN_TENSOR = tl.constexpr(Act.DYN_TENSOR)
_DYN_GROUP = tl.constexpr(Act.DYN_GROUP)
_STATIC_TOKEN = tl.constexpr(Act.STATIC_TOKEN)
_STATIC_TENSOR = tl.constexpr(Act.STATIC_TENSOR)
_STATIC_GROUP = tl.constexpr(Act.STATIC_GROUP)
_INT4 = tl.constexpr(Weight.INT4)
_WS_TENSOR = tl.constexpr(Weight.TENSOR)
_WS_CHANNEL = tl.constexpr(Weight.CHANNEL)
_WS_BLOCK = tl.constexpr(Weight.BLOCK)


@triton.jit
def _quant(x, sa, QMAX: tl.constexpr, ACT_INT8: tl.constexpr):
    """x / sa rounded to the quantized grid (int8: ties to even, clamped; fp8: e4m3, saturated), as fp32."""
    y = x / sa
    if ACT_INT8:
        if _INTERP:
            r = _round_half_even(y)
        else:
            r = libdevice.rint(y)  # one instruction, ties to even
        return tl.minimum(tl.maximum(r, -128.0), 127.0)
    else:
        return _fp8_round(tl.minimum(tl.maximum(y, -448.0), 448.0))


@triton.jit
def _quant_to(x, sa, QMAX: tl.constexpr, ACT_INT8: tl.constexpr):
    """The same, stored in the quantized dtype (int8 or fp8 e4m3) for a native dot."""
    if ACT_INT8:
        return _quant(x, sa, QMAX, ACT_INT8).to(tl.int8)
    else:
        return _to_fp8(tl.minimum(tl.maximum(x / sa, -448.0), 448.0))


@triton.jit
def _small_int_to_f32(q):
    """int32 0 <= q < 2**23 -> fp32, exactly, by integer ops and one add: the bits of 2**23 + q
    are 0x4B000000 | q.  The int -> float converter runs at a quarter of the FMA rate on Hopper,
    and at M == 1 it, not memory, bounded the 4- and 8-bit integer paths."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


#: PTX for four int8 in one register -> four exact fp32: XOR 0x80 makes each byte w + 128 unsigned,
#: one byte permute puts it under the exponent of 2**23 (bits 0x4B0000bb = 2**23 + bb), one add
#: removes 2**23 + 128.  Two integer instructions an element, where Triton's own lowering of the
#: same integer ops (sign extension, add, or, the byte's extraction) takes about four.
_INT8X4_TO_F32 = tl.constexpr("""{
.reg .b32 t, m;
xor.b32 t, $4, 0x80808080;
mov.b32 m, 0x4B000000;
prmt.b32 $0, t, m, 0x7540;
prmt.b32 $1, t, m, 0x7541;
prmt.b32 $2, t, m, 0x7542;
prmt.b32 $3, t, m, 0x7543;
sub.f32 $0, $0, 0f4B000080;
sub.f32 $1, $1, 0f4B000080;
sub.f32 $2, $2, 0f4B000080;
sub.f32 $3, $3, 0f4B000080;
}""")

#: PTX for four bytes of packed int4 (8 nibbles, low = even k) -> the even and the odd k as fp32
#: 1024 + q: a shift and an AND/OR (one LOP3) place two nibbles under the fp16 exponent of 1024
#: (0x6400 | q), one convert per value widens it.  The bias 1024 is folded into the zero point by
#: the caller (``NIBBLE_BIAS``), so no add is spent per value.
_INT4X8_TO_F32 = tl.constexpr("""{
.reg .b32 a, b, c, d, t;
.reg .b16 a0, a1, b0, b1, c0, c1, d0, d1;
and.b32 t, $8, 0x000F000F;
or.b32 a, t, 0x64006400;
shr.u32 t, $8, 4;
and.b32 t, t, 0x000F000F;
or.b32 b, t, 0x64006400;
shr.u32 t, $8, 8;
and.b32 t, t, 0x000F000F;
or.b32 c, t, 0x64006400;
shr.u32 t, $8, 12;
and.b32 t, t, 0x000F000F;
or.b32 d, t, 0x64006400;
mov.b32 {a0, a1}, a;
mov.b32 {b0, b1}, b;
mov.b32 {c0, c1}, c;
mov.b32 {d0, d1}, d;
cvt.f32.f16 $0, a0;
cvt.f32.f16 $1, c0;
cvt.f32.f16 $2, a1;
cvt.f32.f16 $3, c1;
cvt.f32.f16 $4, b0;
cvt.f32.f16 $5, d0;
cvt.f32.f16 $6, b1;
cvt.f32.f16 $7, d1;
}""")

#: what the int4 unpacking adds to every value (``_int4_to_f32``): 1024 on the GPU, 0 interpreted
NIBBLE_BIAS = tl.constexpr(0.0 if interpreting() else 1024.0)


@triton.jit
def _int4_to_f32(p):
    """Packed int4 bytes [.., J] -> (even k, odd k) as fp32, each ``q + NIBBLE_BIAS``."""
    if _INTERP:
        p32 = p.to(tl.int32)
        return _small_int_to_f32(p32 & 0xF), _small_int_to_f32(p32 >> 4)
    else:
        return tl.inline_asm_elementwise(_INT4X8_TO_F32, "=r,=r,=r,=r,=r,=r,=r,=r,r", [p],
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=4)


@triton.jit
def _w8_to_f32(w):
    """An 8-bit weight tile (int8 or fp8) as fp32 values; int8 without the int -> float converter."""
    if w.dtype == tl.int8:
        if _INTERP:
            return _small_int_to_f32(w.to(tl.int32) + 128) - 128.0
        else:
            return tl.inline_asm_elementwise(_INT8X4_TO_F32, "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
    else:
        return w.to(tl.float32)


@triton.jit
def _mma(a, b, acc, DT: tl.constexpr):
    """acc += a @ b on the tensor cores with both operands in the 16-bit dtype DT, fp32 accumulation.

    Under Triton's interpreter (CI) a 16-bit cast feeding tl.dot gives wrong values, so there
    the dot runs in fp32 (the operands this kernel feeds are exact in DT, except dequantized int4).
    """
    if _INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
    else:
        return tl.dot(a.to(DT), b.to(DT), acc, out_dtype=tl.float32)


@triton.jit
def _decode_kernel(
    X, W, C, SW, ZW, SA, BIAS, WS, LOCKS, M, N, K,
    stride_xm, stride_wn, stride_cm, stride_swn, stride_zn, stride_sam,
    W1, C1, SW1, ZW1, BIAS1, N1, W2, C2, SW2, ZW2, BIAS2, N2, WS_N,
    W_KIND: tl.constexpr, W_SCALE: tl.constexpr, ACT: tl.constexpr, ACT_INT8: tl.constexpr,
    GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
    SPLIT_K: tl.constexpr, SEGS: tl.constexpr,
):
    """C[m, n] = sum_k act(X)[m, k] * dequant(W)[n, k] (* scales) + bias, for m < M <= BLOCK_M.

    K % BLOCK_K == 0 (``decode_gemm`` picks such a BLOCK_K); int4: BLOCK_K % GROUP_SIZE == 0.
    DT: the 16-bit dtype of the tensor-core operands (fp16 for an fp16 activation of a weight-only
    layer, else bf16, exact for 8-bit values).  The accumulator is [BLOCK_N, BLOCK_M]: the weight is the wide operand of the dot.

    SEGS > 1: up to three layers that read the same activation (a transformer's q/k/v, gate/up) in
    one launch: segment i has its own weight, scales, zero points, bias, output [M, N_i] (contiguous)
    and N_i (N, N1, N2); the programs along N walk the segments' tiles one after another, so
    N and N1 are multiples of BLOCK_N.  WS_N: the workspace's row length (all tiles of all segments).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tile = pid  # this program's tile of N within its segment
    if SEGS > 1:
        tiles0 = N // BLOCK_N
        if pid >= tiles0:
            tile = pid - tiles0
            W = W1
            C = C1
            SW = SW1
            ZW = ZW1
            BIAS = BIAS1
            N = N1
            stride_cm = N1
            if SEGS > 2:
                tiles1 = N1 // BLOCK_N
                if tile >= tiles1:
                    tile = tile - tiles1
                    W = W2
                    C = C2
                    SW = SW2
                    ZW = ZW2
                    BIAS = BIAS2
                    N = N2
                    stride_cm = N2
    # this program's share of K: whole BLOCK_K tiles, split evenly over SPLIT_K programs
    tiles_per_split = tl.cdiv(K // BLOCK_K, SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    # the activation, transposed: [BLOCK_K, BLOCK_M] tiles (K contiguous)
    x_cols = X + offs_m[None, :].to(tl.int64) * stride_xm
    QMAX: tl.constexpr = 127.0 if ACT_INT8 else 448.0

    # the activation scale of each row (or of all rows) for a dynamic per-token / per-tensor quantization
    if ACT == _DYN_TOKEN or ACT == _DYN_TENSOR:
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xa = tl.load(x_cols + k0 + offs_k[:, None], mask=mask_m[None, :], other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(xa), axis=0))
        if ACT == _DYN_TENSOR:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.max(amax, axis=0)
        sa = tl.maximum(amax, 1e-12) / QMAX
    elif ACT == _STATIC_TOKEN:
        sa = tl.load(SA + offs_m * stride_sam, mask=mask_m, other=0.0)
    elif ACT == _STATIC_TENSOR:
        sa = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SA)
    else:
        sa = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_i = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)  # int8 x int8 dots (unused otherwise)
    if W_KIND == _INT4:
        # packed [N, K/2] bytes: byte j of a row holds k = 2j (low nibble) and 2j + 1 (high); the
        # even and odd k are two half-width operands, so the nibbles are never interleaved
        HALF: tl.constexpr = BLOCK_K // 2
        GPT: tl.constexpr = BLOCK_K // GROUP_SIZE  # groups per K tile
        HG: tl.constexpr = GROUP_SIZE // 2  # packed bytes per group
        offs_h = tl.arange(0, HALF)
        offs_g = tl.arange(0, GPT)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            p = tl.load(w_rows + k0 // 2 + offs_h[None, :], mask=mask_n[:, None], other=0)
            gidx = k0 // GROUP_SIZE + offs_g
            s = tl.load(SW + offs_n[:, None].to(tl.int64) * stride_swn + gidx[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(ZW + offs_n[:, None].to(tl.int64) * stride_zn + gidx[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
            else:
                z = tl.full([BLOCK_N, GPT], 8.0, tl.float32)
            lo, hi = _int4_to_f32(p)
            lo = tl.reshape(lo, [BLOCK_N, GPT, HG])
            hi = tl.reshape(hi, [BLOCK_N, GPT, HG])
            z = z + NIBBLE_BIAS  # the unpacked values carry the bias: (q + b) - (z + b)
            if USE_DOT:
                # the activation rows read contiguously (16-byte loads), even and odd k split in registers
                xx = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + k0 + offs_k[None, :], mask=mask_m[:, None], other=0.0)
                xe, xo = tl.split(tl.reshape(xx, [BLOCK_M, HALF, 2]))
                xe = tl.trans(xe)
                xo = tl.trans(xo)
                we = tl.reshape((lo - z[:, :, None]) * s[:, :, None], [BLOCK_N, HALF])
                wo = tl.reshape((hi - z[:, :, None]) * s[:, :, None], [BLOCK_N, HALF])
                acc = _mma(we, xe, acc, DT)
                acc = _mma(wo, xo, acc, DT)
            else:
                # M == 1: per group s * (sum_j q x - z * sum_j x), two FMAs a weight
                xe, xo = tl.split(tl.reshape(tl.load(X + k0 + offs_k).to(tl.float32), [HALF, 2]))
                xe = tl.reshape(xe, [GPT, HG])
                xo = tl.reshape(xo, [GPT, HG])
                qx = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)
                xs = tl.sum(xe + xo, axis=1)
                acc += tl.sum(s * (qx - z * xs[None, :]), axis=1)[:, None]
    elif W_SCALE == _WS_BLOCK or ACT == _DYN_GROUP or ACT == _STATIC_GROUP:
        # 1x128 activation groups and/or 128x128 weight blocks: each 128-wide chunk of K is scaled
        # on its own, after a dot of exact 8-bit values
        CH: tl.constexpr = BLOCK_K // 128
        offs_c = tl.arange(0, 128)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if USE_DOT:
                for c in tl.static_range(CH):
                    kc = k0 + c * 128
                    w = tl.load(w_rows + kc + offs_c[None, :], mask=mask_n[:, None], other=0.0)
                    x = tl.load(x_cols + kc + offs_c[:, None], mask=mask_m[None, :], other=0.0)
                    if ACT == _DYN_GROUP:
                        x = x.to(tl.float32)
                        sg = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / QMAX
                        x = _quant_to(x, sg[None, :], QMAX, ACT_INT8)
                    elif ACT == _STATIC_GROUP:
                        sg = tl.load(SA + offs_m.to(tl.int64) * stride_sam + kc // 128, mask=mask_m, other=0.0)
                    else:
                        if ACT == _DYN_TOKEN or ACT == _DYN_TENSOR:
                            x = _quant_to(x.to(tl.float32), sa[None, :], QMAX, ACT_INT8)
                        sg = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
                    part = tl.dot(w, x, out_dtype=tl.float32)
                    if W_SCALE == _WS_BLOCK:
                        sb = tl.load(SW + (offs_n // 128) * stride_swn + kc // 128, mask=mask_n, other=0.0)
                        part = part * sb[:, None]
                    acc += part * sg[None, :]
            else:
                w3 = tl.reshape(tl.load(w_rows + k0 + offs_k[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32),
                                [BLOCK_N, CH, 128])
                x3 = tl.reshape(tl.load(X + k0 + offs_k).to(tl.float32), [CH, 128])
                kb = k0 // 128 + tl.arange(0, CH)
                if ACT == _DYN_GROUP:
                    sg = tl.maximum(tl.max(tl.abs(x3), axis=1), 1e-12) / QMAX
                    x3 = _quant(x3, sg[:, None], QMAX, ACT_INT8) * sg[:, None]
                elif ACT == _STATIC_GROUP:
                    x3 = x3 * tl.load(SA + kb)[:, None]
                elif ACT == _DYN_TOKEN or ACT == _DYN_TENSOR:
                    x3 = _quant(x3, tl.max(sa, axis=0), QMAX, ACT_INT8)
                if W_SCALE == _WS_BLOCK:
                    sb = tl.load(SW + (offs_n // 128)[:, None] * stride_swn + kb[None, :], mask=mask_n[:, None], other=0.0)
                    w3 = w3 * sb[:, :, None]
                acc += tl.sum(tl.sum(w3 * x3[None, :, :], axis=2), axis=1)[:, None]
    else:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            w = tl.load(w_rows + k0 + offs_k[None, :], mask=mask_n[:, None], other=0.0)
            if USE_DOT:
                x = tl.load(x_cols + k0 + offs_k[:, None], mask=mask_m[None, :], other=0.0)
                if ACT == _FLOAT:
                    # 8-bit weights are exact in the activation's 16-bit dtype
                    acc = _mma(w, x, acc, DT)
                else:
                    # quantized activation: a native fp8 x fp8 or int8 x int8 dot
                    if ACT == _DYN_TOKEN or ACT == _DYN_TENSOR:
                        x = _quant_to(x.to(tl.float32), sa[None, :], QMAX, ACT_INT8)
                    if ACT_INT8:
                        acc_i = tl.dot(w, x, acc_i, out_dtype=tl.int32)
                    else:
                        acc = tl.dot(w, x, acc, out_dtype=tl.float32)
            else:
                x = tl.load(X + k0 + offs_k).to(tl.float32)
                if ACT == _DYN_TOKEN or ACT == _DYN_TENSOR:
                    x = _quant(x, tl.max(sa, axis=0), QMAX, ACT_INT8)
                acc += tl.sum(_w8_to_f32(w) * x[None, :], axis=1)[:, None]
    if ACT_INT8 and USE_DOT and ACT != _FLOAT:
        acc += acc_i.to(tl.float32)
    if SPLIT_K > 1:
        # split K: every program leaves its partial sums in the workspace; the last of a tile's
        # programs to arrive (a counter per tile, which it resets) adds them up and runs the
        # epilogue, so the reduction needs no zeroed output, no atomics on it and no second kernel
        ws_tile = WS + offs_m[None, :].to(tl.int64) * WS_N + (pid * BLOCK_N + tl.arange(0, BLOCK_N))[:, None]
        tl.store(ws_tile + pid_k.to(tl.int64) * M * WS_N, acc, mask=mask_n[:, None] & mask_m[None, :])
        tl.debug_barrier()
        arrived = tl.atomic_add(LOCKS + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for sk in tl.static_range(SPLIT_K):
                acc += tl.load(ws_tile + sk * M * WS_N, mask=mask_n[:, None] & mask_m[None, :], other=0.0,
                               cache_modifier=".cg")
            tl.atomic_xchg(LOCKS + pid, 0)
            _epilogue(acc, C, SW, BIAS, sa, offs_n, offs_m, mask_n, mask_m, stride_cm, stride_swn, W_SCALE, ACT, HAS_BIAS)
    else:
        _epilogue(acc, C, SW, BIAS, sa, offs_n, offs_m, mask_n, mask_m, stride_cm, stride_swn, W_SCALE, ACT, HAS_BIAS)


@triton.jit
def _epilogue(acc, C, SW, BIAS, sa, offs_n, offs_m, mask_n, mask_m, stride_cm, stride_swn,
              W_SCALE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Weight scale, activation scale, bias, one store in the output dtype."""
    if W_SCALE == _WS_TENSOR:
        acc = acc * tl.load(SW)
    elif W_SCALE == _WS_CHANNEL:
        acc = acc * tl.load(SW + offs_n * stride_swn, mask=mask_n, other=0.0)[:, None]
    if ACT == _DYN_TOKEN or ACT == _DYN_TENSOR or ACT == _STATIC_TOKEN or ACT == _STATIC_TENSOR:
        acc = acc * sa[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    c_ptrs = C + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


@dataclasses.dataclass(frozen=True)
class Config:
    block_n: int
    block_k: int
    warps: int
    stages: int
    use_dot: bool
    #: programs along K per tile of N (reduced inside the kernel, see _decode_kernel)
    split_k: int = 1

    def __str__(self) -> str:
        split = f" split{self.split_k}" if self.split_k > 1 else ""
        return f"{'dot' if self.use_dot else 'fma'} n{self.block_n} k{self.block_k} w{self.warps} s{self.stages}{split}"


#: every configuration the benchmark times (benchmarks/bench_decode.py --sweep); decode_config picks among them
CONFIGS = tuple(
    [Config(bn, bk, w, st, False) for bn in (8, 16, 32) for bk, w in ((512, 4), (1024, 4), (1024, 8)) for st in (1, 3)]
    + [Config(bn, bk, 4, st, True) for bn in (16, 32, 64) for bk in (128, 256, 512) for st in (3, 4) if bn * bk <= 16384]
)


def fits(k: int, group_size: int = 0) -> bool:
    """Can the decode kernel run a layer with this K (and int4 group size)?"""
    return k % 128 == 0 and (not group_size or 128 % group_size == 0 or group_size % 128 == 0) and k % max(group_size, 1) == 0


def _block_k_for(k: int, want: int, group_size: int) -> int:
    bk = want
    while bk > 128 and (k % bk or (group_size and bk % group_size)):
        bk //= 2
    return bk


def _split_for(n_tiles: int, k_tiles: int, sms: int) -> int:
    """Programs along K: until the grid gives every SM about three programs, keeping at least
    two K tiles per program (a long walk through K by too few programs leaves HBM idle)."""
    split = 1
    while n_tiles * split < 3 * sms and k_tiles // (split * 2) >= 2 and split < 8:
        split *= 2
    return split


def decode_config(w_kind: int, m: int, n: int, k: int, group_size: int = 0, sms: int = 132,
                  act: int = Act.FLOAT) -> Config:
    """The launch configuration for one layer, from the sweeps of ``benchmarks/bench_decode.py``
    (results under ``benchmarks/results/h200/decode/``).

    M == 1, the FMA path: 16-row programs, tiles 512 wide (1024 and 8 warps along a long K; 1024
    and 4 warps for int4, whose bytes hold twice the values); M > 1, the tensor-core path: the widest of
    64 / 32 / 16 rows that still gives each SM about one program, 256-512 wide tiles, three
    pipeline stages.  Both split K where N alone gives too few programs (``_split_for``), except
    for a dynamic per-token / per-tensor activation along a long K: every program of a split
    finds the scale over the whole row first, and at K = 14336 that costs more than the split
    gains (fp8_rowwise, N = 4096: 27.8 us unsplit, 34.8 us in two).
    """
    dynamic_scale = act in (Act.DYN_TOKEN, Act.DYN_TENSOR) and k >= 8192
    if m == 1:
        long_k = k >= 8192
        bk = _block_k_for(k, 1024 if long_k or w_kind == Weight.INT4 else 512, group_size)
        split = 1 if dynamic_scale else _split_for(triton.cdiv(n, 16), k // bk, sms)
        return Config(16, bk, 8 if long_k and w_kind != Weight.INT4 else 4, 1, False, split)
    block_n = next((bn for bn in (64, 32) if triton.cdiv(n, bn) >= 0.9 * sms), 16)
    bk = _block_k_for(k, 256 if block_n == 64 else 512, group_size)
    split = 1 if dynamic_scale else _split_for(triton.cdiv(n, block_n), k // bk, sms)
    return Config(block_n, bk, 4, 3, True, split)


def decode_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    sw: torch.Tensor,
    zw: Optional[torch.Tensor],
    sa: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    *,
    w_kind: int,
    w_scale: int,
    act: int,
    act_int8: bool = False,
    group_size: int = 0,
    config: Optional[Config] = None,
) -> torch.Tensor:
    """One launch: ``x`` [M <= 16, K] (float, or quantized for the static modes with scales ``sa``)
    times the stored weight ``w`` ([N, K], or [N, K/2] packed int4) -> [M, N] in ``out_dtype``."""
    (c,) = decode_gemm_group(x, [Layer(w, sw, zw, bias)], sa, out_dtype, w_kind=w_kind, w_scale=w_scale, act=act,
                             act_int8=act_int8, group_size=group_size, config=config)
    return c


class Layer(NamedTuple):
    """One layer's stored weight, its scales, zero points and bias, as ``decode_gemm_group`` takes them."""

    w: torch.Tensor
    sw: torch.Tensor
    zw: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None


#: the most layers one launch serves (the kernel's segments)
MAX_SEGMENTS = 3


def decode_gemm_group(
    x: torch.Tensor,
    layers: Sequence[Layer],
    sa: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    *,
    w_kind: int,
    w_scale: int,
    act: int,
    act_int8: bool = False,
    group_size: int = 0,
    config: Optional[Config] = None,
) -> list[torch.Tensor]:
    """Several layers of one format that read the same activation ``x`` (a transformer's q/k/v or
    gate/up): one output [M, N_i] each, from as few launches as the kernel's segments allow
    (``MAX_SEGMENTS`` layers a launch).  At decode sizes a small layer alone leaves most SMs idle and
    pays a launch; together they stream their weights as one wide layer."""
    m, k = x.shape
    if m > MAX_M:
        raise ValueError(f"the decode kernel serves M <= {MAX_M}, got M={m}")
    if not fits(k, group_size):
        raise ValueError(f"the decode kernel needs K divisible by 128 and whole int4 groups per tile (K={k}, group {group_size})")
    if not layers:
        return []
    kw = k // 2 if w_kind == Weight.INT4 else k
    for i, layer in enumerate(layers):
        if layer.w.dim() != 2 or layer.w.shape[1] != kw:
            raise ValueError(f"layer {i}: weight of shape {tuple(layer.w.shape)} does not match K={k}")
        if (layer.bias is None) != (layers[0].bias is None) or (layer.zw is None) != (layers[0].zw is None):
            raise ValueError("the layers of one group either all have a bias (zero points) or none has")
    x = x if x.stride(-1) == 1 else x.contiguous()
    outs = [torch.empty((m, layer.w.shape[0]), device=x.device, dtype=out_dtype) for layer in layers]
    if m == 0:
        return outs
    n_total = sum(layer.w.shape[0] for layer in layers)
    cfg = config or decode_config(w_kind, m, n_total, k, group_size, _sm_count(x.device), act)
    if not cfg.use_dot and m > 1:
        raise ValueError("the FMA path serves M == 1 only")
    bk = _block_k_for(k, cfg.block_k, group_size)
    if w_kind == Weight.INT4 and bk % group_size:
        raise ValueError(f"BLOCK_K {bk} does not hold whole groups of {group_size}")
    # layers run together when their tiles line up and they share the strides the kernel takes once
    batches: list[list[int]] = []
    for i, layer in enumerate(layers):
        last = batches[-1] if batches else None
        if (last is not None and len(last) < MAX_SEGMENTS
                and layers[last[-1]].w.shape[0] % cfg.block_n == 0 and _strides(layer) == _strides(layers[last[0]])):
            last.append(i)
        else:
            batches.append([i])
    for batch in batches:
        _launch(x, [layers[i] for i in batch], [outs[i] for i in batch], sa, cfg, bk, w_kind, w_scale, act, act_int8, group_size)
    return outs


def _strides(layer: Layer) -> tuple:
    return (layer.w.stride(0), layer.sw.stride(0) if layer.sw.dim() else 0, layer.zw.stride(0) if layer.zw is not None else 0)


def _launch(x, layers, outs, sa, cfg, bk, w_kind, w_scale, act, act_int8, group_size) -> None:
    m, k = x.shape
    n_tiles = sum(triton.cdiv(layer.w.shape[0], cfg.block_n) for layer in layers)
    if n_tiles == 0:
        return
    split = max(1, min(cfg.split_k, k // bk))
    ws_n = n_tiles * cfg.block_n
    if split > 1:
        ws = torch.empty((split, m, ws_n), device=x.device, dtype=torch.float32)
        locks = _locks(x.device, n_tiles)
    else:
        ws = locks = outs[0]
    segs = []
    for layer, c in zip(layers, outs):
        segs.append((layer.w, c, layer.sw, layer.zw if layer.zw is not None else layer.sw,
                     layer.bias if layer.bias is not None else c, layer.w.shape[0]))
    while len(segs) < MAX_SEGMENTS:
        segs.append(segs[0])
    (w, c, sw, zw, b, n), seg1, seg2 = segs
    zw0 = layers[0].zw
    _decode_kernel[(n_tiles, split)](
        x, w, c, sw, zw, sa if sa is not None else sw, b,
        ws, locks, m, n, k, x.stride(0), w.stride(0), c.stride(0), sw.stride(0) if sw.dim() else 0,
        zw0.stride(0) if zw0 is not None else 0, sa.stride(0) if sa is not None and sa.dim() else 0,
        *seg1, *seg2, ws_n,
        W_KIND=w_kind, W_SCALE=w_scale, ACT=act, ACT_INT8=act_int8, GROUP_SIZE=group_size,
        HAS_ZERO=zw0 is not None, HAS_BIAS=layers[0].bias is not None,
        DT=tl.float16 if (act == Act.FLOAT and x.dtype == torch.float16) else tl.bfloat16,
        BLOCK_M=16 if cfg.use_dot else 1, BLOCK_N=cfg.block_n, BLOCK_K=bk, USE_DOT=cfg.use_dot, SPLIT_K=split,
        SEGS=len(layers), num_warps=cfg.warps, num_stages=cfg.stages,
    )


#: tile counters of the split-K reduction, one zeroed int32 array per (device, stream): kernels of one
#: stream run one after another and every tile's last program resets its counter, so an array is
#: always zero between launches; launches on different streams may overlap, so they never share one
_LOCKS: dict = {}
_LOCK_SLOTS = 1 << 16


def _locks(device: torch.device, n_tiles: int) -> torch.Tensor:
    if n_tiles > _LOCK_SLOTS:
        raise ValueError(f"split-K over {n_tiles} tiles of N: more than the {_LOCK_SLOTS} counters")
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    locks = _LOCKS.get(key)
    if locks is None:
        locks = _LOCKS[key] = torch.zeros(_LOCK_SLOTS, device=device, dtype=torch.int32)
    return locks
