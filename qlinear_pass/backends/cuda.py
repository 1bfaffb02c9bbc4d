"""Backend ``cuda``: our own CUDA C++ kernels (sources in ``kernels/cuda/``), built with nvcc for
this GPU the first time one runs (seconds; cached; see ``kernels/cuda_build.py``).

* ``cuda_w4a16``: ``w4a16`` (int4 weights, groups of 32 / 64 / 128+, with or without zero
  points, bf16 or fp16 activations) at decode sizes: the tensor cores multiply, the CUDA cores
  only unpack nibbles (``kernels/cuda/w4a16_decode.cu``), one launch per linear and one for
  sibling layers that read the same activation (``run_group``: q/k/v, gate/up).  It computes
  any M, but reads its weight once per 16 tokens: ``auto`` takes it for M <= 16 only
  (``ranking.py``).
"""
from __future__ import annotations

import torch

from ..kernel import Kernel
from ..registry import register_kernel
from ..spec import OK, DeviceInfo, LayerSpec

ACTS = (torch.bfloat16, torch.float16)


@register_kernel
class CudaW4A16(Kernel):
    name = "cuda_w4a16"
    backend = "cuda"
    schemes = ("w4a16",)

    def is_supported(self, device: DeviceInfo):
        if device.type != "cuda":
            return False, f"our CUDA kernels need a CUDA GPU, this is {device.type}"
        if device.sm is not None and device.sm < 80:
            return False, f"bf16 mma.sync needs sm80+ (Ampere or newer), this is {device}"
        from ..kernels import cuda_build

        path, why = cuda_build.toolchain()
        if path is None:
            return False, f"it is built on first use with nvcc: {why}"
        return OK

    def can_implement(self, spec: LayerSpec):
        from ..kernels.cuda_w4a16 import check_group_size

        if spec.act_dtype not in ACTS:
            return False, f"bf16 / fp16 activations only (tensor-core operands), not {spec.act_dtype}"
        if spec.out_dtype != spec.act_dtype:
            return False, f"writes the activation's dtype ({spec.act_dtype}), not {spec.out_dtype}"
        why = check_group_size(spec.k, spec.group_size or 0)
        return (False, why) if why else OK

    @staticmethod
    def _layer(params, bias):
        from ..kernels.cuda_w4a16 import Layer

        return Layer(params[0], params[1], params[2] if len(params) > 2 else None, bias)

    def run(self, spec, x, params, bias):
        from ..kernels.cuda_w4a16 import w4a16_decode_group

        x = x if x.dim() == 2 else x.reshape(-1, spec.k)
        return w4a16_decode_group(x, [self._layer(params, bias)], spec.group_size)[0]

    def run_group(self, specs, x, params, biases):
        from ..kernels.cuda_w4a16 import w4a16_decode_group

        x = x if x.dim() == 2 else x.reshape(-1, specs[0].k)
        return w4a16_decode_group(x, [self._layer(p, b) for p, b in zip(params, biases)], specs[0].group_size)
