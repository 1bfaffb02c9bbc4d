import sys, torch
from qlinear_pass import schemes as S
from qlinear_pass.kernels import cuda_w8a8 as C8
scheme, m, k, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
p = S.quantize_weight(scheme, torch.randn(n, k, device="cuda") * 0.02)
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
if scheme == "fp8_rowwise":
    xq, sx = S.quantize_activation(scheme, x)
for _ in range(4):
    if scheme == "fp8_rowwise":
        C8.w8a8_decode(xq, sx, p["weight"], p["weight_scale"], None, torch.bfloat16)
    else:
        C8.w8a16_decode(x, p["weight"], p["weight_scale"], None)
torch.cuda.synchronize()
