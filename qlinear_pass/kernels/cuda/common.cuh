// What the decode kernels in this folder share: the 16-bit MMA, the prologues' arithmetic on packed
// 16-bit values, a byte permute, cp.async, reading and writing 16-bit / fp32 values, programmatic
// dependent launch, the segments of a launch (sibling layers that read one activation), their
// checks, and the persistent grid (how many CTAs of a kernel run at once on this GPU, found once per
// device).
//
// Include it inside an anonymous namespace, after <cuda_bf16.h>, <cuda_fp16.h>, <cuda_runtime.h>,
// <stdint.h>, <algorithm>, <atomic> and <type_traits>: the per-device caches (per_device()) then
// have internal linkage, one per shared library.  With external linkage it would be a process-wide
// (GNU unique) symbol shared by every build of a file that is loaded at once.
#pragma once

// A value of type T in global memory, read and written as fp32 (bias in, output out)
template <typename T> struct Io;
template <> struct Io<__nv_bfloat16> {
  __device__ static float load(const void* p, long long i) { return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]); }
  __device__ static void store(void* p, long long i, float v) { static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); }
};
template <> struct Io<__half> {
  __device__ static float load(const void* p, long long i) { return __half2float(static_cast<const __half*>(p)[i]); }
  __device__ static void store(void* p, long long i, float v) { static_cast<__half*>(p)[i] = __float2half_rn(v); }
};
template <> struct Io<float> {
  __device__ static float load(const void* p, long long i) { return static_cast<const float*>(p)[i]; }
  __device__ static void store(void* p, long long i, float v) { static_cast<float*>(p)[i] = v; }
};

// mma.sync m16n8k16 with 16-bit operands (bf16 or fp16, as T), fp32 accumulators: c += A B
template <typename T>
__device__ __forceinline__ void mma16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                      uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same<T, __half>::value, "bf16 or fp16 operands");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// What a prologue makes the activation of as the kernel loads it (one token, M = 1): the activation
// itself; the weight times the RMSNorm of it; SiLU of it times a second operand (SwiGLU)
enum Prologue { PRO_NONE = 0, PRO_RMSNORM = 1, PRO_SILU_MUL = 2 };

template <typename T>
__device__ __forceinline__ float2 to_f2(const uint32_t w) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
  else return __half22float2(*reinterpret_cast<const __half2*>(&w));
}
template <typename T>
__device__ __forceinline__ uint32_t from_f2(const float a, const float b) {
  uint32_t w;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) *reinterpret_cast<__nv_bfloat162*>(&w) = __floats2bfloat162_rn(a, b);
  else *reinterpret_cast<__half2*>(&w) = __floats2half2_rn(a, b);
  return w;
}
// a float rounded to T and back (fp32: as it is)
template <typename T>
__device__ __forceinline__ float round_to(const float v) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) return __bfloat162float(__float2bfloat16_rn(v));
  else if constexpr (std::is_same<T, __half>::value) return __half2float(__float2half_rn(v));
  else return v;
}

// The sum (SQUARES: of the squares) of eight 16-bit values (T) packed in 16 bytes, in fp32
template <typename T, bool SQUARES = false>
__device__ __forceinline__ float sum8(const uint4 v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = to_f2<T>(w[i]);
    s = SQUARES ? fmaf(f.x, f.x, fmaf(f.y, f.y, s)) : s + (f.x + f.y);
  }
  return s;
}

// Two packed 16-bit products, rounded once: the product of two 16-bit floats is exact in fp32, so
// this is T(float(a) * float(b)), as the graph computes it
template <typename T>
__device__ __forceinline__ uint32_t mul2(const uint32_t a, const uint32_t b) {
  uint32_t d;
  if constexpr (std::is_same<T, __nv_bfloat16>::value)
    *reinterpret_cast<__nv_bfloat162*>(&d) = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  else *reinterpret_cast<__half2*>(&d) = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  return d;
}

// The prologues on eight packed values, rounded as a compiled graph rounds them: RMSNorm
// T(nw * T(x * r)); SwiGLU T(T(silu(g)) * u), silu(g) = g / (1 + exp(-g)) in fp32
template <typename T>
__device__ __forceinline__ uint4 rmsnorm8(const uint4 x, const uint4 nw, const float r) {
  const uint32_t a[4] = {x.x, x.y, x.z, x.w}, b[4] = {nw.x, nw.y, nw.z, nw.w};
  uint32_t o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = to_f2<T>(a[i]);
    o[i] = mul2<T>(b[i], from_f2<T>(f.x * r, f.y * r));
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}
template <typename T>
__device__ __forceinline__ uint4 silu_mul8(const uint4 g, const uint4 u) {
  const uint32_t a[4] = {g.x, g.y, g.z, g.w}, b[4] = {u.x, u.y, u.z, u.w};
  uint32_t o[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = to_f2<T>(a[i]);
    o[i] = mul2<T>(from_f2<T>(__fdividef(f.x, 1.f + __expf(-f.x)), __fdividef(f.y, 1.f + __expf(-f.y))), b[i]);
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// An RMSNorm's 1 / rms of a row of K values from each warp's sum of squares `ss` of its share (in
// every lane's own part): the lanes' sums, then the W warps' through `part` (W floats of shared
// memory) and one barrier, which every warp of the CTA must meet
template <int W>
__device__ __forceinline__ float rms_scale(float ss, float* part, const int k, const float eps) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < W; ++w) total += part[w];
  return rsqrtf(total / static_cast<float>(k) + eps);
}

// One token: the residuals (T, [n]) of the outputs a thread of THREADS stores at the end of a row tile
// of ROWS channels from row0 (its q-th: channel (threadIdx.x + q THREADS) % ROWS, token 0; none past
// the first ROWS), loaded at the tile's start so that their latency hides behind the tile's chunks
template <typename T, int ROWS, int THREADS, int N>
__device__ __forceinline__ void load_residuals(float (&res)[N], const void* r, const int row0, const int n) {
#pragma unroll
  for (int q = 0; q < N; ++q) {
    const int idx = threadIdx.x + q * THREADS, rr = idx % ROWS;
    res[q] = r && idx < ROWS && row0 + rr < n ? Io<T>::load(r, row0 + rr) : 0.f;
  }
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(d), "l"(src), "n"(BYTES) : "memory");
  }
}

// cp.async of 16 bytes, or (full false) 16 zero bytes without reading from src (src must still be a
// valid address)
__device__ __forceinline__ void cp_async16_or_zero(void* dst, const void* src, bool full) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(full ? 16 : 0) : "memory");
}

// cp.async of 16 bytes that asks L2 to fetch the HINT-byte block around them from DRAM (128 or
// 256; 0: no hint, the 32-byte sectors the copies touch)
template <int HINT>
__device__ __forceinline__ void cp_async16_l2(void* dst, const void* src) {
  static_assert(HINT == 0 || HINT == 128 || HINT == 256, "an L2 fetch of 0, 128 or 256 bytes");
  if constexpr (HINT == 0) {
    cp_async<16>(dst, src);
  } else {
    const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
    if constexpr (HINT == 256)
      asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
    else
      asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
  }
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Programmatic dependent launch (sm90+).  A kernel launched with it (launch_persistent's `pdl`) may
// start while the kernel before it in the stream is still finishing: it may read only what was
// written before that kernel began (the layers' weights) until grid_dependency_wait() returns, which
// it does once the kernel before has completed and its writes are visible (at once in a launch
// without it).  launch_dependents(): a kernel launched after this one with it may start now.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The layer (segment) that row tile `tile` of a launch belongs to, with `tile` made relative to it:
// a select per field, not a dynamically indexed copy of the parameter array in local memory
template <typename Params>
__device__ __forceinline__ auto pick(const Params& p, int& tile) {
  auto s = p.seg[0];
  if (p.nseg > 1 && tile >= p.seg[0].tiles) {
    tile -= p.seg[0].tiles;
    s = p.seg[1];
    if (p.nseg > 2 && tile >= p.seg[1].tiles) {
      tile -= p.seg[1].tiles;
      s = p.seg[2];
    }
  }
  return s;
}

constexpr int MAX_DEVICES = 64;

// A value of the current device, kept in `known` (0: not found yet): found by find(device, value)
// on the first call on a device, read by every later one
template <typename Find>
cudaError_t per_device(std::atomic<int> (&known)[MAX_DEVICES], int& value, Find find) {
  int dev = 0;
  cudaGetDevice(&dev);
  value = dev < MAX_DEVICES ? known[dev].load(std::memory_order_relaxed) : 0;
  if (value > 0) return cudaSuccess;
  const cudaError_t e = find(dev, value);
  if (e == cudaSuccess && dev < MAX_DEVICES) known[dev].store(value, std::memory_order_relaxed);
  return e;
}

// The most dynamic shared memory a CTA may opt in to on the current device
inline int device_smem_optin() {
  static std::atomic<int> known[MAX_DEVICES];
  int bytes = 0;
  per_device(known, bytes, [](int dev, int& out) {
    return cudaDeviceGetAttribute(&out, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  });
  return bytes;
}

// The streaming multiprocessors of the current device
inline int device_sms() {
  static std::atomic<int> known[MAX_DEVICES];
  int sms = 0;
  per_device(known, sms, [](int dev, int& out) { return cudaDeviceGetAttribute(&out, cudaDevAttrMultiProcessorCount, dev); });
  return sms;
}

// CTAs of KERNEL (THREADS threads, BYTES of dynamic shared memory) that run at once on the current
// device.  The kernel's shared-memory limit is raised to the device's most on its first launch
// there; a kernel whose shared memory grows with its arguments (K) has a few sizes in a model, and
// the CTAs of each of the last 8 are kept, as (BYTES << 16) | CTAs
// QLP_CARVEOUT (benchmarks only): >= 0, the kernels' preferred shared-memory carveout in percent
// (100: the most shared memory), so consecutive launches ask the SMs for one split of L1 and shared
// memory; -1: the driver's choice per kernel.  100 took a w4a16 decode layer's four fused calls
// 45.8 us against 45.4 (H200, benchmarks/results/h200/decode/cuda_w4a16/trace/variants/carveout.json)
#ifndef QLP_CARVEOUT
#define QLP_CARVEOUT -1
#endif
template <auto KERNEL>
cudaError_t resident_ctas(int threads, int bytes, int& resident) {
  static std::atomic<int> raised[MAX_DEVICES];
  static std::atomic<long long> known[MAX_DEVICES][8];
  int ok = 0;
  cudaError_t e = per_device(raised, ok, [](int, int& out) {
    cudaError_t e = cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, device_smem_optin());
    if (e == cudaSuccess && QLP_CARVEOUT >= 0)
      e = cudaFuncSetAttribute(KERNEL, cudaFuncAttributePreferredSharedMemoryCarveout, QLP_CARVEOUT);
    out = 1;
    return e;
  });
  if (e != cudaSuccess) return e;
  int dev = 0;
  cudaGetDevice(&dev);
  const long long key = static_cast<long long>(bytes) << 16;
  if (dev < MAX_DEVICES) {
    for (auto& slot : known[dev]) {
      const long long v = slot.load(std::memory_order_relaxed);
      if ((v & ~0xFFFFLL) == key && (v & 0xFFFF) != 0) {
        resident = static_cast<int>(v & 0xFFFF);
        return cudaSuccess;
      }
    }
  }
  const int sms = device_sms();
  int per_sm = 0;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, KERNEL, threads, bytes);
  if (e != cudaSuccess) return e;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  resident = std::min(per_sm * sms, 0xFFFF);
  if (dev < MAX_DEVICES) known[dev][(bytes / 16) % 8].store(key | resident, std::memory_order_relaxed);
  return cudaSuccess;
}

// The compute capability of the current device as 10 * major + minor
inline int device_sm() {
  static std::atomic<int> known[MAX_DEVICES];
  int sm = 0;
  per_device(known, sm, [](int dev, int& out) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    out = major * 10 + minor;
    return cudaSuccess;
  });
  return sm;
}

// Why a launch's segments cannot run (null when they can): 1 to MAX_SEGMENTS layers, row tiles of
// 16 or 32 rows (or up to 16 * MAX_ROW_TILES), and total_tiles the sum of the segments' tiles
template <int MAX_SEGMENTS, int MAX_ROW_TILES = 2, typename Params>
const char* check_segments(const Params& p, int row_tiles) {
  if (p.nseg < 1 || p.nseg > MAX_SEGMENTS) return "between 1 and MAX_SEGMENTS layers a launch";
  if (row_tiles < 1 || row_tiles > MAX_ROW_TILES)
    return MAX_ROW_TILES == 2 ? "row_tiles must be 1 or 2" : "row_tiles must be 1, 2 or 3";
  int total = 0;
  for (int i = 0; i < p.nseg; ++i) total += p.seg[i].tiles;
  if (total != p.total_tiles) return "total_tiles is not the sum of the segments' tiles";
  return nullptr;
}

// The persistent grid: y = slices of TOK tokens, x = as many CTAs a slice as run at once (all
// slices together), each with an equal share of the slice's row tiles.  QLP_GRID_PER_SM c > 0
// (benchmarks only): one slice of more tiles than c CTAs an SM (or than resident CTAs) takes c CTAs
// an SM instead; gate/up at M = 1 (896 tiles: 448 CTAs, 52 SMs holding 4 and 80 holding 3, whose
// CTAs exit 2 us earlier) took 20.0-20.1 / 20.2 us with c = 4 / 3 against 19.9-20.0 (H200,
// benchmarks/results/h200/decode/cuda_w4a16/trace/variants/grid.json), and with c = 1 (one CTA of
// 8 warps an SM walking 6 or 7 tiles) 20.9-21.0 against 20.0-20.3 (.../cuda_w4a16/balance)
#ifndef QLP_GRID_PER_SM
#define QLP_GRID_PER_SM 0
#endif
inline dim3 persistent_grid(int total_tiles, int m, int tok, int resident) {
  const int slices = (m + tok - 1) / tok;
  const int per_slice = std::max(1, resident / slices);
  if (QLP_GRID_PER_SM > 0 && slices == 1 && total_tiles > std::min(per_slice, QLP_GRID_PER_SM * device_sms())) {
    const int sms = device_sms();
    return dim3(sms * std::min(QLP_GRID_PER_SM, std::max(1, resident / sms)), 1);
  }
  const int rounds = (total_tiles + per_slice - 1) / per_slice;
  return dim3((total_tiles + rounds - 1) / rounds, slices);
}

// Whether a launch can be a programmatic dependent launch here: a GPU of sm90+ and a CUDA 11.8+ build
inline bool pdl_launches() { return CUDART_VERSION >= 11080 && device_sm() >= 90; }

// Launch KERNEL (TOK tokens a CTA, THREADS threads, `bytes` of dynamic shared memory) as a
// persistent grid on `stream`; `pdl`: with programmatic dependent launch where pdl_launches(), so
// the kernel's CTAs start, and copy weights, while the kernel before them finishes
// QLP_PDL_SOLO (benchmarks only): 1, a programmatic dependent launch asks for more than half an SM's
// shared memory, so that its CTAs, starting early, share no SM with another CTA (of this launch or of
// the one before): an early CTA then starts where a CTA of the launch before has exited
#ifndef QLP_PDL_SOLO
#define QLP_PDL_SOLO 0
#endif
template <auto KERNEL, int TOK, int THREADS, typename Params>
cudaError_t launch_persistent(const Params& p, int bytes, bool pdl, cudaStream_t stream) {
  if (bytes > device_smem_optin()) return cudaErrorInvalidConfiguration;
  if (QLP_PDL_SOLO && pdl && pdl_launches()) bytes = std::max(bytes, device_smem_optin() / 2 + 1024);
  int resident = 0;
  cudaError_t e = resident_ctas<KERNEL>(THREADS, bytes, resident);
  if (e != cudaSuccess) return e;
  const dim3 grid = persistent_grid(p.total_tiles, p.m, TOK, resident);
#if CUDART_VERSION >= 11080
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = bytes;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = pdl && pdl_launches() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, KERNEL, p);
#else
  (void)pdl;
  KERNEL<<<grid, THREADS, bytes, stream>>>(p);
  return cudaGetLastError();
#endif
}
