// The C interface between the CUTLASS translation units and the PyTorch binding.
// Every kernel family (fp8, int8, fp8_block) is built as its own extension from
// bindings.cpp and <family>_bf16.cu / <family>_f16.cu, which define these symbols.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace qlp {

struct GemmArgs {
  const void* a;        // [M, K] row-major (fp8 e4m3 or int8)
  const void* b;        // [N, K] row-major, i.e. the K x N operand column-major
  void* d;              // [M, N] row-major output (bf16 or fp16)
  const float* scale_a; // fp8/int8: [M] (scale_a_rows) or [1]; fp8_block: [M, K/128]
  const float* scale_b; // fp8/int8: [N] (scale_b_cols) or [1]; fp8_block: [ceil(N/128), K/128]
  const void* bias;     // [N] in the output dtype, or null
  int m, n, k;
  bool scale_a_rows;
  bool scale_b_cols;
  int device;
  int sm_count;
};

}  // namespace qlp

// Bytes of scratch the GEMM needs for these arguments.
extern "C" size_t qlp_workspace_bf16(const qlp::GemmArgs* args);
extern "C" size_t qlp_workspace_f16(const qlp::GemmArgs* args);
// Runs the GEMM on `stream`; null on success, else a message saying what failed.
extern "C" const char* qlp_run_bf16(const qlp::GemmArgs* args, void* workspace, cudaStream_t stream);
extern "C" const char* qlp_run_f16(const qlp::GemmArgs* args, void* workspace, cudaStream_t stream);
// The tile configuration that runs for this M (a name, for benchmarks and tests).
extern "C" const char* qlp_config_bf16(int m);
extern "C" const char* qlp_config_f16(int m);
