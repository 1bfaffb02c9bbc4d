"""Backend ``triton``: our own Triton kernels for every scheme.

* ``triton_w8a8``: ``fp8_tensor``, ``fp8_rowwise``, ``fp8_block``, ``int8_rowwise``.
* ``triton_weight_only``: ``int8_weight_only``, ``fp8_weight_only``, ``w4a16``.

Both take the decode kernel (``kernels/triton_decode.py``) at M == 1 (and up to
M = 16 where it measures faster, ``DECODE_ABOVE_M1``): one launch per linear that
streams the weight at the memory roofline, and one launch for sibling layers that
read the same activation (``run_group``: q/k/v, gate/up).  W8A8 layers with per-token
or per-tensor scales take the graph's own quantized activation
(``takes_quantized_activation``); 1x128 groups are quantized inside the kernel.  Otherwise the GEMMs of ``kernels/triton_gemm.py``: a quantize kernel
feeding the W8A8 GEMM (measured faster than quantizing inside the GEMM), and a
weight-only GEMM dequantising in registers (for w4a16 up to M = 64 the weight-stationary
one, ``WEIGHT_STATIONARY_MAX_M``), or above M = 128 (``DEQUANT_ABOVE_M``) one dequantising pass
over the weight and cuBLAS.

A w4a16 layer that holds its weight in the MMA-fragment layout (``weight_layout="mma16"``,
``kernels/int4_layout.py``) takes the dequantising pass and cuBLAS at every M: the Triton path
that reads that layout, what ``auto`` runs such a layer on where ``cutlass_w4a16`` cannot run
(CUTLASS not installed, not Hopper) above the M that ``cuda_w4a16`` serves.

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

    def takes_quantized_activation(self, spec):
        """Per-token and per-tensor scales: yes.  A per-token scale needs the whole row before the
        first weight tile (in the decode kernel, a pass over the activation by every program, and
        no split of K); Inductor finds it in the norm / SwiGLU kernel that writes the row (H200:
        fp8_rowwise decode 1.23x -> 1.57x bf16, benchmarks/results/h200/e2e).  1x128 groups
        (fp8_block): no; the decode kernel quantizes each group in the tile it reads, and
        Inductor's group quantization cost more than it saved (0.36 ms more per step)."""
        from .. import schemes as S

        return S.get_scheme(spec.scheme).act_granularity != "group"

    def _decode_args(self, spec, x, params, bias):
        """The decode kernel's arguments for one layer: its ``Layer``, the activation scale, the modes."""
        from .. import schemes as S
        from ..kernels import triton_decode as D

        scheme = S.get_scheme(spec.scheme)
        gran = scheme.act_granularity
        static = spec.act_input == "static"
        act = {("tensor", False): D.Act.DYN_TENSOR, ("token", False): D.Act.DYN_TOKEN, ("group", False): D.Act.DYN_GROUP,
               ("tensor", True): D.Act.STATIC_TENSOR, ("token", True): D.Act.STATIC_TOKEN,
               ("group", True): D.Act.STATIC_GROUP}[(gran, static)]
        sa = None
        if static:
            sa = params[2].float()
            sa = sa.reshape(x.shape[0], -1) if gran == "group" else sa.reshape(-1)
        modes = dict(w_kind=_decode_weight(params[0]), w_scale=_decode_scale_modes()[scheme.weight_granularity], act=act,
                     act_int8=scheme.act_dtype == torch.int8)
        return D.Layer(params[0], params[1], None, bias), sa, modes

    def run_group(self, specs, x, params, biases):
        from ..kernels import triton_decode as D

        x = x if x.dim() == 2 else x.reshape(-1, specs[0].k)
        if _decode_serves(specs[0].scheme, x.shape[0]) and D.fits(specs[0].k):
            # one launch for all: they share the activation (and, quantized, its scale)
            args = [self._decode_args(s, x, p, b) for s, p, b in zip(specs, params, biases)]
            _, sa, modes = args[0]
            return D.decode_gemm_group(x, [layer for layer, _, _ in args], sa, specs[0].out_dtype, **modes)
        return super().run_group(specs, x, params, biases)

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
            layer, sa, modes = self._decode_args(spec, x, params, bias)
            return D.decode_gemm_group(x, [layer], sa, spec.out_dtype, **modes)[0]
        w_scale = {"tensor": T.W_TENSOR, "channel": T.W_CHANNEL, "block": T.W_BLOCK}[scheme.weight_granularity]
        if spec.act_input == "static":
            sa = params[2].float()
            a_scale = T.A_TENSOR if gran == "tensor" else T.A_GROUP if gran == "group" else T.A_TOKEN
            if gran == "token":
                sa = sa.reshape(-1, 1)
            # the graph's quantized activation may arrive in any layout (Inductor's choice): the GEMM streams rows
            return T.w8a8_gemm(x.contiguous(), w, sa, sw, bias, spec.out_dtype, a_scale=a_scale, w_scale=w_scale)
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
    weight_layouts = ("public", "mma16")  # mma16: through the dequantising pass only

    def can_implement(self, spec: LayerSpec):
        if spec.act_dtype not in (torch.bfloat16, torch.float16):
            return False, f"the weight-only kernels use 16-bit tensor-core dots: bf16/fp16 activations, not {spec.act_dtype}"
        if spec.scheme == "w4a16":
            if spec.k % 128:
                return False, f"the int4 kernels walk K in whole 128-wide tiles: K={spec.k} is not a multiple of 128"
        elif spec.k % 16:
            return False, f"K={spec.k} is not a multiple of 16"
        return OK

    @staticmethod
    def _params(spec, params):
        """(weight, scale, zero points or None, kind, group size) of one layer."""
        from ..kernels import triton_gemm as T

        if spec.scheme == "w4a16":
            w, s, z = params
            return w, s, z, T.W_INT4_MMA16 if spec.weight_layout == "mma16" else T.W_INT4, spec.group_size
        (w, s), z = params[:2], None
        return w, s, z, (T.W_INT8 if spec.scheme == "int8_weight_only" else T.W_FP8), 0

    def run_group(self, specs, x, params, biases):
        from ..kernels import triton_decode as D

        x = x if x.dim() == 2 else x.reshape(-1, specs[0].k)
        g = specs[0].group_size if specs[0].scheme == "w4a16" else 0
        if _decode_serves(specs[0].scheme, x.shape[0]) and D.fits(specs[0].k, g) and specs[0].weight_layout != "mma16":
            layers = [D.Layer(*self._params(s, p)[:3], b) for s, p, b in zip(specs, params, biases)]
            return D.decode_gemm_group(x, layers, None, specs[0].out_dtype, w_kind=_decode_weight(layers[0].w),
                                       w_scale=D.Weight.GROUP if g else D.Weight.CHANNEL, act=D.Act.FLOAT, group_size=g)
        return super().run_group(specs, x, params, biases)

    def run(self, spec, x, params, bias):
        from ..kernels import triton_decode as D
        from ..kernels import triton_gemm as T

        x = x if x.dim() == 2 else x.reshape(-1, spec.k)
        m = x.shape[0]
        w, s, z, kind, g = self._params(spec, params)
        if kind == T.W_INT4_MMA16:  # the one path that reads this layout
            return T.dequant_linear(x.contiguous(), w, s, z, bias, spec.out_dtype, kind=kind, group_size=g)
        if _decode_serves(spec.scheme, m) and D.fits(spec.k, g):
            return D.decode_gemm(x, w, s, z, None, bias, spec.out_dtype, w_kind=_decode_weight(w),
                                 w_scale=D.Weight.GROUP if g else D.Weight.CHANNEL, act=D.Act.FLOAT, group_size=g)
        if m > DEQUANT_ABOVE_M and spec.k % 128 == 0:
            return T.dequant_linear(x.contiguous(), w, s, z, bias, spec.out_dtype, kind=kind, group_size=g)
        if kind == T.W_INT4 and m <= WEIGHT_STATIONARY_MAX_M and spec.k % 128 == 0:
            return T.weight_only_gemm_t(x.contiguous(), w, s, z, bias, spec.out_dtype, kind=kind, group_size=g)
        return T.weight_only_gemm(x.contiguous(), w, s, z, bias, spec.out_dtype, kind=kind, group_size=g)


#: schemes whose layers take the decode kernel's tensor-core path for 1 < M <= 16: where it beat the
#: GEMMs below on the H200 at M = 8 (benchmarks/results/h200/decode/summary.md, "x Triton GEMM"); at
#: M == 1 the decode kernel runs every scheme
DECODE_ABOVE_M1 = ("fp8_block",)


#: w4a16 layers with 1 < M <= this take the weight-stationary GEMM (the weight as the MMA's row
#: operand, the tokens as narrow columns): on the H200 at M = 16 / 32 / 64 it beat the GEMM below on
#: all three Llama shapes (K=4096 N=14336: 24.6 / 26.6 / 38.5 us vs 32.2 / 36.6 / 41.0;
#: benchmarks/results/h200/prefill)
WEIGHT_STATIONARY_MAX_M = 64


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
