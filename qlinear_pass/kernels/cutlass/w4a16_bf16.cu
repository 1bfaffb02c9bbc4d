// The w4a16 family with bf16 activations and output (see qlp_gemm.cuh).
#include "qlp_gemm.cuh"

QLP_DEFINE_FAMILY(qlp::W4A16Configs, cutlass::bfloat16_t, bf16)
