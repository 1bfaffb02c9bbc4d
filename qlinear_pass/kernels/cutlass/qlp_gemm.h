// The C interface between the CUTLASS translation units and the PyTorch binding.
// Every kernel family (fp8, int8, fp8_block, w4a16) is built as its own extension from
// bindings.cpp and <family>_bf16.cu / <family>_f16.cu, which define these symbols.
// A family holds several tile configurations (qlp_gemm.cuh lists them); the caller
// names the one to run by its index, and Python picks it by M, N and K
// (backends/cutlass.py, tile_config).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace qlp {

struct GemmArgs {
  const void* a;        // [M, K] row-major (fp8 e4m3 or int8)
  const void* b;        // [N, K] row-major, i.e. the K x N operand column-major
  void* d;              // [M, N] row-major output (bf16 or fp16)
  const float* scale_a; // fp8/int8: [M] (scale_a_rows) or [1]; fp8_block: [K/128, scale_a_ld] (MN-major)
  const float* scale_b; // fp8/int8: [N] (scale_b_cols) or [1]; fp8_block: [ceil(N/128), K/128]
  const void* bias;     // [N] in the output dtype, or null
  int m, n, k;
  bool scale_a_rows;
  bool scale_b_cols;
  int scale_a_ld;       // fp8_block: M rounded up to a multiple of 4 (TMA rows are 16-byte aligned)
  int device;
  int sm_count;
  // w4a16 (the weight is `a`, [N, K/2] bytes of unsigned 4-bit values, even k in the low nibble; the
  // activation is `b`, [M, K]; m / n are the GEMM's rows / columns: the weight's N, the activation's M):
  const void* group_scale;  // [K / group_size, N] in the activation dtype (MN-major)
  const void* group_zero;   // [K / group_size, N]: -zero_point * scale, in the activation dtype
  int group_size;
};

}  // namespace qlp

// Every family's extension defines these same names, and one process loads several families:
// hidden, each extension's calls bind to its own definitions even where a library is loaded
// with RTLD_GLOBAL.
#define QLP_API extern "C" __attribute__((visibility("hidden")))

// How many tile configurations the family has, and the name of each (index 0 .. count-1);
// both output dtypes list the same configurations.
QLP_API int qlp_config_count_bf16();
QLP_API int qlp_config_count_f16();
QLP_API const char* qlp_config_name_bf16(int config);
QLP_API const char* qlp_config_name_f16(int config);
// Bytes of scratch the GEMM needs for these arguments and configuration.
QLP_API size_t qlp_workspace_bf16(const qlp::GemmArgs* args, int config);
QLP_API size_t qlp_workspace_f16(const qlp::GemmArgs* args, int config);
// Runs the GEMM on `stream`; null on success, else a message saying what failed.
QLP_API const char* qlp_run_bf16(const qlp::GemmArgs* args, int config, void* workspace, cudaStream_t stream);
QLP_API const char* qlp_run_f16(const qlp::GemmArgs* args, int config, void* workspace, cudaStream_t stream);
