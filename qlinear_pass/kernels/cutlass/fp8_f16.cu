// The fp8 family with f16 output (see qlp_gemm.cuh).
#include "qlp_gemm.cuh"

QLP_DEFINE_FAMILY(qlp::Fp8Configs, cutlass::half_t, f16)
