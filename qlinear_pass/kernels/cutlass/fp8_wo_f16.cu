// The fp8_wo family with f16 activations and output (see qlp_gemm.cuh).
#include "qlp_gemm.cuh"

QLP_DEFINE_FAMILY(qlp::Fp8WeightOnlyConfigs, cutlass::half_t, f16)
