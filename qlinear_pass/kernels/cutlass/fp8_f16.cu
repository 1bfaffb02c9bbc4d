// The fp8 family with f16 output (see qlp_gemm.cuh).
#include "qlp_gemm.cuh"

QLP_DEFINE_FAMILY(qlp::dispatch_fp8, cutlass::half_t, f16)
