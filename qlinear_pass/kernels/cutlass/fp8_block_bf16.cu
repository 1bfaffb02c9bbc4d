// The fp8_block family with bf16 output (see qlp_gemm.cuh).
#include "qlp_gemm.cuh"

QLP_DEFINE_FAMILY(qlp::dispatch_fp8_block, cutlass::bfloat16_t, bf16)
