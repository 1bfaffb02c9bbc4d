// The int8_wo family with bf16 activations and output (see qlp_gemm.cuh).
#include "qlp_gemm.cuh"

QLP_DEFINE_FAMILY(qlp::Int8WeightOnlyConfigs, cutlass::bfloat16_t, bf16)
