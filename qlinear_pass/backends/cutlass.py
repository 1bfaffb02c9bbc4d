"""Backend ``cutlass``: our CUTLASS 3.x GEMMs for Hopper (sources in ``kernels/cutlass/``).

* ``cutlass_fp8``: ``fp8_tensor`` and ``fp8_rowwise``; TMA warp-specialized
  FP8 GEMM whose epilogue applies the scales (one value, or one per token /
  per channel) and the bias.
* ``cutlass_int8``: ``int8_rowwise``; the same with int8 operands and int32
  accumulation.
* ``cutlass_fp8_block``: ``fp8_block``; the scales of the 1x128 activation
  groups and the 128x128 weight blocks are applied in the mainloop, once per
  128-wide K block.

Tile shapes follow M (64-row tiles for decode, 128x128 for prefill; the
table is ``dispatch_*`` in ``kernels/cutlass/qlp_gemm.cuh``).  Nothing is
shipped compiled: a family is built with nvcc the first time it is chosen on a
machine (minutes; cached; see ``kernels/cutlass_build.py``), during
``torch.compile`` when the pass picks it.

The dynamic activation quantization stays in the graph, where Inductor fuses
it into the ops before it, and the custom op receives the quantized
activation and its scale (as ``torch._scaled_mm`` does).  Under ``auto`` with
a per-M plan the kernel runs behind the op and quantizes the activation
itself.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import schemes as S
from ..kernels import cutlass_build as B
from ..kernels.ops import quantize_activation
from ..registry import OK, DeviceInfo, Kernel, LayerSpec, register_kernel

OUT_DTYPES = (torch.bfloat16, torch.float16)
#: auto's rank of each kernel per M bucket on Hopper (lower runs first; our Triton kernels are
#: 20, FlashInfer's block-scaled GEMM 15), from benchmarks/results/h100/cutlass/ (H100, torch 2.11):
#: * cutlass_fp8: fastest from M = 16 up (fp8_rowwise 1.00-1.18x torch._scaled_mm at M >= 1024,
#:   and ahead of our Triton GEMM); at M = 1 our Triton GEMV, which quantizes the row itself,
#:   is as fast or faster.
#: * cutlass_int8: fastest at almost every M (1.9-3.8x _int_mm + epilogue at M >= 1024, 1.2-1.4x
#:   our Triton kernels there; at M <= 16 they trade places: 0.83-1.15x, Triton ahead at K = 14336).
#: * cutlass_fp8_block: 1.55-1.8x our Triton GEMM at M >= 1024 (0.88-1.22x at M = 16-128, ahead in
#:   sum), on par with FlashInfer's DeepGEMM at M >= 1024 (0.85-1.06x; behind it at M = 128), so
#:   DeepGEMM stays first where it is installed; the Triton GEMV wins at M = 1.
AUTO_RANK = {
    "cutlass_fp8": {16: 10, 128: 10, 1024: 10, None: 10},
    "cutlass_int8": {1: 10, 16: 10, 128: 10, 1024: 10, None: 10},
    "cutlass_fp8_block": {16: 17, 128: 17, 1024: 17, None: 17},
}
FLOAT_ACTS = (torch.bfloat16, torch.float16, torch.float32)


class _CutlassKernel(Kernel):
    backend = "cutlass"
    priority = 25
    opaque = False
    #: which extension module (kernels/cutlass_build.FAMILIES) runs it
    family: str = ""

    def priority_for(self, device: DeviceInfo) -> int:
        return self.priority if device.type == "cuda" else 3000

    def auto_priority(self, device: DeviceInfo, m_bucket):
        if device.sm == 90 and m_bucket in AUTO_RANK.get(self.name, {}):
            return AUTO_RANK[self.name][m_bucket]
        return self.priority_for(device)

    def is_supported(self, device: DeviceInfo):
        if device.type != "cuda":
            return False, f"the CUTLASS kernels need a CUDA GPU (Hopper), this is {device}"
        if device.sm != 90:
            return False, (f"the CUTLASS kernels are built for sm90a (Hopper: H100, H200, H20) and use its "
                           f"TMA and warpgroup MMA, this is {device}")
        return B.toolchain_status()

    def can_implement(self, spec: LayerSpec):
        if spec.k % 16:
            return False, f"TMA loads 16-byte rows: the CUTLASS kernels need K divisible by 16 (K={spec.k})"
        if spec.n % 8:
            return False, f"TMA stores 16-byte rows: the CUTLASS kernels need N divisible by 8 (N={spec.n})"
        if spec.out_dtype not in OUT_DTYPES:
            return False, f"the CUTLASS kernels write bfloat16 or float16, this layer wants {spec.out_dtype}"
        if spec.act_input == "dynamic" and spec.act_dtype not in FLOAT_ACTS:
            return False, f"activation dtype {spec.act_dtype} is not bf16/fp16/fp32"
        return OK

    def module(self):
        return B.load(self.family)

    def emit(self, emit, m):
        from ..graph_pass import quantized_inputs

        self.module()  # build now, while torch.compile runs, not on the first forward
        q, sa, params, bias = quantized_inputs(emit, m)
        spec = dataclasses.replace(m.spec, act_input="static", act_dtype=q.meta["val"].dtype)
        return emit(torch.ops.qlinear_pass.linear.default, q, [*params, sa], bias, self.name, spec.to_json())

    def run(self, spec, x, params, bias):
        x = x.reshape(-1, spec.k)
        if spec.act_input == "static":
            w, sw, sa = params
            xq = x
        else:
            w, sw = params[:2]
            xq, sa = quantize_activation(spec.scheme, x)
        out = torch.empty((xq.shape[0], spec.n), device=xq.device, dtype=spec.out_dtype)
        if bias is not None:
            bias = bias.to(spec.out_dtype).contiguous()
        return self.module().gemm(xq.contiguous(), w.contiguous(), sa.float().reshape(-1).contiguous(),
                                  sw.float().reshape(-1).contiguous(), bias, out)


@register_kernel
class CutlassFp8(_CutlassKernel):
    name = "cutlass_fp8"
    schemes = ("fp8_tensor", "fp8_rowwise")
    family = "fp8"


@register_kernel
class CutlassInt8(_CutlassKernel):
    name = "cutlass_int8"
    schemes = ("int8_rowwise",)
    family = "int8"


@register_kernel
class CutlassFp8Block(_CutlassKernel):
    name = "cutlass_fp8_block"
    schemes = ("fp8_block",)
    family = "fp8_block"

    def can_implement(self, spec: LayerSpec):
        if spec.k % S.BLOCK:
            return False, f"the block-scaled kernel walks K in whole 128-wide scale blocks (K={spec.k})"
        return super().can_implement(spec)
