// The fp8 family with bf16 output (see qlp_gemm.cuh).
#include "qlp_gemm.cuh"

QLP_DEFINE_FAMILY(qlp::Fp8Configs, cutlass::bfloat16_t, bf16)
