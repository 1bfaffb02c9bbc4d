// What the decode kernels in this folder share: cp.async, the segments of a launch (sibling layers
// that read one activation), and the persistent grid (how many CTAs of a kernel run at once on
// this GPU, found once per device).
//
// Include it inside an anonymous namespace, after <cuda_runtime.h>, <stdint.h>, <algorithm> and
// <atomic>: the per-device cache in resident_ctas() then has internal linkage, one per shared
// library.  With external linkage it would be a process-wide (GNU unique) symbol shared by every
// build of a file that is loaded at once.
#pragma once

template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(d), "l"(src), "n"(BYTES) : "memory");
  }
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
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

// CTAs of KERNEL (THREADS threads, BYTES of dynamic shared memory) that run at once on the current
// device: found on the first launch there (with the shared-memory limit raised), read by every
// later one
template <auto KERNEL>
cudaError_t resident_ctas(int threads, int bytes, int& resident) {
  constexpr int MAX_DEVICES = 64;
  static std::atomic<int> known[MAX_DEVICES];
  int dev = 0;
  cudaGetDevice(&dev);
  resident = dev < MAX_DEVICES ? known[dev].load(std::memory_order_relaxed) : 0;
  if (resident > 0) return cudaSuccess;
  cudaError_t e = cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  int sms = 0, per_sm = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, KERNEL, threads, bytes);
  if (e != cudaSuccess) return e;
  if (per_sm < 1) return cudaErrorInvalidConfiguration;
  resident = per_sm * sms;
  if (dev < MAX_DEVICES) known[dev].store(resident, std::memory_order_relaxed);
  return cudaSuccess;
}

// The persistent grid: y = slices of TOK tokens, x = as many CTAs a slice as run at once (all
// slices together), each with an equal share of the slice's row tiles
inline dim3 persistent_grid(int total_tiles, int m, int tok, int resident) {
  const int slices = (m + tok - 1) / tok;
  const int per_slice = std::max(1, resident / slices);
  const int rounds = (total_tiles + per_slice - 1) / per_slice;
  return dim3((total_tiles + rounds - 1) / rounds, slices);
}
