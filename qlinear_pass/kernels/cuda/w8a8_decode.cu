// 8-bit weights at decode sizes, fp8 e4m3 or int8 ([N, K] bytes) with a scale per channel or per
// tensor, in four forms:
//
// * W8A8: y[m, n] = sx[m] * sw[n] * sum_k xq[m, k] * wq[n, k] (+ bias[n]), the activation quantized
//   in the weight's format (the scale per token or per tensor).  The activation arrives quantized:
//   in a compiled model the graph quantizes it inside the kernel that writes it (the norm, SwiGLU).
//   Both operands are tensor-core types, so the CUDA cores do no conversion at all: mma.sync
//   m16n8k32 (e4m3 -> f32, s8 -> s32), a lane's 16 loaded bytes of k of two weight rows and the
//   same 16 bytes of k of its token make two MMAs;
// * W8A16 (weight-only): y[m, n] = sw[n] * sum_k x[m, k] * wq[n, k] (+ bias[n]), the activation
//   bf16 or fp16.  A lane's 16 weight bytes of a row become 16-bit values of the activation's type
//   in registers (exactly: int8 through the exponent of 2**23 or an fp16 1024, e4m3 by moving its
//   bits under a bf16 exponent or by the hardware's e4m3 -> f16 conversion) and make four mma.sync
//   m16n8k16 with its token's 16 values of the same k;
// * fp8_block (BLOCK): e4m3 weights scaled per 128x128 block and a bf16 / fp16 activation that the
//   kernel quantizes to e4m3 per 1x128 group (a group is one chunk below: the 4 lanes of a quad that
//   read a token's chunk find its amax with two shuffles, and round x / scale exactly as the
//   reference does); then W8A8's MMAs, and each chunk's sums scaled by its group's and its weight
//   block's scale;
// * fp8_block with the activation arrived quantized (BLOCK_Q): e4m3 bytes and their fp32 scales per
//   1x128 group ([M, K/128], rows sx_stride apart), as the graph writes them above 8 tokens, where
//   every CTA quantizing the activation of each of its tiles costs more than the graph's one pass
//   (the scheme's quantization, so the same bytes and scales as BLOCK's); then BLOCK's sums.
//
// Common to all four:
//
// * the weight is the 16-row A operand (rows = output channels), the activation the 8-column B
//   operand (columns = tokens).  The k order inside an MMA is a permutation of the loaded k, the
//   same for both operands, so no byte of the activation is moved;
// * weights travel by cp.async into a ring of STAGES chunk slots per warp (a chunk: 128 k of the
//   warp's 16 R rows); STAGES - 1 chunks stay in flight while the warp computes on one.  16-byte
//   pieces of odd rows are stored swapped by 64 bytes, so the 8 lanes of a quarter warp read 8
//   different bank quads;
// * the W warps of a CTA split K (chunk c goes to warp c % W), add up through shared memory at
//   the end of each row tile, and the scales (but fp8_block's) and bias are applied once, in fp32,
//   when the output is written in its dtype;
// * CTAs are persistent; each warp loads its next chunk's activation (from L2, shared by every CTA)
//   into registers while it computes the current one;
// * up to MAX_SEGMENTS layers that read the same activation (q/k/v, gate/up) share one launch;
// * fused around the product (the pass's fusion.py): a residual added to each output as it is
//   stored, after it is rounded to the output's dtype (any form, any M); with one token, W8A16 and
//   BLOCK make their 16-bit activation before the first tile (a prologue: the RMSNorm that precedes
//   q/k/v and gate/up, or the SwiGLU that precedes down_proj), each warp its share of the row, into
//   shared memory, where its chunks are then read from (and BLOCK quantizes them);
// * launched with programmatic dependent launch (`pdl`), the CTAs start while the kernel before
//   finishes and copy their first chunks' weights; the activation only after grid_dependency_wait().
//
// Built with nvcc on first use (kernels/cuda_build.py) into a shared library that Python calls
// through ctypes; the launch goes to the caller's stream, so CUDA graphs capture it.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

namespace qlp {

constexpr int MAX_SEGMENTS = 3;
// cp.async ring slots a warp (16-row / 32-row tiles; 48-row ones take R2's), for CTAs of 8 warps and
// of 4 (the caller picks the warps per launch); _T16: in CTAs of 16 tokens
#ifndef QLP_W8_SLOTS_R1
#define QLP_W8_SLOTS_R1 3
#endif
#ifndef QLP_W8_SLOTS_R2
#define QLP_W8_SLOTS_R2 2
#endif
#ifndef QLP_W8_SLOTS_R1_T16
#define QLP_W8_SLOTS_R1_T16 QLP_W8_SLOTS_R1
#endif
#ifndef QLP_W8_SLOTS_R2_T16
#define QLP_W8_SLOTS_R2_T16 QLP_W8_SLOTS_R2
#endif
constexpr int ABI_VERSION = 5;  // bumped whenever Params, Segment or the entry points' arguments change

struct Segment {
  const uint8_t* w;     // [n, k] bytes, rows w_stride bytes apart (16-byte aligned)
  const float* sw;      // fp32 weight scales: [n] (sw_stride 1) or one (sw_stride 0); fp8_block:
                        // [ceil(n / 128), k / 128], rows sw_stride apart
  const void* bias;     // [n] in the output dtype, or null
  void* out;            // [m, n] in the output dtype, rows out_stride elements apart
  const void* res;      // [m, n] in the output dtype, rows res_stride elements apart, added to the
                        // output as rounded to that dtype (a residual connection); or null
  long long w_stride, sw_stride, out_stride, res_stride;
  int n;
  int tiles;            // row tiles of this layer: ceil(n / rows per tile)
};

struct Params {
  const void* x;        // [m, k] activation (W8A8, BLOCK_Q: quantized bytes; else bf16 / fp16), rows
                        // x_stride elements apart (16-byte aligned)
  const float* sx;      // W8A8: fp32 activation scales, [m] (sx_stride 1) or one (sx_stride 0); BLOCK_Q:
                        // [m, k / 128], rows sx_stride apart; else null
  long long x_stride, sx_stride;
  int m, k, nseg, total_tiles;
  // W8A16 and BLOCK with one token (M = 1): what the activation is made of as it is loaded, PRO_NONE
  // x itself; PRO_RMSNORM norm_w * rmsnorm(x) with eps; PRO_SILU_MUL silu(x) * x2 (x2 as x: [m, k],
  // x_stride).  Else PRO_NONE
  int prologue;
  float eps;
  const void* x2;
  const void* norm_w;   // [k] in the activation dtype
  Segment seg[MAX_SEGMENTS];
};

// the largest K of a prologue: the activation row it makes stays in shared memory (64 KB)
constexpr int PRO_MAX_K = 32768;

// internal linkage for the code (see common.cuh)
namespace {

#include "common.cuh"

enum Elem { E4M3 = 0, S8 = 1 };
// W8A8: the activation arrives quantized, one scale per token or per tensor; W8A16: weight-only, a
// 16-bit activation; BLOCK (fp8_block): a 16-bit activation quantized here to e4m3 per 1x128 group,
// the weight scaled per 128x128 block, both scales applied per chunk (a chunk is one group);
// BLOCK_Q: fp8_block with the activation quantized per 1x128 group before the kernel
enum Mode { W8A8 = 0, W8A16 = 1, BLOCK = 2, BLOCK_Q = 3 };

// the activation arrives as bytes (quantized), not 16-bit values
__host__ __device__ constexpr bool bytes_in(int mode) { return mode == W8A8 || mode == BLOCK_Q; }
// the sums are scaled per chunk (fp8_block), not once per output
__host__ __device__ constexpr bool per_chunk(int mode) { return mode == BLOCK || mode == BLOCK_Q; }

template <int ELEM> struct Acc { using type = float; };
template <> struct Acc<S8> { using type = int; };

template <int ELEM>
__device__ __forceinline__ void mma(typename Acc<ELEM>::type (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                    uint32_t b0, uint32_t b1) {
  if constexpr (ELEM == S8) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();  // fp8 MMAs need sm89+; the host refuses fp8 below that (qlp_w8a8_decode)
#endif
  }
}

// W8A16: four 8-bit weights (one word, k = 4i..4i+3 of the lane's bytes) as two pairs of X values,
// (k0, k1) and (k2, k3), exactly.
template <int ELEM, typename X>
__device__ __forceinline__ void widen(uint32_t w, uint32_t (&out)[2]) {
  if constexpr (ELEM == S8 && std::is_same<X, __half>::value) {
    // the biased byte q + 128 under fp16's 1024 (0x6400 | b == 1024 + b), then minus 1152
    const uint32_t u = w ^ 0x80808080u;
    const __half2 off = __halves2half2(__ushort_as_half(0x6480), __ushort_as_half(0x6480));  // 1152
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t h = prmt(u, 0x64646464u, i == 0 ? 0x4140u : 0x4342u);
      const __half2 v = __hsub2(*reinterpret_cast<const __half2*>(&h), off);
      out[i] = *reinterpret_cast<const uint32_t*>(&v);
    }
  } else if constexpr (ELEM == S8) {
    // bf16 has 8 bits of precision, too few for a biased byte under one exponent: each byte goes
    // under the fp32 exponent of 2**23 (0x4B0000bb == 2**23 + b), loses its bias in fp32, and the
    // pair's upper halves (exact: |q| <= 128 has no more than 8 significant bits) make the bf16x2
    const uint32_t u = w ^ 0x80808080u;
    float f[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) f[j] = __uint_as_float(prmt(u, 0x4B000000u, 0x7440u + j)) - 8388736.f;  // 2**23 + 128
    out[0] = prmt(__float_as_uint(f[0]), __float_as_uint(f[1]), 0x7632u);
    out[1] = prmt(__float_as_uint(f[2]), __float_as_uint(f[3]), 0x7632u);
  } else if constexpr (std::is_same<X, __half>::value) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w >> (16 * i)), __NV_E4M3);
      out[i] = static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
    }
  } else {
    // e4m3 -> bf16: the byte shifted left by 4 puts its exponent and mantissa where a bf16's low
    // exponent bits and high mantissa bits are, and its sign at bit 11, which one multiply-add moves
    // to bit 15 (+ 15 * 0x0800 == + 0x8000 - 0x0800).  That bf16 is the value times 2**-120 (the
    // exponent biases 127 and 7; subnormals too), and a bf16 multiply by 2**120 is exact.
    const uint32_t scale = 0x7B807B80u, neg_zero = 0x80008000u;  // bf16 2**120 twice, -0 twice
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t t = prmt(w, 0u, i == 0 ? 0x4140u : 0x4342u) << 4;  // bytes 2i, 2i + 1 at bits 4-11, 20-27
      const uint32_t v = (t & 0x08000800u) * 15u + t;
      asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out[i]) : "r"(v), "r"(scale), "r"(neg_zero));
    }
  }
}

// BLOCK: one token's 1x128 group, 32 values a lane in the 4 lanes of a quad (16 a half chunk, two
// 16-byte pieces each) -> the same k as e4m3 bytes (one 16-byte piece a half) and the group's scale
// amax / 448 (the scheme's quantize_activation: the amax floored at 1e-12, values saturated)
template <typename X>
__device__ __forceinline__ float quantize_group(const uint4 (&x)[2][2], uint4 (&q)[2]) {
  float f[2][16];
  float amax = 0.f;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const uint32_t w[4] = {x[h][v].x, x[h][v].y, x[h][v].z, x[h][v].w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float2 pair;
        if constexpr (std::is_same<X, __nv_bfloat16>::value) {
          pair = make_float2(__uint_as_float(w[i] << 16), __uint_as_float(w[i] & 0xFFFF0000u));
        } else {
          pair = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
        }
        f[h][8 * v + 2 * i] = pair.x;
        f[h][8 * v + 2 * i + 1] = pair.y;
        amax = fmaxf(amax, fmaxf(fabsf(pair.x), fabsf(pair.y)));
      }
    }
  amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 1));
  amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, 2));
  // amax / 448 as torch computes it on a GPU (times the rounded reciprocal of the scalar), so the
  // scale, and every value's level, is the reference's to the bit
  const float scale = fmaxf(amax, 1e-12f) * (1.f / 448.f);
  const float inv = __frcp_rn(scale);
  // x / scale rounded as an IEEE division rounds it (the reference divides): x * (1 / scale), then
  // one FMA for the remainder and one to correct.  x * (1 / scale) alone is off by an ulp often
  // enough to matter: 16-bit activations over a scale of amax / 448 land exactly between two e4m3
  // levels about once in a thousand values, and an ulp then picks the other level
  auto div = [&](float v) {
    const float q = v * inv;
    return fmaf(fmaf(-q, scale, v), inv, q);
  };
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t b[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_fp8x2_storage_t lo = __nv_cvt_float2_to_fp8x2(make_float2(div(f[h][4 * i]), div(f[h][4 * i + 1])), __NV_SATFINITE, __NV_E4M3);
      const __nv_fp8x2_storage_t hi = __nv_cvt_float2_to_fp8x2(make_float2(div(f[h][4 * i + 2]), div(f[h][4 * i + 3])), __NV_SATFINITE, __NV_E4M3);
      b[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    q[h] = make_uint4(b[0], b[1], b[2], b[3]);
  }
  return scale;
}

// 16-byte piece u (0-7) of row r of a chunk slot: odd rows have their two 64-byte halves swapped
__device__ __forceinline__ int piece_at(int r, int u) { return r * 128 + ((u ^ ((r & 1) << 2)) << 4); }

// The shared memory of one CTA: the warps' rings [W][STAGES][16 R rows][128 bytes], then the
// reduction [W][16 R][8 MT + 1] (an odd row stride: the threads that add up consecutive
// channels read 32 different banks), then the warps' sums of squares of an RMSNorm prologue [W];
// past BYTES, a prologue's activation row (launch() adds its bytes)
template <int R, int TOK, int W>
struct Layout {
  static constexpr int MT = TOK > 8 ? 2 : 1;  // 8-token MMA tiles
  static constexpr int STAGES = TOK > 8 ? (R == 1 ? QLP_W8_SLOTS_R1_T16 : QLP_W8_SLOTS_R2_T16)
                                        : (R == 1 ? QLP_W8_SLOTS_R1 : QLP_W8_SLOTS_R2);
  static constexpr int SLOT_B = 16 * R * 128;
  static constexpr int RING_B = W * STAGES * SLOT_B;
  static constexpr int RED_ROW = 8 * MT + 1;
  static constexpr int RED_B = W * 16 * R * RED_ROW * 4;
  static constexpr int BYTES = RING_B + RED_B + W * 4;
};

// MODE: W8A8, W8A16, BLOCK or BLOCK_Q; ELEM: E4M3 or S8, the weight; X: the activation, uint8_t for
// W8A8 and BLOCK_Q (quantized in ELEM's format) or __nv_bfloat16 / __half; O: the output dtype; TOK: tokens per CTA
// (1, 8 or 16; larger M takes more CTAs along y); R: 16-row tiles per warp; W: warps a CTA; PRO: the
// launch has a prologue (p.prologue; one token and a 16-bit activation only), so the activation is
// read from shared memory: a kernel of its own
template <int MODE, int ELEM, typename X, typename O, int TOK, int R, int W, bool PRO = false>
__global__ void __launch_bounds__(W * 32) w8_kernel(const __grid_constant__ Params p) {
  using L = Layout<R, TOK, W>;
  static_assert(bytes_in(MODE) == std::is_same<X, uint8_t>::value, "W8A8 and BLOCK_Q take bytes, the others 16-bit values");
  static_assert(!PRO || (TOK == 1 && !bytes_in(MODE)), "a prologue: one token, a 16-bit activation");
  static_assert(!per_chunk(MODE) || ELEM == E4M3, "fp8_block is e4m3");
  using A = typename std::conditional<bytes_in(MODE), typename Acc<ELEM>::type, float>::type;
  constexpr int XV = bytes_in(MODE) ? 1 : 2;  // 16-byte pieces of activation a lane reads per (half chunk, token)
  constexpr int MT = L::MT;
  constexpr int STAGES = L::STAGES;
  extern __shared__ __align__(16) uint8_t smem[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tok0 = blockIdx.y * TOK;
  const int tokens = min(TOK, p.m - tok0);
  const int nchunks = p.k / 128;
  const int nch = warp < nchunks ? (nchunks - warp + W - 1) / W : 0;  // this warp's chunks of a tile
  const int ntiles = blockIdx.x < p.total_tiles ? (p.total_tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;

  uint8_t* ring = smem + warp * STAGES * L::SLOT_B;
  A (*red)[16 * R][L::RED_ROW] = reinterpret_cast<A (*)[16 * R][L::RED_ROW]>(smem + L::RING_B);
  const X* x_tok = static_cast<const X*>(p.x) + (long long)tok0 * p.x_stride;

  // what the next cp.async copies: chunk ci of the CTA's tile tj into slot ts; per-lane sources
  int tj = 0, ci = 0, ts = 0;
  const uint8_t* w_src[4 * R];
  auto at_tile = [&](int j) {
    int tile = blockIdx.x + j * gridDim.x;
    const Segment sg = pick(p, tile);
#pragma unroll
    for (int q = 0; q < 4 * R; ++q) {  // 4 R pieces of 16 bytes a lane: row piece / 8, bytes 16 * (piece % 8)
      const int piece = lane + 32 * q;
      const int row = min(tile * 16 * R + (piece >> 3), sg.n - 1);
      w_src[q] = sg.w + (long long)row * sg.w_stride + warp * 128 + (piece & 7) * 16;
    }
  };
  auto issue = [&]() {
    if (tj < ntiles) {
      uint8_t* slot = ring + ts * L::SLOT_B;
      const int step = ci * W * 128;  // bytes past this warp's first chunk
#pragma unroll
      for (int q = 0; q < 4 * R; ++q) {
        const int piece = lane + 32 * q;
        cp_async<16>(slot + piece_at(piece >> 3, piece & 7), w_src[q] + step);
      }
      if (++ci == nch) {
        ci = 0;
        if (++tj < ntiles) at_tile(tj);
      }
    }
    cp_commit();  // an empty group past the end keeps the count that cp_wait relies on
    ts = ts + 1 == STAGES ? 0 : ts + 1;
  };
  if (nch == 0) tj = ntiles;  // a warp without chunks copies nothing, but meets the others at each tile's end
  else if (ntiles > 0) at_tile(0);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue();
  // the copies above read weights only, which no kernel before this one writes: in a programmatic
  // dependent launch they load while the kernel that writes the activation finishes
  grid_dependency_wait();
  launch_dependents();

  // A prologue (one token, a 16-bit activation): each warp makes its chunks of the activation row
  // (c = warp + i W, chunk i at 256 i of its region of shared memory past L::BYTES) once, for all the
  // CTA's tiles, and reads them from there; a warp reads only its own chunks.  Made per chunk as it
  // was loaded instead (from L2, for every tile), the arithmetic made the launches 30-60% slower
  // (H200, Llama-3-8B shapes, benchmarks/results/h200/e2e/fusion_w8/per_chunk).  An RMSNorm first needs the row's sum of squares: each warp's share of
  // it, then the warps' sums meet in shared memory (every warp meets the barrier, those without
  // chunks too), then each warp normalises its chunks where they are
  const int prologue = PRO ? p.prologue : PRO_NONE;
  uint8_t* x_row = smem + L::BYTES + warp * ((nchunks + W - 1) / W) * 256;
  if constexpr (PRO) {
    const uint4* src = reinterpret_cast<const uint4*>(x_tok);
    uint4* dst = reinterpret_cast<uint4*>(x_row);
    const int pieces = nch * 16;  // of 16 bytes; piece j of the warp's is piece at(j) of the row
    auto at = [&](const int j) { return (warp + (j >> 4) * W) * 16 + (j & 15); };
    if (prologue == PRO_SILU_MUL) {
      const uint4* up = reinterpret_cast<const uint4*>(static_cast<const X*>(p.x2) + (long long)tok0 * p.x_stride);
#pragma unroll 4
      for (int j = lane; j < pieces; j += 32) dst[j] = silu_mul8<X>(__ldg(src + at(j)), __ldg(up + at(j)));
    } else {
      float ss = 0.f;
#pragma unroll 4
      for (int j = lane; j < pieces; j += 32) {
        const uint4 v = __ldg(src + at(j));
        dst[j] = v;
        ss += sum8<X, true>(v);
      }
      // the norm's weights after the barrier: loaded before it, with the first pieces, and kept in
      // registers across it, they measured no faster (benchmarks/results/h200/e2e/fusion_w8/norm_weights_early)
      const float r = rms_scale<W>(ss, reinterpret_cast<float*>(smem + L::RING_B + L::RED_B), p.k, p.eps);
      const uint4* nw = reinterpret_cast<const uint4*>(p.norm_w);
#pragma unroll 4
      for (int j = lane; j < pieces; j += 32) dst[j] = rmsnorm8<X>(dst[j], __ldg(nw + at(j)), r);
    }
    __syncwarp();
  }

  // the activation of chunk c: the 16 k of (half h, lane t) of its token, 16 * XV bytes per (half,
  // 8-token tile) a lane; zeros past the last token (with a prologue, from the warp's region)
  uint4 xr[2][MT][XV], xc[2][MT][XV];  // the next chunk's, this chunk's
  auto load_x = [&](int c) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int jj = 0; jj < MT; ++jj) {
        const int tk = 8 * jj + g;
        const uint4* src = PRO ? reinterpret_cast<const uint4*>(x_row + (c - warp) / W * 256 + h * 128 + t * 32)
                               : reinterpret_cast<const uint4*>(x_tok + (long long)tk * p.x_stride + c * 128 + h * 64 + t * 16);
#pragma unroll
        for (int v = 0; v < XV; ++v) xr[h][jj][v] = tk < tokens ? (PRO ? src[v] : __ldg(src + v)) : make_uint4(0, 0, 0, 0);
      }
  };
  if (nch > 0 && ntiles > 0) load_x(warp);

  int cs = 0;  // the slot computed next
  for (int j = 0; j < ntiles; ++j) {
    int tile = blockIdx.x + j * gridDim.x;
    const Segment sg = pick(p, tile);
    const int row0 = tile * 16 * R;
    // one token: the residuals of the outputs this thread stores at the tile's end, loaded now, so
    // their latency hides behind the tile's chunks (more tokens load them as they store)
    constexpr int OUTS = R * 16 * MT * 8, RES_N = (OUTS + W * 32 - 1) / (W * 32);
    float res[RES_N];
    if constexpr (TOK == 1) load_residuals<O, R * 16, W * 32>(res, sg.res, row0, sg.n);
    A acc[R][MT][4], acc2[R][MT][4];  // two accumulators: two independent chains of MMAs
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int jj = 0; jj < MT; ++jj)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][jj][e] = acc2[r][jj][e] = 0;

    for (int i = 0; i < nch; ++i) {
      issue();
      const int c = warp + i * W;
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int jj = 0; jj < MT; ++jj)
#pragma unroll
          for (int v = 0; v < XV; ++v) xc[h][jj][v] = xr[h][jj][v];
      if (i + 1 < nch) load_x(c + W);
      else if (j + 1 < ntiles) load_x(warp);
      cp_wait<STAGES - 1>();
      __syncwarp();
      const uint8_t* slot = ring + cs * L::SLOT_B;
      cs = cs + 1 == STAGES ? 0 : cs + 1;
      // the chunk's MMAs, into (c1, c2): two independent chains
      auto mmas = [&](A (&c1)[R][MT][4], A (&c2)[R][MT][4], const uint4 (&xq)[2][MT]) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint4 lo = *reinterpret_cast<const uint4*>(slot + piece_at(16 * r + g, 4 * h + t));
            const uint4 hi = *reinterpret_cast<const uint4*>(slot + piece_at(16 * r + g + 8, 4 * h + t));
            if constexpr (MODE == W8A16) {
              // word q of the 16 bytes (k 4q..4q+3) of rows g and g + 8 with the token's values 4q..4q+3
              const uint32_t wl[4] = {lo.x, lo.y, lo.z, lo.w}, wh[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                uint32_t al[2], ah[2];
                widen<ELEM, X>(wl[q], al);
                widen<ELEM, X>(wh[q], ah);
#pragma unroll
                for (int jj = 0; jj < MT; ++jj) {
                  const uint4& xv = xc[h][jj][q >> 1];
                  mma16<X>(q & 1 ? c2[r][jj] : c1[r][jj], al[0], ah[0], al[1], ah[1], q & 1 ? xv.z : xv.x, q & 1 ? xv.w : xv.y);
                }
              }
            } else {
#pragma unroll
              for (int jj = 0; jj < MT; ++jj) {
                mma<ELEM>(c1[r][jj], lo.x, hi.x, lo.y, hi.y, xq[h][jj].x, xq[h][jj].y);
                mma<ELEM>(c2[r][jj], lo.z, hi.z, lo.w, hi.w, xq[h][jj].z, xq[h][jj].w);
              }
            }
          }
      };
      if constexpr (per_chunk(MODE)) {
        // the group's e4m3 bytes and scale per token; the chunk's sums scaled by the scales of their
        // token (column 2t / 2t + 1 of the fragment: BLOCK quantized it in the quad of lanes 8t /
        // 8t + 4, BLOCK_Q reads it) and of the tile's 128-row weight block
        uint4 xq[2][MT];
        float sx_col[MT][2];
#pragma unroll
        for (int jj = 0; jj < MT; ++jj) {
          if constexpr (MODE == BLOCK) {
            const uint4 xg[2][2] = {{xc[0][jj][0], xc[0][jj][1]}, {xc[1][jj][0], xc[1][jj][1]}};
            uint4 qg[2];
            const float sx = quantize_group<X>(xg, qg);
            xq[0][jj] = qg[0];
            xq[1][jj] = qg[1];
            sx_col[jj][0] = __shfl_sync(0xFFFFFFFFu, sx, 8 * t);
            sx_col[jj][1] = __shfl_sync(0xFFFFFFFFu, sx, 8 * t + 4);
          } else {
            xq[0][jj] = xc[0][jj][0];
            xq[1][jj] = xc[1][jj][0];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int tk = 8 * jj + 2 * t + e;  // zeros past the last token: any finite scale
              sx_col[jj][e] = tk < tokens ? __ldg(p.sx + (long long)(tok0 + tk) * p.sx_stride + c) : 0.f;
            }
          }
        }
        A part[R][MT][4], part2[R][MT][4];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int jj = 0; jj < MT; ++jj)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[r][jj][e] = part2[r][jj][e] = 0.f;
        mmas(part, part2, xq);
        const float sw = __ldg(sg.sw + (long long)(row0 >> 7) * sg.sw_stride + c);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int jj = 0; jj < MT; ++jj)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[r][jj][e] = fmaf(part[r][jj][e] + part2[r][jj][e], sx_col[jj][e & 1] * sw, acc[r][jj][e]);
      } else {
        uint4 xq[2][MT];  // W8A8: the quantized bytes as loaded (unused by W8A16)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int jj = 0; jj < MT; ++jj) xq[h][jj] = xc[h][jj][0];
        mmas(acc, acc2, xq);
      }
      __syncwarp();  // every lane is done with the slot before a later cp.async refills it
    }

    // the warps' partial sums of this tile meet in shared memory, while the rings already hold the
    // next tile's first chunks
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int jj = 0; jj < MT; ++jj) {
        red[warp][16 * r + g][8 * jj + 2 * t] = acc[r][jj][0] + acc2[r][jj][0];
        red[warp][16 * r + g][8 * jj + 2 * t + 1] = acc[r][jj][1] + acc2[r][jj][1];
        red[warp][16 * r + g + 8][8 * jj + 2 * t] = acc[r][jj][2] + acc2[r][jj][2];
        red[warp][16 * r + g + 8][8 * jj + 2 * t + 1] = acc[r][jj][3] + acc2[r][jj][3];
      }
    __syncthreads();
    // output idx of the tile (r1: its preloaded residual, one token only)
    auto store_out = [&](const int idx, const float r1) {
      const int rr = idx % (R * 16), tt = idx / (R * 16);  // consecutive threads: consecutive channels
      const int row = row0 + rr;
      if (row >= sg.n || tt >= tokens) return;
      A v = 0;
#pragma unroll
      for (int w = 0; w < W; ++w) v += red[w][rr][tt];
      float y = static_cast<float>(v);
      if constexpr (!per_chunk(MODE)) y *= sg.sw[row * sg.sw_stride];  // fp8_block: scaled per chunk
      if constexpr (MODE == W8A8) y *= p.sx[(tok0 + tt) * p.sx_stride];
      if (sg.bias) y += Io<O>::load(sg.bias, row);
      if (sg.res)
        y = round_to<O>(y) + (TOK == 1 ? r1 : Io<O>::load(sg.res, (long long)(tok0 + tt) * sg.res_stride + row));
      Io<O>::store(sg.out, (long long)(tok0 + tt) * sg.out_stride + row, y);
    };
    // The stores unrolled, except in BLOCK_Q's 16-token kernel of 32-row tiles, which ptxas schedules
    // 12-15% faster behind a plain loop (the form before 503d963).  The other kernels are up to 16%
    // slower with it, or faster only in tiles their rule does not take.  H200, M = 16, us unrolled /
    // plain on (4096, 14336) / (14336, 4096) / (4096, 6144)
    // (benchmarks/results/h200/decode/recheck_48/fp8_block_m16/epilogue, every_form/ there for the
    // other forms): BLOCK_Q 32 rows 27.0 / 24.3, 23.7 / 20.5, 14.5 / 12.9; BLOCK_Q 16 rows 24.9 / 27.9,
    // 20.8 / 22.8, 14.1 / 15.5; BLOCK 32 rows 30.3 / 34.2, 24.1 / 27.9, 15.9 / 17.6
    if constexpr (MODE == BLOCK_Q && TOK == 16 && R == 2) {
      for (int idx = threadIdx.x; idx < OUTS; idx += W * 32) store_out(idx, 0.f);
    } else {
#pragma unroll
      for (int q = 0; q < RES_N; ++q) {
        const int idx = threadIdx.x + q * W * 32;
        if (idx >= OUTS) break;
        store_out(idx, TOK == 1 ? res[q] : 0.f);
      }
    }
    __syncthreads();  // the reduction space is free again
  }
  cp_wait<0>();
}

template <int MODE, int ELEM, typename X, typename O, int TOK, int R, int W>
cudaError_t launch(const Params& p, bool pdl, cudaStream_t stream) {
  constexpr int bytes = Layout<R, TOK, W>::BYTES;
  if constexpr (TOK == 1 && !bytes_in(MODE)) {
    if (p.prologue != PRO_NONE)  // and the warps' regions of the activation row (2 K bytes, and some padding)
      return launch_persistent<w8_kernel<MODE, ELEM, X, O, TOK, R, W, true>, TOK, W * 32>(
          p, bytes + W * ((p.k / 128 + W - 1) / W) * 256, pdl, stream);
  }
  return launch_persistent<w8_kernel<MODE, ELEM, X, O, TOK, R, W>, TOK, W * 32>(p, bytes, pdl, stream);
}

// 4 or 8 warps a CTA, any M (the caller's rule: cuda_w8a8.warps_for)
template <int MODE, int ELEM, typename X, typename O, int TOK, int R>
cudaError_t dispatch_w(const Params& p, int warps, bool pdl, cudaStream_t stream) {
  if (warps == 4) return launch<MODE, ELEM, X, O, TOK, R, 4>(p, pdl, stream);
  return launch<MODE, ELEM, X, O, TOK, R, 8>(p, pdl, stream);
}

// 48-row tiles (3) for 16 tokens a CTA and a scale per channel or per tensor only (a tile of
// fp8_block must stay inside one 128-row weight block): one CTA of 8 warps an SM there, and 6144
// channels (q/k/v) make 128 tiles of 48 rows for one round where 192 of 32 take two
template <int MODE, int ELEM, typename X, typename O, int TOK>
cudaError_t dispatch_r(const Params& p, int row_tiles, int warps, bool pdl, cudaStream_t stream) {
  if constexpr (TOK == 16 && !per_chunk(MODE)) {
    if (row_tiles == 3) return dispatch_w<MODE, ELEM, X, O, TOK, 3>(p, warps, pdl, stream);
  }
  return row_tiles == 1 ? dispatch_w<MODE, ELEM, X, O, TOK, 1>(p, warps, pdl, stream)
                        : dispatch_w<MODE, ELEM, X, O, TOK, 2>(p, warps, pdl, stream);
}

template <int MODE, int ELEM, typename X, typename O>
cudaError_t dispatch_m(const Params& p, int row_tiles, int warps, bool pdl, cudaStream_t stream) {
  if (p.m == 1) return dispatch_r<MODE, ELEM, X, O, 1>(p, row_tiles, warps, pdl, stream);
  return p.m <= 8 ? dispatch_r<MODE, ELEM, X, O, 8>(p, row_tiles, warps, pdl, stream)
                  : dispatch_r<MODE, ELEM, X, O, 16>(p, row_tiles, warps, pdl, stream);
}

// W8A8 and BLOCK_Q: a quantized activation, the output in any of the three dtypes
template <int MODE, int ELEM>
cudaError_t dispatch_8(const Params& p, int out_dtype, int row_tiles, int warps, bool pdl, cudaStream_t stream) {
  if (out_dtype == 0) return dispatch_m<MODE, ELEM, uint8_t, __nv_bfloat16>(p, row_tiles, warps, pdl, stream);
  if (out_dtype == 1) return dispatch_m<MODE, ELEM, uint8_t, __half>(p, row_tiles, warps, pdl, stream);
  return dispatch_m<MODE, ELEM, uint8_t, float>(p, row_tiles, warps, pdl, stream);
}

// W8A16 and BLOCK: the output in the activation's dtype
template <int MODE, int ELEM>
cudaError_t dispatch_16(const Params& p, int act_dtype, int row_tiles, int warps, bool pdl, cudaStream_t stream) {
  return act_dtype == 0 ? dispatch_m<MODE, ELEM, __nv_bfloat16, __nv_bfloat16>(p, row_tiles, warps, pdl, stream)
                        : dispatch_m<MODE, ELEM, __half, __half>(p, row_tiles, warps, pdl, stream);
}

}  // namespace
}  // namespace qlp

extern "C" {

// The version of Params / Segment this library was built with (the caller checks it matches its own).
int qlp_w8a8_abi(void) { return (int)(sizeof(qlp::Params) * 1000 + qlp::MAX_SEGMENTS * 10 + qlp::ABI_VERSION); }

static int qlp_fail(char* err, int err_len, const char* what) {
  snprintf(err, err_len, "%s", what);
  return 1;
}

static int qlp_launched(cudaError_t e, char* err, int err_len) {
  if (e == cudaSuccess) return 0;
  snprintf(err, err_len, "kernel launch failed: %s", cudaGetErrorString(e));
  return 1;
}

// Why the parts every form shares cannot run (null when they can); `prologue`: the form takes a
// 16-bit activation, which a prologue may make (else p->prologue must be none)
static const char* qlp_check(const qlp::Params* p, int elem, int row_tiles, int warps, bool block_scales, bool prologue) {
  if (const char* why = qlp::check_segments<qlp::MAX_SEGMENTS, 3>(*p, row_tiles)) return why;
  if (row_tiles == 3 && (p->m <= 8 || block_scales))
    return "row_tiles 3 (48 channels a tile) needs more than 8 tokens and a scale per channel or per tensor";
  if (warps != 8 && warps != 4) return "warps must be 8 or 4";
  if (p->k % 128 != 0) return "K must be a multiple of 128";
  if (elem != 0 && elem != 1) return "elem must be 0 (fp8 e4m3) or 1 (int8)";
  if (p->prologue < qlp::PRO_NONE || p->prologue > qlp::PRO_SILU_MUL) return "prologue must be 0 (none), 1 (rmsnorm) or 2 (silu_mul)";
  if (p->prologue != qlp::PRO_NONE) {
    if (!prologue) return "a quantized activation takes no prologue (rmsnorm, silu_mul)";
    if (p->m != 1) return "a prologue (rmsnorm, silu_mul) runs with one token (M = 1) only";
    if (p->k > qlp::PRO_MAX_K) return "a prologue (rmsnorm, silu_mul) takes K <= 32768";
    if (p->prologue == qlp::PRO_RMSNORM ? !p->norm_w : !p->x2) return "the prologue's second operand is missing";
  }
  return nullptr;
}

// W8A8, launched on `stream`.  elem: 0 fp8 e4m3, 1 int8; out_dtype: 0 bf16, 1 fp16, 2 fp32;
// row_tiles: 1 or 2 (16 or 32 channels a tile), or 3 (48) above 8 tokens; the caller sets every
// segment's `tiles` for rows of 16 * row_tiles and p->total_tiles to their sum.  warps: a CTA's, 8
// or 4.  pdl: 1 to launch with programmatic dependent launch (sm90+; the caller
// vouches that the kernel before it in the stream wrote none of the layers' weights), 0 not.
// Returns 0, or writes why not into err.
int qlp_w8a8_decode(const qlp::Params* p, int elem, int out_dtype, int row_tiles, int warps, int pdl, void* stream,
                    char* err, int err_len) {
  if (const char* why = qlp_check(p, elem, row_tiles, warps, false, false)) return qlp_fail(err, err_len, why);
  if (out_dtype < 0 || out_dtype > 2) return qlp_fail(err, err_len, "out_dtype must be 0 (bf16), 1 (fp16) or 2 (fp32)");
  if (p->m <= 0 || p->total_tiles == 0) return 0;
  if (elem == 0 && qlp::device_sm() < 89) return qlp_fail(err, err_len, "fp8 MMAs need sm89 or newer");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return qlp_launched(elem == 0 ? qlp::dispatch_8<qlp::W8A8, qlp::E4M3>(*p, out_dtype, row_tiles, warps, pdl != 0, s)
                                : qlp::dispatch_8<qlp::W8A8, qlp::S8>(*p, out_dtype, row_tiles, warps, pdl != 0, s), err, err_len);
}

// W8A16 (weight-only), launched on `stream`: as qlp_w8a8_decode, with a 16-bit activation that is
// also the output's dtype (act_dtype: 0 bf16, 1 fp16) and no activation scale; with one token (M = 1)
// p->prologue may make the activation as it is loaded.
int qlp_w8a16_decode(const qlp::Params* p, int elem, int act_dtype, int row_tiles, int warps, int pdl, void* stream,
                     char* err, int err_len) {
  if (const char* why = qlp_check(p, elem, row_tiles, warps, false, true)) return qlp_fail(err, err_len, why);
  if (act_dtype != 0 && act_dtype != 1) return qlp_fail(err, err_len, "act_dtype must be 0 (bf16) or 1 (fp16)");
  if (p->m <= 0 || p->total_tiles == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return qlp_launched(elem == 0 ? qlp::dispatch_16<qlp::W8A16, qlp::E4M3>(*p, act_dtype, row_tiles, warps, pdl != 0, s)
                                : qlp::dispatch_16<qlp::W8A16, qlp::S8>(*p, act_dtype, row_tiles, warps, pdl != 0, s), err, err_len);
}

// fp8_block, launched on `stream`: as qlp_w8a16_decode with e4m3 weights (elem 0) scaled per
// 128x128 block (each segment's sw: [ceil(n / 128), k / 128], rows sw_stride apart); the 16-bit
// activation is quantized to e4m3 per 1x128 group inside the kernel.
int qlp_fp8_block_decode(const qlp::Params* p, int elem, int act_dtype, int row_tiles, int warps, int pdl, void* stream,
                         char* err, int err_len) {
  if (const char* why = qlp_check(p, elem, row_tiles, warps, true, true)) return qlp_fail(err, err_len, why);
  if (elem != 0) return qlp_fail(err, err_len, "fp8_block weights are fp8 e4m3 (elem 0)");
  if (act_dtype != 0 && act_dtype != 1) return qlp_fail(err, err_len, "act_dtype must be 0 (bf16) or 1 (fp16)");
  if (p->m <= 0 || p->total_tiles == 0) return 0;
  if (qlp::device_sm() < 89) return qlp_fail(err, err_len, "fp8 MMAs need sm89 or newer");
  return qlp_launched(qlp::dispatch_16<qlp::BLOCK, qlp::E4M3>(*p, act_dtype, row_tiles, warps, pdl != 0, static_cast<cudaStream_t>(stream)),
                      err, err_len);
}

// fp8_block with the activation quantized before the kernel (BLOCK_Q), launched on `stream`: as
// qlp_w8a8_decode with e4m3 bytes (elem 0), p->sx the activation's fp32 scales per 1x128 group
// ([m, k / 128], rows p->sx_stride apart) and each segment's sw per 128x128 weight block.
int qlp_fp8_block_q_decode(const qlp::Params* p, int elem, int out_dtype, int row_tiles, int warps, int pdl, void* stream,
                           char* err, int err_len) {
  if (const char* why = qlp_check(p, elem, row_tiles, warps, true, false)) return qlp_fail(err, err_len, why);
  if (elem != 0) return qlp_fail(err, err_len, "fp8_block is fp8 e4m3 (elem 0)");
  if (out_dtype < 0 || out_dtype > 2) return qlp_fail(err, err_len, "out_dtype must be 0 (bf16), 1 (fp16) or 2 (fp32)");
  if (p->m <= 0 || p->total_tiles == 0) return 0;
  if (p->sx == nullptr) return qlp_fail(err, err_len, "the activation's group scales are missing");
  if (qlp::device_sm() < 89) return qlp_fail(err, err_len, "fp8 MMAs need sm89 or newer");
  return qlp_launched(qlp::dispatch_8<qlp::BLOCK_Q, qlp::E4M3>(*p, out_dtype, row_tiles, warps, pdl != 0, static_cast<cudaStream_t>(stream)),
                      err, err_len);
}

}  // extern "C"
