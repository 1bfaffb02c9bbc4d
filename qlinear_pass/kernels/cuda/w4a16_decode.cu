// w4a16 at decode sizes: y[m, n] = sum_k x[m, k] * (q[n, k] - z[n, k/G]) * s[n, k/G] (+ bias[n]),
// int4 weights in the MMA-fragment layout of kernels/int4_layout.py (atoms of 16 rows x 16 k, a
// lane's A fragment in one 32-bit word; the atoms of a 16-row block follow each other along K),
// 16-bit activations.
//
// A decode step reads every weight byte once, so the kernel is judged by bytes per second; with
// 4-bit weights the arithmetic per byte doubles and an fp32 FMA loop is bound by instructions, not
// by memory.  Here the tensor cores do the multiply-adds and the CUDA cores only unpack:
//
// * mma.sync m16n8k16: the weight is the 16-row A operand (rows = output channels), the activation
//   the 8-column B operand (columns = tokens; one token at M = 1 wastes columns, not time);
// * weights travel by cp.async into a ring of STAGES chunk slots per warp (a chunk: 128 k of the
//   warp's 16 R rows, with their scales and zero points): STAGES - 1 chunks stay in flight while the
//   warp computes on one, so HBM sees a steady stream and registers hold only the chunk in use;
// * a sub-chunk is 8 * VEC k (AS = VEC / 2 atoms) and never straddles a quantization group
//   (8 * VEC <= G), so its MMAs accumulate into a fresh fragment scaled once, in fp32, by the group
//   scale of its row;
// * an atom is an 8 x 8 tile of 16-byte rows with lane i's word at byte 4 i, so one ldmatrix hands
//   each lane its words of four atoms; a lane's word becomes its four A registers with one LOP3 each
//   (the nibble pair under the exponent of 128 / 1024: (word >> 4i) & 0x000F000F | magic), holding
//   BIAS + q; the MMAs multiply these, and BIAS + z times the activation's sum over the group (see
//   below) comes off in fp32 (z is 8 in kernels built for layers without zero points).  The
//   activation enters in its natural k order;
// * the W warps of a CTA split K (chunk c goes to warp c % W) and add up through shared memory at
//   the end of each row tile: no workspace, no atomics; the output is written once, in its dtype;
// * CTAs are persistent (about as many as fit on the GPU at once): each walks its row tiles while
//   its warps' rings run on from one tile into the next;
// * the activation: with more than one token, each chunk's 128 values of each of the CTA's tokens
//   travel in the ring beside its weights (from L2: it is small, and every CTA reads it), and MMAs
//   with an all-ones A sum them.  Where the CTAs walk several row tiles and the rows fit, they stay
//   in a region of shared memory per warp after the first tile, with those sums (XR): the later
//   tiles' slots carry weights only, and no MMAs sum.  With one token, each warp loads its chunks
//   of the row into its region once, before the first tile, with their sums from the same
//   registers.  ldmatrix turns the activation into the MMAs' B fragments, four 8 x 8 tiles an
//   instruction (one token fills all 8 columns; only the first is written out);
// * up to MAX_SEGMENTS layers that read the same activation (q/k/v, gate/up) share one launch: the
//   row tiles of the layers are numbered one after another;
// * launched with programmatic dependent launch (`pdl`), the CTAs start while the kernel before
//   finishes and copy their first chunks' weights; the activation only after grid_dependency_wait().
//
// Built with nvcc on first use (kernels/cuda_build.py) into a shared library that Python calls
// through ctypes; the launch goes to the caller's stream, so CUDA graphs capture it.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include <algorithm>
#include <atomic>
#include <type_traits>


namespace qlp {

constexpr int MAX_SEGMENTS = 3;
// cp.async ring slots a warp, with 16-row / 32-row tiles, for CTAs of 8 warps and of 4 (the caller
// picks the warps per launch); defines only for benchmarks/bench_cuda_ring.py, which times other values
#ifndef QLP_SLOTS_R1
#define QLP_SLOTS_R1 3
#endif
#ifndef QLP_SLOTS_R2
#define QLP_SLOTS_R2 3
#endif
#ifndef QLP_SLOTS4_R1
#define QLP_SLOTS4_R1 4
#endif
#ifndef QLP_SLOTS4_R2
#define QLP_SLOTS4_R2 3
#endif
// one token (M = 1) in CTAs of 8 warps: slots a warp with 16-row / 32-row tiles.  More copies in
// flight while the prologue loads the row did not pay: 5 / 7 slots with 32-row tiles took down_proj
// (K = 14336) 11.2 / 12.1 us against 11.8 and o_proj (K = 4096) 6.2 against 5.7 (H200, M = 1, fused
// calls of 32 layers, benchmarks/results/h200/decode/cuda_w4a16/trace/variants/slots1.json)
#ifndef QLP_SLOTS1_R1
#define QLP_SLOTS1_R1 QLP_SLOTS_R1
#endif
#ifndef QLP_SLOTS1_R2
#define QLP_SLOTS1_R2 QLP_SLOTS_R2
#endif
// cp.async ring slots a warp where 8 / 16 tokens' activation rows stay in shared memory (XR below):
// the slots then carry weights only (past the first tile), and one CTA an SM has room for more of
// them; 4 and 6 were no faster than 3 (bench_cuda_ring.py --set xrow, H200).  8 tokens with groups
// of 128 or more: 2, so that two CTAs (110 KB each at K = 4096) share an SM, us with 2 / 3 slots
// (--set xr8, H200, M = 8): (4096, 14336) 13.7 / 14.8, gate/up 23.4 / 23.9, q/k/v 8.6 / 8.8; groups
// of 32 / 64 keep 3 (their scales and sums leave room for one CTA either way)
#ifndef QLP_SLOTS_XR8
#define QLP_SLOTS_XR8 2
#endif
#ifndef QLP_SLOTS_XR8_G64
#define QLP_SLOTS_XR8_G64 3
#endif
#ifndef QLP_SLOTS_XR16
#define QLP_SLOTS_XR16 3
#endif
// Kernels of at least this many tokens a CTA load every weight word of a chunk before its first
// MMA, the others each block's words just before its MMAs (1 / 8 / 16; 32: none).  H200, us, all at
// once against one block at a time (benchmarks/results/h200/decode/cuda_w4a16/hoist): 16 tokens
// 18.1 / 19.7 on (4096, 14336), 29.5 / 32.3 on gate/up, 11.2 / 11.7 on q/k/v; 8 tokens 16.5 / 15.8
// and 26.2 / 25.1 (so 8 keep the old order); one token the same
#ifndef QLP_HOIST_TOK
#define QLP_HOIST_TOK 16
#endif
// 0: 8 / 16 tokens' rows always travel in the ring (the rule in dispatch_w() otherwise)
#ifndef QLP_XR_TOKENS
#define QLP_XR_TOKENS 1
#endif
// For more than one token: CTAs an SM the register allocation must leave room for (at M = 1 the
// compiler's choice, 2 CTAs of 8 warps, was 2-11% faster than room for 3 or 4: bench_cuda_ring.py
// --set occupancy, H200)
#ifndef QLP_MIN_CTAS
#define QLP_MIN_CTAS 1
#endif
// Bytes of DRAM each weight copy asks L2 to fetch (0, 128, 256): a chunk reads 64 bytes of a row,
// and the rest of its 128-byte line belongs to the next chunk, another warp's.  128 was 0-3%
// faster than 0 at M = 1 and the same above (bench_cuda_ring.py --set l2, H100)
#ifndef QLP_L2_FETCH
#define QLP_L2_FETCH 128
#endif
// 1: a CTA lets the next kernel (launched with programmatic dependent launch) start once one of its
// warps has issued its last weight copies, 0: once its prologue is done, 2: only as it exits (the
// next kernel's launch then overlaps this one's completion, not its work).  Each slowed a layer's
// four fused calls at M = 1: 55.9 / 53.4 us against 45.6 without it (H200,
// benchmarks/results/h200/decode/cuda_w4a16/trace/variants/trigger.json), and 52.5 against 45.0 with
// it exiting (.../cuda_w4a16/pdl_exit), so the library's launches at M = 1 go without (pdl_for)
#ifndef QLP_LATE_TRIGGER
#define QLP_LATE_TRIGGER 0
#endif
// Tokens a CTA takes at most (8 or 16); more tokens take more CTAs along y
#ifndef QLP_MAX_TOK
#define QLP_MAX_TOK 16
#endif
// 1: every CTA writes when it starts, finishes its prologue, has its first chunk, ends each tile
// and exits into a buffer set by qlp_w4a16_trace() (benchmarks/trace_decode_layer.py); 0 in the library
#ifndef QLP_TRACE
#define QLP_TRACE 0
#endif
constexpr int ABI_VERSION = 8;  // bumped whenever Params, Segment or the entry point's arguments change

struct Segment {
  const uint8_t* w;     // [n/16][k/16][128] int4 in the MMA-fragment layout, 16-row blocks w_stride bytes apart
  const float* s;       // [n, k/G] fp32 scales, rows s_stride elements apart (16-byte aligned)
  const uint8_t* z;     // [n, k/G] zero points 0..15, rows z_stride apart (4-byte aligned); null: symmetric
  const void* bias;     // [n] in the activation dtype, or null
  void* out;            // [m, n] in the activation dtype, rows out_stride elements apart
  const void* res;      // [m, n] in the activation dtype, rows res_stride elements apart, added to the
                        // output as rounded to that dtype (a residual connection); or null
  long long w_stride, s_stride, z_stride, out_stride, res_stride;
  int n;
  int tiles;            // row tiles of this layer: ceil(n / rows per tile)
};

struct Params {
  const void* x;        // [m, k] activation, rows x_stride elements apart (16-byte aligned)
  long long x_stride;
  int m, k, group, nseg, total_tiles;
  int pdl;              // launched with programmatic dependent launch (set by qlp_w4a16_decode from its argument)
  // what the activation is made of as it is loaded (one token only, M = 1): PRO_NONE x itself;
  // PRO_RMSNORM norm_w * rmsnorm(x) with eps; PRO_SILU_MUL silu(x) * x2 (x2 as x: [m, k], x_stride)
  int prologue;
  float eps;
  const void* x2;
  const void* norm_w;   // [k] in the activation dtype
  Segment seg[MAX_SEGMENTS];
};

// a prologue's row of K values is loaded in one round of at most this many pieces of 16 bytes a warp
constexpr int PRO_PIECES = 256;

// Trace builds (QLP_TRACE): a CTA's record is TRACE_MARKS (globaltimer ns, clock64) pairs, then two
// words of what it ran; each SM (its %smid modulo TRACE_SMS) fills a region of trace_cap records of
// its own, so the CTAs that take a record contend with those of their SM only.  TRACE_SMEM: the
// shared memory a CTA keeps its marks in until then (past the kernel's own, 8-byte aligned)
constexpr int TRACE_MARKS = 16, TRACE_WORDS = 2 * TRACE_MARKS + 2;
constexpr int TRACE_SMEM = QLP_TRACE ? 8 * TRACE_WORDS + 8 : 0;
#if QLP_TRACE
constexpr int TRACE_SMS = 256;
__device__ unsigned long long* trace_buf;
__device__ unsigned int trace_cap, trace_next[TRACE_SMS];
#endif

// internal linkage for the code (see common.cuh)
namespace {

#include "common.cuh"

template <typename T> struct Num;
template <> struct Num<__nv_bfloat16> {
  static constexpr uint32_t MAGIC = 0x43004300u;  // bf16 128.0 twice: 0x4300 | q == 128 + q
  static constexpr uint32_t ONES = 0x3F803F80u;   // bf16 1.0 twice
  static constexpr float BIAS = 128.f;
};
template <> struct Num<__half> {
  static constexpr uint32_t MAGIC = 0x64006400u;  // fp16 1024.0 twice: 0x6400 | q == 1024 + q
  static constexpr uint32_t ONES = 0x3C003C00u;   // fp16 1.0 twice
  static constexpr float BIAS = 1024.f;
};

// (a & 0x000F000F) | MAGIC: the nibbles at bits 0-3 and 16-19 as two 16-bit floats BIAS + q
template <uint32_t MAGIC>
__device__ __forceinline__ uint32_t nibbles(uint32_t a) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(0x000F000Fu), "n"(MAGIC));
  return d;
}

// Four 8 x 8 tiles of 16-bit values from shared memory: lane i gives the 16-byte row i % 8 of tile
// i / 8, and lane 4 g + t receives (row g, columns 2 t, 2 t + 1) of tile j in d_j
__device__ __forceinline__ void ldsm_x4(uint32_t& d0, uint32_t& d1, uint32_t& d2, uint32_t& d3, const void* row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(d0), "=r"(d1), "=r"(d2), "=r"(d3) : "r"(a) : "memory");
}

// Two 8 x 8 tiles: lanes 0-15 give the rows (lane i row i % 8 of tile i / 8), d_j as in ldsm_x4
__device__ __forceinline__ void ldsm_x2(uint32_t& d0, uint32_t& d1, const void* row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(d0), "=r"(d1) : "r"(a) : "memory");
}

// The shared memory of one CTA:
//   the warps' rings   [W][STAGES] slots, each: [R blocks][8 atoms][128] weight bytes, [16 R][SUB]
//                      fp32 scales, [16 R][4] zero-point bytes and, unless XR, [TOK][X_ROW]
//                      activation bytes
//   the reduction      [W][16 R][8 MT] fp32
//   XR only            the CTA's tokens' activation rows, each warp's chunks in a region of its own,
//                      [W][ceil(K / 128 / W)][TOK][256] (no padding; the pieces placed by xr_at()), then
//                      their sums over each sub-chunk [W][ceil(K / 128 / W)][SUB][TOK] fp32 (extra(K)
//                      bytes past BYTES)
// XR: the activation rows stay in shared memory for the whole launch (always for one token; for 8
// or 16 where the CTAs walk several row tiles and K leaves room for them: dispatch_w(), launch())
template <int VEC, int R, int TOK, int W, bool XR>
struct Layout {
  static constexpr int SUB = 16 / VEC;        // sub-chunks (quantization groups) in a chunk
  static constexpr int MT = TOK > 8 ? 2 : 1;  // 8-token MMA tiles
  // chunk slots per warp, all but one in flight while one is read (benchmarks/bench_cuda_ring.py --set
  // occupancy, H200: with 8 warps 3 slots for 32-row tiles up to 7% faster than 2 at M = 8 and 16, at
  // most 2% slower, within 2% at M = 1; with 4 warps 4 / 3 slots 2-4% faster than 6 / 4 on the layers
  // that take 4 warps; --set xrow for the resident rows of 8 / 16 tokens)
  static constexpr int STAGES = XR && TOK > 1 ? (TOK == 8 ? (VEC == 16 ? QLP_SLOTS_XR8 : QLP_SLOTS_XR8_G64) : QLP_SLOTS_XR16)
                                : W == 4 ? (R == 1 ? QLP_SLOTS4_R1 : QLP_SLOTS4_R2)
                                : TOK == 1 ? (R == 1 ? QLP_SLOTS1_R1 : QLP_SLOTS1_R2) : (R == 1 ? QLP_SLOTS_R1 : QLP_SLOTS_R2);
  static constexpr int BLOCK_B = 8 * 128;     // a 16-row block's 8 atoms of a chunk (lanes read
                                              // consecutive words: no bank conflicts, no padding)
  static constexpr int W_B = R * BLOCK_B;
  static constexpr int S_B = 16 * R * 4 * SUB;
  static constexpr int Z_B = 16 * R * 4;
  // a token's 128 values of a chunk, and 16 bytes of padding: the rows of an 8 x 8 ldmatrix tile
  // then start 4 banks apart, and its 8 rows of 16 bytes cover all 32 banks.  One token needs no
  // padding (every lane reads the same row)
  static constexpr int X_ROW = 128 * 2 + 16;
  static constexpr int X_B = XR ? 0 : TOK * X_ROW;
  static constexpr int SLOT_B = W_B + S_B + Z_B + X_B;
  static constexpr int RING_B = W * STAGES * SLOT_B;
  // a row of the reduction holds the tile's 8 MT tokens and one pad: an odd stride, so the threads
  // that add up consecutive channels read 32 different banks
  static constexpr int RED_ROW = 8 * MT + 1;
  static constexpr int RED_B = W * 16 * R * RED_ROW * 4;
  static constexpr int BYTES = RING_B + RED_B;
  // XR: a token's row of a chunk in shared memory, and a chunk's rows
  static constexpr int XR_ROW = 256;  // no padding: xr_at() swizzles the pieces instead
  static constexpr int XR_CHUNK = TOK * XR_ROW;
  // the dynamic shared memory past BYTES for an activation of K values (XR): the rows of each warp's
  // chunks (up to ceil(K / 128 / W) a warp), then their sums
  // (one token: and W floats for the warps' sums of squares of an RMSNorm prologue)
  __host__ __device__ static constexpr int extra(int k) {
    return XR ? W * ((k / 128 + W - 1) / W) * (XR_CHUNK + 4 * SUB * TOK) + (TOK == 1 ? 4 * W : 0) : 0;
  }
};

// XR with more than one token: where piece u (16 bytes, 0-15) of token row r of a chunk lies in the
// region: rows of 256 bytes, the piece at u ^ (r % 8), so the 8 rows of an ldmatrix tile (one piece
// each) fall on 8 different bank quads without the ring's 16 bytes of padding a row.  (One token's
// region holds one row a chunk, in plain order.)
__device__ __forceinline__ int xr_at(int r, int u) { return r * 256 + ((u ^ (r & 7)) << 4); }

// T: the activation dtype; VEC: a sub-chunk (one scale each) is 8 * VEC k, VEC / 2 atoms (4, 8, 16);
// TOK: tokens per CTA (1, 8 or 16; larger M takes more CTAs along y); R: 16-row tiles per warp (3 for 1 or 8 tokens only);
// W: warps a CTA; ZP: the layers have zero points (else every z is 8); XR: the activation rows stay
// in shared memory (Layout).
template <typename T, int VEC, int TOK, int R, int W, bool ZP, bool XR>
__global__ void __launch_bounds__(W * 32, TOK > 1 ? QLP_MIN_CTAS : 1) w4a16_kernel(const __grid_constant__ Params p) {
  using L = Layout<VEC, R, TOK, W, XR>;
  constexpr int MT = L::MT;
  constexpr int STAGES = L::STAGES;
  constexpr int SUB = 16 / VEC;  // sub-chunks (one group each) in a chunk of 128 k
  constexpr int AS = VEC / 2;    // atoms (16 k) in a sub-chunk
  constexpr uint32_t MAGIC = Num<T>::MAGIC;
  extern __shared__ __align__(16) uint8_t smem[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tok0 = blockIdx.y * TOK;
  const int tokens = min(TOK, p.m - tok0);
  const int nchunks = p.k / 128;
  const int nch = warp < nchunks ? (nchunks - warp + W - 1) / W : 0;  // this warp's chunks of a tile
  const int ntiles = blockIdx.x < p.total_tiles ? (p.total_tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;

  uint8_t* ring = smem + warp * STAGES * L::SLOT_B;
#if QLP_TRACE
  // marks (thread 0, into shared memory past the kernel's own; at the exit the CTA takes a record
  // and copies them there): 0 start, 12 set up, 13 first slots' copies issued, 15 the kernel before
  // done (one token), 14 RMSNorm's scale known, 1 prologue done, 2 warp 0's first chunk in, 3 + j
  // tile j stored (j < 8), 11 exit
  unsigned long long* tm = reinterpret_cast<unsigned long long*>(smem + ((L::BYTES + L::extra(p.k) + 7) & ~7));
  auto mark = [&](const int at) {
    if (threadIdx.x == 0) {
      unsigned long long t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      tm[2 * at] = t;
      tm[2 * at + 1] = clock64();
    }
  };
  if (threadIdx.x == 0)
    for (int w = 0; w < 2 * TRACE_MARKS; ++w) tm[w] = 0;
  mark(0);
#else
  auto mark = [](int) {};
#endif
  float (*red)[16 * R][L::RED_ROW] = reinterpret_cast<float (*)[16 * R][L::RED_ROW]>(smem + L::RING_B);
  const T* x_tok = static_cast<const T*>(p.x) + (long long)tok0 * p.x_stride;

  // what the next cp.async copies: chunk ci of the CTA's tile tj into slot ts; per-lane sources of
  // that tile, set when the copies move to a new tile
  int tj = 0, ci = 0, ts = 0;
  const uint8_t* w_src[R];  // the lane's first 16 bytes of each 16-row block (its second: 512 on)
  // the scales and zero points of the tile's rows lane and lane + 32 (48-row tiles): SR rows a lane
  constexpr int SR = (16 * R + 31) / 32;
  const float* s_src[SR] = {};
  const uint8_t* z_src[SR] = {};
  auto at_tile = [&](int j) {
    int tile = blockIdx.x + j * gridDim.x;
    const Segment sg = pick(p, tile);
#pragma unroll
    for (int b = 0; b < R; ++b) {
      const int block = min(tile * R + b, sg.n / 16 - 1);
      w_src[b] = sg.w + (long long)block * sg.w_stride + warp * L::BLOCK_B + lane * 16;
    }
#pragma unroll
    for (int h = 0; h < SR; ++h) {
      const int row = min(tile * 16 * R + lane + 32 * h, sg.n - 1);
      s_src[h] = sg.s + (long long)row * sg.s_stride + warp * SUB;
      if constexpr (ZP) z_src[h] = sg.z + (long long)row * sg.z_stride;
    }
  };
  // XR: the warp's region of the activation rows and of their sums
  const int max_nch = (nchunks + W - 1) / W;
  uint8_t* x_row = smem + L::BYTES + warp * max_nch * L::XR_CHUNK;
  float* x_sums = reinterpret_cast<float*>(smem + L::BYTES + W * max_nch * L::XR_CHUNK) + warp * max_nch * SUB * TOK;
  // more than one token: a token's 128 values of a chunk, 16 pieces of 16 bytes a token: the lane's
  // piece q (of XP) of the chunk `step` chunks past the warp's first, and where it goes: the slot, or
  // with XR chunk c of the warp's region.  The ring's kernels fill the rows past the last token with
  // zeros (their outputs are not written) where they copied the last token's row into each: every CTA
  // then asked L2 for the same few lines with every chunk, and M = 2 took 19.8 us where M = 8 took 13.9
  // on (14336, 4096); with zeros 11.5 (H200, benchmarks/results/h200/decode/cuda_w4a16/zero_rows).
  // XR kernels copy the rows in their first tile only and keep the copies (zeros cost them 2-5% at
  // M = 12-16, ring_only_vs_everywhere there)
  constexpr int XP = TOK > 1 ? TOK / 2 : 1;
  auto x_here = [&](const int q) { return (lane + 32 * q) >> 4 < tokens; };
  auto x_src = [&](const int step, const int q) {
    const int piece = lane + 32 * q, tk = piece >> 4;
    return x_tok + (long long)min(tk, tokens - 1) * p.x_stride + (warp + step) * 128 + (piece & 15) * 8;
  };
  auto x_dst = [&](uint8_t* slot, const int c, const int q) {
    const int piece = lane + 32 * q;
    return XR ? x_row + c * L::XR_CHUNK + xr_at(piece >> 4, piece & 15)
              : slot + L::W_B + L::S_B + L::Z_B + (piece >> 4) * L::X_ROW + (piece & 15) * 16;
  };
  // the next chunk's weights, scales and zero points, and (act) its activation, as one group of copies
  // (with XR, into the region during the CTA's first tile only)
  auto issue = [&](const bool act) {
    if (tj < ntiles) {
      uint8_t* slot = ring + ts * L::SLOT_B;
      const int step = ci * W;  // chunks past this warp's first one
      // a block's 1024 bytes of the chunk in 64 pieces of 16: the lane's pieces lane and lane + 32
#pragma unroll
      for (int b = 0; b < R; ++b)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          cp_async16_l2<QLP_L2_FETCH>(slot + b * L::BLOCK_B + (lane + 32 * h) * 16, w_src[b] + step * L::BLOCK_B + 512 * h);
#pragma unroll
      for (int h = 0; h < SR; ++h) {
        const int rl = lane + 32 * h;
        if (rl < 16 * R) {  // the row's SUB scales, and the 4-byte word holding its SUB zero points
          cp_async<4 * SUB>(slot + L::W_B + rl * 4 * SUB, s_src[h] + step * SUB);
          if constexpr (ZP) cp_async<4>(slot + L::W_B + L::S_B + rl * 4, z_src[h] + (((warp + step) * SUB) & ~3));
        }
      }
      if (TOK > 1 && act && (!XR || tj == 0)) {
#pragma unroll
        for (int q = 0; q < XP; ++q) {
          if constexpr (XR) cp_async<16>(x_dst(slot, ci, q), x_src(step, q));
          else cp_async16_or_zero(x_dst(slot, ci, q), x_src(step, q), x_here(q));
        }
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
  // One token: each warp's share of the activation row (its chunks, K / W values) by plain loads
  // into its region of shared memory, once for all the CTA's tiles, with their sums over each
  // sub-chunk (what the MMAs' BIAS + z takes off) from the same registers; and the first STAGES - 1
  // slots' weights (which no kernel before this one writes).  In a programmatic dependent launch the
  // weights go first, the activation after grid_dependency_wait(); else the activation's first loads
  // go first.  No CTA barrier: a warp reads only its own chunks.
  // More tokens: the first STAGES - 1 slots (with XR their activation goes to the region, during
  // the first tile only: loading all of it first left a CTA of one or two tiles idle until it was
  // there, 15-70% slower than the ring at M = 8 on N = 6144 and 1024, H200, xrow/upfront).  In a programmatic
  // dependent launch, their weights before grid_dependency_wait(), and their activation after it, by
  // plain loads (all issued, then stored): a cp.async group committed now would complete only after
  // every weight copy before it.  Else each slot's weights and activation as one group (the first
  // chunk waits for its own copies only: 2-10% faster at M = 1 than the two passes, H200)
  const int tj0 = tj;
  if constexpr (XR && TOK == 1) {
    // the warp's chunks c = warp + i W of the activation row, chunk i at 256 i of its region: 16 pieces of
    // 16 bytes a chunk, piece j of the region on lane j % 32; a sub-chunk is VEC pieces, on VEC lanes
    // A prologue's second operand comes with the same pieces: the norm's weights, or SwiGLU's up half
    const uint4* src = reinterpret_cast<const uint4*>(x_tok);
    const uint4* src2 = reinterpret_cast<const uint4*>(p.prologue == PRO_RMSNORM ? p.norm_w : p.x2);
    uint4* dst = reinterpret_cast<uint4*>(x_row);
    const int pieces = nch * 16;
    constexpr int U = PRO_PIECES / 32;  // pieces a lane loads at once (16 chunks a warp: K up to 8192 with 4 warps, 16384 with 8)
    uint4 v[U], v2[U];
    auto load = [&](const int base) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = base + 32 * u + lane;
        if (j < pieces) {
          const int at = (warp + (j >> 4) * W) * 16 + (j & 15);
          v[u] = src[at];
          if (p.prologue != PRO_NONE) v2[u] = src2[at];
        }
      }
    };
    auto store = [&](const int base) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = base + 32 * u + lane;
        if (base + 32 * u < pieces) {  // the same for the warp's lanes
          float sum = 0.f;
          if (j < pieces) {
            if (p.prologue == PRO_SILU_MUL) v[u] = silu_mul8<T>(v[u], v2[u]);
            dst[j] = v[u];
            sum = sum8<T>(v[u]);
          }
#pragma unroll
          for (int o = 1; o < VEC; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
          if (j < pieces && lane % VEC == 0) x_sums[j / VEC] = sum;
        }
      }
    };
    // the first loads ahead of the weight copies where the activation may be read at once (a plain
    // launch): a version that loaded the row after them was 0.1-0.8 us slower a call at M = 1 (H200,
    // benchmarks/results/h200/decode/cuda_w4a16/x_row)
    mark(12);
    if (!p.pdl) load(0);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(false);
    mark(13);
    grid_dependency_wait();
    mark(15);
    if (p.pdl) load(0);
    if (p.prologue == PRO_RMSNORM) {
      // the row's sum of squares over every warp's pieces (all in this first round: PRO_PIECES), then
      // each piece normalised where it is.  Every warp meets the barrier, those without chunks too
      float ss = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (32 * u + lane < pieces) ss += sum8<T, true>(v[u]);
      float* part = reinterpret_cast<float*>(smem + L::BYTES + W * max_nch * L::XR_CHUNK) + W * max_nch * SUB * TOK;  // extra()'s last W floats
      const float r = rms_scale<W>(ss, part, p.k, p.eps);
      mark(14);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (32 * u + lane < pieces) v[u] = rmsnorm8<T>(v[u], v2[u], r);
    }
    for (int base = 0; base < pieces; base += 32 * U) {
      if (base != 0) load(base);
      store(base);
    }
    __syncwarp();
  } else if (!p.pdl) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(true);
  } else {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) issue(false);
    grid_dependency_wait();
    uint4 xv[STAGES - 1][XP];
    int c = 0, j = tj0;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (j < ntiles && (!XR || j == 0)) {
#pragma unroll
        for (int q = 0; q < XP; ++q)
          xv[s][q] = XR || x_here(q) ? *reinterpret_cast<const uint4*>(x_src(c * W, q)) : make_uint4(0, 0, 0, 0);
      }
      if (++c == nch) c = 0, ++j;
    }
    c = 0, j = tj0;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (j < ntiles && (!XR || j == 0)) {
#pragma unroll
        for (int q = 0; q < XP; ++q) *reinterpret_cast<uint4*>(x_dst(ring + s * L::SLOT_B, c, q)) = xv[s][q];
      }
      if (++c == nch) c = 0, ++j;
    }
  }
  mark(1);
  if (QLP_LATE_TRIGGER == 0) launch_dependents();

  int cs = 0;  // the slot computed next
  for (int j = 0; j < ntiles; ++j) {
    int tile = blockIdx.x + j * gridDim.x;
    const Segment sg = pick(p, tile);
    const int row0 = tile * 16 * R;
    // one token: the residuals of the outputs this thread stores at the tile's end, loaded now, so
    // their latency hides behind the tile's chunks (more tokens load them as they store: kept here,
    // they cost the 8-token kernels registers enough for one CTA an SM fewer)
    constexpr int OUTS = R * 16 * MT * 8, RES_N = (OUTS + W * 32 - 1) / (W * 32);
    float res[RES_N];
    if constexpr (TOK == 1) load_residuals<T, R * 16, W * 32>(res, sg.res, row0, sg.n);
    float acc[R][MT][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int jj = 0; jj < MT; ++jj)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][jj][e] = 0.f;

    for (int i = 0; i < nch; ++i) {
      issue(true);
      if (QLP_LATE_TRIGGER == 1 && tj >= ntiles) launch_dependents();  // this warp's last copies are out
      cp_wait<STAGES - 1>();
      __syncwarp();
      if (j == 0 && i == 0) mark(2);
      const uint8_t* slot = ring + cs * L::SLOT_B;
      cs = cs + 1 == STAGES ? 0 : cs + 1;
      const float* sc = reinterpret_cast<const float*>(slot + L::W_B);
      const uint8_t* zc = slot + L::W_B + L::S_B;
      const int c = warp + i * W;
      // the lane's word of each atom of the chunk, [R blocks][SUB sub-chunks][AS atoms]: an atom is
      // an 8 x 8 tile of 16-byte rows whose lane i word is at byte 4 i, so ldmatrix hands each lane
      // its words of four atoms (two where a sub-chunk has two).  All before the first MMA
      // (QLP_HOIST_TOK), or each block's just before its MMAs
      constexpr bool HOIST = TOK >= QLP_HOIST_TOK;
      uint32_t wd[R][SUB][AS];
      auto load_words = [&](const int r, const int s) {
        const uint8_t* blk = slot + r * L::BLOCK_B + s * AS * 128 + (lane >> 3) * 128 + (lane & 7) * 16;
#pragma unroll
        for (int a = 0; a < AS; a += 4) {
          if constexpr (AS >= 4) ldsm_x4(wd[r][s][a], wd[r][s][a + 1], wd[r][s][a + 2], wd[r][s][a + 3], blk + a * 128);
          else ldsm_x2(wd[r][s][a], wd[r][s][a + 1], blk);
        }
      };
      if constexpr (HOIST) {
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int s = 0; s < SUB; ++s) load_words(r, s);
      }
#pragma unroll
      for (int s = 0; s < SUB; ++s) {
        // the activation of this sub-chunk as B fragments, per atom: (x[2t], x[2t+1]), (x[2t+8], x[2t+9])
        // of token g of the 8-token tile
        const uint8_t* xs = XR ? x_row + i * L::XR_CHUNK : slot + L::W_B + L::S_B + L::Z_B;
        uint32_t xb[MT][AS][2];
#pragma unroll
        for (int jj = 0; jj < MT; ++jj)
#pragma unroll
          for (int a = 0; a < AS; a += 2) {
            // four 8 x 8 tiles (atoms a, a + 1; k halves 0, 1): lane i gives row i % 8 of tile i / 8.
            // With one token every row is that token: the MMAs' other 7 columns repeat column 0 and
            // are never written out
            const int tile8 = lane >> 3, row = TOK == 1 ? 0 : 8 * jj + (lane & 7);
            const uint8_t* at = XR && TOK > 1 ? xs + xr_at(row, 2 * (s * AS + a + (tile8 >> 1)) + (tile8 & 1))
                                              : xs + row * L::X_ROW + ((s * AS + a + (tile8 >> 1)) * 16 + 8 * (tile8 & 1)) * 2;
            ldsm_x4(xb[jj][a][0], xb[jj][a][1], xb[jj][a + 1][0], xb[jj][a + 1][1], at);
          }
        // the sum of the sub-chunk's activation per token: the weights enter the MMAs as BIAS + q, and
        // BIAS + z times this sum comes off afterwards.  One token's from the prologue; more tokens'
        // by an MMA with an all-ones A, which with XR happens in the CTA's first tile only: its sums
        // stay in shared memory for the later tiles
        float xsum[MT][4];
        if constexpr (XR && TOK == 1) {
          const float v = x_sums[i * SUB + s];
#pragma unroll
          for (int e = 0; e < 4; ++e) xsum[0][e] = v;
        } else if (XR && j > 0) {
#pragma unroll
          for (int jj = 0; jj < MT; ++jj) {  // tokens 2 t and 2 t + 1 of the tile
            const float2 v = *reinterpret_cast<const float2*>(x_sums + (i * SUB + s) * TOK + 8 * jj + 2 * t);
            xsum[jj][0] = xsum[jj][2] = v.x;
            xsum[jj][1] = xsum[jj][3] = v.y;
          }
        } else {
#pragma unroll
          for (int jj = 0; jj < MT; ++jj) {
            float xsum2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int e = 0; e < 4; ++e) xsum[jj][e] = 0.f;
#pragma unroll
            for (int a = 0; a < AS; ++a)
              mma16<T>(a % 2 ? xsum2 : xsum[jj], Num<T>::ONES, Num<T>::ONES, Num<T>::ONES, Num<T>::ONES, xb[jj][a][0], xb[jj][a][1]);
#pragma unroll
            for (int e = 0; e < 4; ++e) xsum[jj][e] += xsum2[e];
            if (XR && g == 0)  // every row holds the sums: (row 0, tokens 2 t, 2 t + 1) on lane t
              *reinterpret_cast<float2*>(x_sums + (i * SUB + s) * TOK + 8 * jj + 2 * t) = make_float2(xsum[jj][0], xsum[jj][1]);
          }
        }
        const int zi = ((c * SUB) & 3) + s;  // this group's byte in the copied word of zero points
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int rl = 16 * r + g;
          const float s_lo = sc[rl * SUB + s], s_hi = sc[(rl + 8) * SUB + s];
          const float zb_lo = Num<T>::BIAS + (ZP ? zc[rl * 4 + zi] : 8.f);
          const float zb_hi = Num<T>::BIAS + (ZP ? zc[(rl + 8) * 4 + zi] : 8.f);
          if constexpr (!HOIST) load_words(r, s);
          const uint32_t (&words)[AS] = wd[r][s];
          float part[MT][4], part2[MT][4];  // two accumulators: two independent chains of MMAs
#pragma unroll
          for (int jj = 0; jj < MT; ++jj)
#pragma unroll
            for (int e = 0; e < 4; ++e) part[jj][e] = part2[jj][e] = 0.f;
#pragma unroll
          for (int a = 0; a < AS; ++a) {
            const uint32_t word = words[a];
            uint32_t f[4];  // the A fragment registers: BIAS + q at (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)
#pragma unroll
            for (int q = 0; q < 4; ++q) f[q] = nibbles<MAGIC>(word >> (4 * q));
#pragma unroll
            for (int jj = 0; jj < MT; ++jj)
              mma16<T>(a % 2 ? part2[jj] : part[jj], f[0], f[1], f[2], f[3], xb[jj][a][0], xb[jj][a][1]);
          }
          // with one token only column 0 (elements 0 and 2 on lanes t == 0) is ever written out: the
          // odd columns' elements are left alone
#pragma unroll
          for (int jj = 0; jj < MT; ++jj)
#pragma unroll
            for (int e = 0; e < 4; e += TOK == 1 ? 2 : 1) part[jj][e] += part2[jj][e];
#pragma unroll
          for (int jj = 0; jj < MT; ++jj) {
            acc[r][jj][0] += s_lo * fmaf(-zb_lo, xsum[jj][0], part[jj][0]);
            acc[r][jj][2] += s_hi * fmaf(-zb_hi, xsum[jj][2], part[jj][2]);
            if constexpr (TOK > 1) {
              acc[r][jj][1] += s_lo * fmaf(-zb_lo, xsum[jj][1], part[jj][1]);
              acc[r][jj][3] += s_hi * fmaf(-zb_hi, xsum[jj][3], part[jj][3]);
            }
          }
        }
      }
      __syncwarp();  // every lane is done with the slot before a later cp.async refills it
    }

    // the warps' partial sums of this tile (each warp had its own share of K) meet in shared memory,
    // while the rings already hold the next tile's first chunks
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int jj = 0; jj < MT; ++jj) {
        red[warp][16 * r + g][8 * jj + 2 * t] = acc[r][jj][0];
        red[warp][16 * r + g][8 * jj + 2 * t + 1] = acc[r][jj][1];
        red[warp][16 * r + g + 8][8 * jj + 2 * t] = acc[r][jj][2];
        red[warp][16 * r + g + 8][8 * jj + 2 * t + 1] = acc[r][jj][3];
      }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < RES_N; ++q) {
      const int idx = threadIdx.x + q * W * 32;
      if (idx >= OUTS) break;
      const int rr = idx % (R * 16), tt = idx / (R * 16);  // consecutive threads: consecutive channels
      const int row = row0 + rr;
      if (row >= sg.n || tt >= tokens) continue;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < W; ++w) v += red[w][rr][tt];
      if (sg.bias) v += Io<T>::load(sg.bias, row);
      if (sg.res)
        v = round_to<T>(v) + (TOK == 1 ? res[q] : Io<T>::load(sg.res, (long long)(tok0 + tt) * sg.res_stride + row));
      Io<T>::store(sg.out, (long long)(tok0 + tt) * sg.out_stride + row, v);
    }
    __syncthreads();  // the reduction space is free again
    if (j < 8) mark(3 + j);
  }
  cp_wait<0>();
  mark(11);
#if QLP_TRACE
  if (threadIdx.x == 0 && trace_cap) {
    unsigned int sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    const unsigned int i = atomicAdd(&trace_next[sm % TRACE_SMS], 1u);
    if (i < trace_cap) {
      unsigned long long* trace = trace_buf + ((unsigned long long)(sm % TRACE_SMS) * trace_cap + i) * TRACE_WORDS;
      for (int w = 0; w < 2 * TRACE_MARKS; ++w) trace[w] = tm[w];
      trace[2 * TRACE_MARKS] = sm | (unsigned long long)blockIdx.x << 16 | (unsigned long long)gridDim.x << 32;
      trace[2 * TRACE_MARKS + 1] = (unsigned long long)p.seg[0].n | (unsigned long long)p.k << 20 | (unsigned long long)p.nseg << 40 |
                                   (unsigned long long)p.prologue << 44 | (unsigned long long)ntiles << 48;
    }
  }
#endif
}

// XR kernels hold the activation rows in shared memory; where K makes that more than the device
// has, the kernel with the rows in the ring runs them (8 tokens a CTA for one token, as many for 8 or 16)
template <typename T, int VEC, int TOK, int R, int W, bool XR>
cudaError_t launch(const Params& p, bool pdl, cudaStream_t stream) {
  using L = Layout<VEC, R, TOK, W, XR>;
  const int bytes = L::BYTES + L::extra(p.k) + TRACE_SMEM;
  if constexpr (XR) {
    if (bytes > device_smem_optin()) {
      if (p.prologue != PRO_NONE) return cudaErrorInvalidValue;  // the ring's kernel has no prologue (K <= 16384 fits)
      return launch<T, VEC, TOK == 1 ? 8 : TOK, R, 8, false>(p, pdl, stream);
    }
  }
  if (p.seg[0].z) return launch_persistent<w4a16_kernel<T, VEC, TOK, R, W, true, XR>, TOK, W * 32>(p, bytes, pdl, stream);
  return launch_persistent<w4a16_kernel<T, VEC, TOK, R, W, false, XR>, TOK, W * 32>(p, bytes, pdl, stream);
}

// 4 warps a CTA for one token only (the caller's rule, cuda_w4a16.warps_for); 8 for any M.  More
// tokens' rows stay in shared memory (XR) where the launch has a row tile an SM or more: its CTAs
// then walk several tiles and read their rows once.  H200, us at M = 8 / 16, XR in every launch
// against the ring (benchmarks/results/h200/decode/cuda_w4a16/xrow/every_launch): (4096, 14336),
// 448 tiles of 32 rows, 15.7 / 19.7 against 17.9 / 22.3; gate/up, 896, 25.1 / 32.1 against 28.6 /
// 45.2; N = 6144, 192, 9.1 / 11.6 against 9.2 / 12.5; N = 1024, 64 of 16 rows, 4.7 / 6.0 against
// 4.3 / 5.8
template <typename T, int VEC, int TOK, int R>
cudaError_t dispatch_w(const Params& p, int warps, bool pdl, cudaStream_t stream) {
  if constexpr (TOK == 1) {
    if (warps == 4) return launch<T, VEC, TOK, R, 4, true>(p, pdl, stream);
  } else {
    if (!QLP_XR_TOKENS || p.total_tiles < device_sms()) return launch<T, VEC, TOK, R, 8, false>(p, pdl, stream);
  }
  return launch<T, VEC, TOK, R, 8, true>(p, pdl, stream);
}

// 48-row tiles (3) for CTAs of 8 tokens, their activation in the ring, and for one token in CTAs of
// 8 warps (the caller's rule takes them where a launch's tiles fit one round, so no CTA walks
// several): 6144 channels (q/k/v) make 128 tiles of 48 rows, one CTA an SM, where 192 of 32 share
// 132 SMs and the 60 SMs holding two CTAs finish 1.1 us after the others.  H200, us with 32 / 48-row
// tiles (benchmarks/results/h200/decode/cuda_w4a16/rows48): q/k/v M = 8 8.7 / 7.7, M = 16 10.1 /
// 10.1 (16 tokens' activation, 128 KB a CTA, weighs as much as its 48 rows of weights: no gain, so
// 16 tokens have no 48-row kernel); other shapes 32 rows as fast or faster.  M = 1, q/k/v with its
// RMSNorm (.../cuda_w4a16/balance): 7.7 / 7.1
template <typename T, int VEC, int TOK>
cudaError_t dispatch_r(const Params& p, int row_tiles, int warps, bool pdl, cudaStream_t stream) {
  if constexpr (TOK == 8) {
    if (row_tiles == 3) return launch<T, VEC, TOK, 3, 8, false>(p, pdl, stream);
  }
  if constexpr (TOK == 1) {
    if (row_tiles == 3) return launch<T, VEC, TOK, 3, 8, true>(p, pdl, stream);
  }
  return row_tiles == 1 ? dispatch_w<T, VEC, TOK, 1>(p, warps, pdl, stream) : dispatch_w<T, VEC, TOK, 2>(p, warps, pdl, stream);
}

template <typename T, int VEC>
cudaError_t dispatch_m(const Params& p, int row_tiles, int warps, bool pdl, cudaStream_t stream) {
  if (p.m == 1) return dispatch_r<T, VEC, 1>(p, row_tiles, warps, pdl, stream);
  return p.m <= 8 || QLP_MAX_TOK == 8 ? dispatch_r<T, VEC, 8>(p, row_tiles, warps, pdl, stream)
                                      : dispatch_r<T, VEC, 16>(p, row_tiles, warps, pdl, stream);
}

template <typename T>
cudaError_t dispatch(const Params& p, int row_tiles, int warps, bool pdl, cudaStream_t stream) {
  if (p.group == 32) return dispatch_m<T, 4>(p, row_tiles, warps, pdl, stream);
  if (p.group == 64) return dispatch_m<T, 8>(p, row_tiles, warps, pdl, stream);
  return dispatch_m<T, 16>(p, row_tiles, warps, pdl, stream);
}

}  // namespace
}  // namespace qlp

extern "C" {

#if QLP_TRACE
// Trace builds: the CTAs of later launches write their records (qlp::TRACE_WORDS words each) into
// buf, [qlp::TRACE_SMS][cap] records, each SM's from the first of its row on (cap 0: none).
// Returns the words a record takes (the caller checks it), or -1
int qlp_w4a16_trace(void* buf, int cap) {
  static const unsigned int zeros[qlp::TRACE_SMS] = {};
  const unsigned int c = cap;
  unsigned long long* b = static_cast<unsigned long long*>(buf);
  if (cudaMemcpyToSymbol(qlp::trace_buf, &b, sizeof b) != cudaSuccess || cudaMemcpyToSymbol(qlp::trace_cap, &c, sizeof c) != cudaSuccess ||
      cudaMemcpyToSymbol(qlp::trace_next, zeros, sizeof zeros) != cudaSuccess)
    return -1;
  return qlp::TRACE_WORDS * 1000 + qlp::TRACE_SMS;
}
#endif

// The version of Params / Segment this library was built with (the caller checks it matches its own).
int qlp_w4a16_abi(void) { return (int)(sizeof(qlp::Params) * 1000 + qlp::MAX_SEGMENTS * 10 + qlp::ABI_VERSION); }

// Launch on `stream`.  dtype: 0 bf16, 1 fp16.  row_tiles: 1, 2 or 3 (16, 32 or 48 channels a tile;
// 48 for 1 to 8 tokens, in CTAs of 8 warps for one); the caller sets every segment's `tiles` for rows of 16 * row_tiles and p->total_tiles to their sum.
// warps: a CTA's, 8, or 4 for one token (M = 1).  pdl: 1 to launch with programmatic dependent launch
// (sm90+; the caller vouches that the kernel before it in the stream wrote none of the layers'
// weights, scales or zero points), 0 not.  Returns 0, or writes why not into err.
int qlp_w4a16_decode(const qlp::Params* p, int dtype, int row_tiles, int warps, int pdl, void* stream, char* err,
                     int err_len) {
  auto fail = [&](const char* what) {
    snprintf(err, err_len, "%s", what);
    return 1;
  };
  if (const char* why = qlp::check_segments<qlp::MAX_SEGMENTS, 3>(*p, row_tiles)) return fail(why);
  if (row_tiles == 3 && (p->m > 8 || (p->m == 1 && warps != 8)))
    return fail("row_tiles 3 (48 channels a tile) needs 1 to 8 tokens, and 8 warps for one token");
  // a chunk of 128 k reads 128 / G scales of a row (one for G = 128): a larger group would need a scale shared by chunks
  if (p->group != 32 && p->group != 64 && p->group != 128) return fail("group size must be 32, 64 or 128");
  if (p->k % 128 != 0) return fail("K must be a multiple of 128");
  for (int i = 0; i < p->nseg; ++i) {
    if (p->seg[i].n % 16 != 0) return fail("every layer's N must be a multiple of 16 (whole atoms of the weight layout)");
    if (!p->seg[i].z != !p->seg[0].z) return fail("the layers of a launch must all have zero points or all have none");
  }
  if (warps != 8 && !(warps == 4 && p->m == 1)) return fail("warps must be 8, or 4 for one token (M = 1)");
  if (p->prologue < qlp::PRO_NONE || p->prologue > qlp::PRO_SILU_MUL) return fail("prologue must be 0 (none), 1 (rmsnorm) or 2 (silu_mul)");
  if (p->prologue != qlp::PRO_NONE) {
    if (p->m != 1) return fail("a prologue (rmsnorm, silu_mul) runs with one token (M = 1) only");
    if (p->k > 16384) return fail("a prologue (rmsnorm, silu_mul) takes K <= 16384");
    if (p->prologue == qlp::PRO_RMSNORM && (p->k / 128 + warps - 1) / warps * 16 > qlp::PRO_PIECES)
      return fail("an rmsnorm prologue with 4 warps takes K <= 8192 (8 warps: 16384)");
    if (p->prologue == qlp::PRO_RMSNORM ? !p->norm_w : !p->x2) return fail("the prologue's second operand is missing");
  }
  if (p->m <= 0 || p->total_tiles == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  qlp::Params q = *p;
  q.pdl = pdl != 0 && qlp::pdl_launches();  // where launch_persistent sets the launch attribute
  cudaError_t e = dtype == 0 ? qlp::dispatch<__nv_bfloat16>(q, row_tiles, warps, q.pdl, s)
                              : qlp::dispatch<__half>(q, row_tiles, warps, q.pdl, s);
  if (e != cudaSuccess) {
    snprintf(err, err_len, "kernel launch failed: %s", cudaGetErrorString(e));
    return 1;
  }
  return 0;
}

}  // extern "C"
