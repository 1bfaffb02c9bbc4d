"""Backend ``triton``: our own Triton kernels for every scheme.

* ``triton_w8a8``: ``fp8_tensor``, ``fp8_rowwise``, ``fp8_block``, ``int8_rowwise``.
* ``triton_weight_only``: ``int8_weight_only``, ``fp8_weight_only``, ``w4a16``.

Both take the decode kernel (``kernels/triton_decode.py``) at M == 1 (and up to
M = 16 where it measures faster, ``DECODE_ABOVE_M1``): one launch per linear that
streams the weight at the memory roofline and, for W8A8, quantizes the activation
row itself.  Otherwise the GEMMs of ``kernels/triton_gemm.py``: a quantize kernel
feeding the W8A8 GEMM (measured faster than quantizing inside the GEMM), and a
weight-only GEMM dequantising in registers, or above M = 128 (``DEQUANT_ABOVE_M``)
one dequantising pass over the weight and cuBLAS.

The path is chosen by M inside the op, so one compiled graph serves prefill
and decode.  On a machine without a GPU the kernels run through Triton's
interpreter when ``TRITON_INTERPRET=1`` (that is how CI checks them).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..registry import OK, DeviceInfo, Kernel, LayerSpec, register_kernel

FLOAT_ACTS = (torch.bfloat16, torch.float16, torch.float32)


def _triton_status(device: DeviceInfo):
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed (pip install 'qlinear_pass[triton]')"
    if device.type == "cuda":
        if device.sm is not None and device.sm < 80:
            return False, f"our Triton kernels need sm80+ (Ampere or newer), this is {device}"
        return OK
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return OK
    return False, f"Triton kernels need a CUDA GPU (on {device.type}, only through TRITON_INTERPRET=1, for testing)"


class _TritonKernel(Kernel):
    backend = "triton"

    def is_supported(self, device: DeviceInfo):
        return _triton_status(device)


@register_kernel
class TritonW8A8(_TritonKernel):
    name = "triton_w8a8"
    schemes = ("fp8_tensor", "fp8_rowwise", "fp8_block", "int8_rowwise")

    def is_supported(self, device: DeviceInfo):
        ok, why = _triton_status(device)
        if ok and device.type == "cuda" and device.sm is not None and device.sm < 89:
            return False, f"FP8 tensor-core dots need sm89+; this is {device} (int8_rowwise alone would run, but the kernel serves all four)"
        return ok, why

    def can_implement(self, spec: LayerSpec):
        if spec.k % 32:
            return False, f"the W8A8 kernels need K divisible by 32 (K={spec.k})"
        if spec.out_dtype not in FLOAT_ACTS:
            return False, f"output dtype {spec.out_dtype} is not bf16/fp16/fp32"
        if spec.act_input == "dynamic" and spec.act_dtype not in FLOAT_ACTS:
            return False, f"activation dtype {spec.act_dtype} is not bf16/fp16/fp32"
        return OK

    def run(self, spec, x, params, bias):
        from .. import schemes as S
        from ..kernels import triton_decode as D
        from ..kernels import triton_gemm as T

        scheme = S.get_scheme(spec.scheme)
        w, sw = params[0], params[1]
        x = x if x.dim() == 2 else x.reshape(-1, spec.k)
        m = x.shape[0]
        gran = scheme.act_granularity
        if _decode_serves(spec.scheme, m) and D.fits(spec.k):
            # decode sizes: one launch that quantizes the activation itself (or takes the given one)
            static = spec.act_input == "static"
            act = {("tensor", False): D.Act.DYN_TENSOR, ("token", False): D.Act.DYN_TOKEN, ("group", False): D.Act.DYN_GROUP,
                   ("tensor", True): D.Act.STATIC_TENSOR, ("token", True): D.Act.STATIC_TOKEN,
                   ("group", True): D.Act.STATIC_GROUP}[(gran, static)]
            sa = None
            if static:
                sa = params[2].float()
                sa = sa.reshape(m, -1) if gran == "group" else sa.reshape(-1)
            return D.decode_gemm(x, w, sw, None, sa, bias, spec.out_dtype, w_kind=_decode_weight(w),
                                 w_scale=_decode_scale_modes()[scheme.weight_granularity], act=act,
                                 act_int8=scheme.act_dtype == torch.int8)
        w_scale = {"tensor": T.W_TENSOR, "channel": T.W_CHANNEL, "block": T.W_BLOCK}[scheme.weight_granularity]
        if spec.act_input == "static":
            sa = params[2].float()
            a_scale = T.A_TENSOR if gran == "tensor" else T.A_GROUP if gran == "group" else T.A_TOKEN
            if gran == "token":
                sa = sa.reshape(-1, 1)
            return T.w8a8_gemm(x, w, sa, sw, bias, spec.out_dtype, a_scale=a_scale, w_scale=w_scale)
        if gran == "tensor":
            xq, sa = S.quantize_activation(scheme, x)
            return T.w8a8_gemm(xq, w, sa.reshape(()), sw, bias, spec.out_dtype, a_scale=T.A_TENSOR, w_scale=w_scale)
        xq, sa = T.quantize_activation(x, scheme.act_dtype, group=128 if gran == "group" else 0)
        return T.w8a8_gemm(xq, w, sa, sw, bias, spec.out_dtype,
                           a_scale=T.A_GROUP if gran == "group" else T.A_TOKEN, w_scale=w_scale)


@register_kernel
class TritonWeightOnly(_TritonKernel):
    name = "triton_weight_only"
    schemes = ("int8_weight_only", "fp8_weight_only", "w4a16")

    def can_implement(self, spec: LayerSpec):
        if spec.act_dtype not in (torch.bfloat16, torch.float16):
            return False, f"the weight-only kernels use 16-bit tensor-core dots: bf16/fp16 activations, not {spec.act_dtype}"
        if spec.scheme == "w4a16":
            if spec.k % 128:
                return False, f"the int4 kernels walk K in whole 128-wide tiles: K={spec.k} is not a multiple of 128"
        elif spec.k % 16:
            return False, f"K={spec.k} is not a multiple of 16"
        return OK

    def run(self, spec, x, params, bias):
        from ..kernels import triton_decode as D
        from ..kernels import triton_gemm as T

        x = x if x.dim() == 2 else x.reshape(-1, spec.k)
        m = x.shape[0]
        if spec.scheme == "w4a16":
            w, s, z = params
            kind, g = T.W_INT4, spec.group_size
        else:
            (w, s), z = params[:2], None
            kind, g = (T.W_INT8 if spec.scheme == "int8_weight_only" else T.W_FP8), 0
        if _decode_serves(spec.scheme, m) and D.fits(spec.k, g):
            return D.decode_gemm(x, w, s, z, None, bias, spec.out_dtype, w_kind=_decode_weight(w),
                                 w_scale=D.Weight.GROUP if g else D.Weight.CHANNEL, act=D.Act.FLOAT, group_size=g)
        if m > DEQUANT_ABOVE_M and spec.k % 128 == 0:
            return T.dequant_linear(x.contiguous(), w, s, z, bias, spec.out_dtype, kind=kind, group_size=g)
        return T.weight_only_gemm(x.contiguous(), w, s, z, bias, spec.out_dtype, kind=kind, group_size=g)


#: schemes whose layers take the decode kernel's tensor-core path for 1 < M <= 16: where it beat the
#: GEMMs below on the H200 at M = 8 (benchmarks/results/h200/decode/summary.md, "x Triton GEMM"); at
#: M == 1 the decode kernel runs every scheme
DECODE_ABOVE_M1 = ("fp8_block",)


#: above this M a weight-only layer dequantises its weight once (one Triton pass) and runs cuBLAS:
#: at prefill sizes that beats dequantising every tile in our GEMM's mainloop (H200,
#: benchmarks/results/h200/decode/prefill)
DEQUANT_ABOVE_M = 128


def _decode_serves(scheme: str, m: int) -> bool:
    from ..kernels.triton_decode import MAX_M

    return m == 1 or (m <= MAX_M and scheme in DECODE_ABOVE_M1)


def _decode_weight(w: torch.Tensor) -> int:
    from ..kernels.triton_decode import Weight

    return {torch.int8: Weight.INT8, torch.uint8: Weight.INT4}.get(w.dtype, Weight.FP8)


def _decode_scale_modes() -> dict:
    from ..kernels.triton_decode import Weight

    return {"tensor": Weight.TENSOR, "channel": Weight.CHANNEL, "block": Weight.BLOCK, "group": Weight.GROUP}
