// The int8 family with bf16 output (see qlp_gemm.cuh).
#include "qlp_gemm.cuh"

QLP_DEFINE_FAMILY(qlp::dispatch_int8, cutlass::bfloat16_t, bf16)
