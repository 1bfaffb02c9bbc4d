// The fp8_block family with f16 output (see qlp_gemm.cuh).
#include "qlp_gemm.cuh"

QLP_DEFINE_FAMILY(qlp::dispatch_fp8_block, cutlass::half_t, f16)
