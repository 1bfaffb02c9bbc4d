"""Backend ``cuda``: our own CUDA C++ kernels (sources in ``kernels/cuda/``), built with nvcc for
this GPU the first time one runs (seconds; cached; see ``kernels/cuda_build.py``).

* ``cuda_w4a16``: ``w4a16`` (int4 weights, groups of 32 / 64 / 128+, with or without zero
  points, bf16 or fp16 activations) at decode sizes: the tensor cores multiply, the CUDA cores
  only unpack nibbles (``kernels/cuda/w4a16_decode.cu``), one launch per linear and one for
  sibling layers that read the same activation (``run_group``: q/k/v, gate/up).  It computes
  any M, but reads its weight once per 16 tokens: ``auto`` takes it for M <= 16 only
  (``ranking.py``).
* ``cuda_w8a8``: ``fp8_rowwise``, ``fp8_tensor`` (fp8 e4m3) and ``int8_rowwise`` at decode sizes:
  the weight and the quantized activation go into the tensor cores as they are, no conversion
  (``kernels/cuda/w8a8_decode.cu``); it takes the graph's quantized activation (per token or per
  tensor), so the quantization fuses into the kernel that writes the activation.  Same launch
  structure as ``cuda_w4a16``, same M <= 16 in ``auto``.  ``fp8_block`` too, with a bf16 / fp16
  activation that the kernel quantizes per 1x128 group itself (a group is one chunk of its K
  loop), both scales applied to each chunk's sums.
* ``cuda_w8a16``: ``int8_weight_only`` and ``fp8_weight_only`` at decode sizes: the same kernel with
  a bf16 / fp16 activation; the 8-bit weights become 16-bit values in registers (exactly) and the
  16-bit tensor-core MMA multiplies them, the per-channel scale applied once to the sum.

Each runs the residual add after a layer in its launch at any M; with one token, those that load a
16-bit activation (``cuda_w4a16``, ``cuda_w8a16``, and ``cuda_w8a8`` for ``fp8_block``) also run the
RMSNorm or SwiGLU that makes it (``why_not_fuse``; ``fusion.py``).
"""
from __future__ import annotations

import torch

from ..kernel import Kernel
from ..registry import register_kernel
from ..spec import OK, DeviceInfo, LayerSpec

ACTS = (torch.bfloat16, torch.float16)


def _cuda_status(device: DeviceInfo, min_sm: int, what: str, nvcc_version: tuple = ()):
    """Can our CUDA kernels run here: a GPU of sm ``min_sm`` or newer (for ``what``) and an nvcc
    (``nvcc_version`` or newer) to build them?"""
    if device.type != "cuda":
        return False, f"our CUDA kernels need a CUDA GPU, this is {device.type}"
    if device.sm is not None and device.sm < min_sm:
        return False, f"{what} needs sm{min_sm}+, this is {device}"
    from ..kernels import cuda_build

    path, why = cuda_build.toolchain(nvcc_version or cuda_build.MIN_NVCC)
    if path is None:
        return False, f"it is built on first use with nvcc: {why}"
    return OK


def _why_not_fuse(what: str, spec: LayerSpec, why_not_prologue) -> str:
    """The residual add at any M; a prologue where the kernel's ``why_not_prologue(what, m, k)`` says so."""
    return "" if what == "residual" else why_not_prologue(what, spec.m, spec.k)


def _run_fused(kernel: Kernel, specs, x: torch.Tensor, params, biases, fused, why_not_prologue):
    """``kernel.run_group`` with what fusion moved into its launch: the residuals as [M, N_i], and the
    prologue with its operands where the kernel runs it at this M (``why_not_prologue(what, m, k)``);
    at an M where it does not (another M of a per-M plan), the activation made here by the reference."""
    from ..fusion import prologue_of

    x = x if x.dim() == 2 else x.reshape(-1, specs[0].k)
    kw = {"residuals": [r if r is None else r.reshape(x.shape[0], s.n) for s, r in zip(specs, fused.residuals)]}
    if fused.prologue and why_not_prologue(fused.prologue, x.shape[0], x.shape[1]):
        x = prologue_of(fused, x)
    elif fused.prologue:
        x2 = fused.x2 if fused.x2 is None else fused.x2.reshape(x.shape)
        kw.update(prologue=fused.prologue, x2=x2, norm_weight=fused.norm_weight, eps=fused.eps)
    return kernel.run_group(specs, x, params, biases, **kw)


def _act16_limits(spec: LayerSpec, why_not: str):
    """The limits of the kernels that take a 16-bit activation (weight-only, and cuda_w8a8's
    fp8_block): bf16 / fp16 (a tensor-core operand, or what the kernel quantizes) that is also the
    output's dtype, and the kernel's own reason ``why_not`` ("" when the shape is fine)."""
    if spec.act_dtype not in ACTS:
        return False, f"bf16 / fp16 activations only (tensor-core operands), not {spec.act_dtype}"
    if spec.out_dtype != spec.act_dtype:
        return False, f"writes the activation's dtype ({spec.act_dtype}), not {spec.out_dtype}"
    return (False, why_not) if why_not else OK


@register_kernel
class CudaW4A16(Kernel):
    name = "cuda_w4a16"
    backend = "cuda"
    schemes = ("w4a16",)
    weight_layouts = ("public", "mma16")  # a public weight is read through its MMA-fragment copy

    def is_supported(self, device: DeviceInfo):
        return _cuda_status(device, 80, "bf16 mma.sync (Ampere or newer)")

    def can_implement(self, spec: LayerSpec):
        from ..kernels.cuda_w4a16 import check_group_size
        from ..kernels.int4_layout import check_shape

        return _act16_limits(spec, check_group_size(spec.k, spec.group_size or 0) or check_shape(spec.n, spec.k))

    def run(self, spec, x, params, bias):
        return self.run_group([spec], x, [params], [bias])[0]

    def run_group(self, specs, x, params, biases, **fused):
        from ..kernels.cuda_w4a16 import Layer, w4a16_decode_group
        from ..kernels.int4_layout import MMA16, has_mma16, mma16_of

        x = x if x.dim() == 2 else x.reshape(-1, specs[0].k)
        held = [s.weight_layout == MMA16 for s in specs]  # the layer holds the layout: no copy
        # a weight's MMA-fragment copy made in this call was written by the kernel just ahead of the
        # launch: no programmatic dependent launch then (the kernel would read it early)
        ready = all(h or has_mma16(p[0]) for h, p in zip(held, params))
        layers = [Layer(p[0] if h else mma16_of(p[0]), p[1], p[2] if len(p) > 2 else None, b)
                  for h, p, b in zip(held, params, biases)]
        return w4a16_decode_group(x, layers, specs[0].group_size, pdl=None if ready else False, **fused)

    def why_not_fuse(self, spec, what):
        """The residual add after it at any M; the RMSNorm or SwiGLU before it with one token (a
        static M = 1) up to K = 16384, where each warp loads its share of the activation row once."""
        from ..kernels.cuda_w4a16 import why_not_prologue

        return _why_not_fuse(what, spec, why_not_prologue)

    def run_fused(self, specs, x, params, biases, fused):
        from ..kernels.cuda_w4a16 import why_not_prologue

        return _run_fused(self, specs, x, params, biases, fused, why_not_prologue)


@register_kernel
class CudaW8A8(Kernel):
    name = "cuda_w8a8"
    backend = "cuda"
    schemes = ("fp8_rowwise", "fp8_tensor", "int8_rowwise", "fp8_block")

    def is_supported(self, device: DeviceInfo):
        # fp8 e4m3 mma.sync: sm89 and PTX ISA 8.4 (CUDA 12.4); the kernel serves all three schemes
        return _cuda_status(device, 89, "fp8 mma.sync (Ada / Hopper or newer; int8_rowwise alone would run on sm80, but "
                            "the kernel serves all three)", (12, 4))

    def can_implement(self, spec: LayerSpec):
        from ..kernels.cuda_w8a8 import OUT_DTYPES, check_k

        if spec.scheme == "fp8_block" and spec.act_input == "dynamic":
            return _act16_limits(spec, check_k(spec.k))  # quantized per 1x128 group in the kernel
        if spec.scheme == "fp8_block" and spec.act_dtype != torch.float8_e4m3fn:
            return False, f"fp8_block: a quantized activation is fp8 e4m3, not {spec.act_dtype}"
        if spec.out_dtype not in OUT_DTYPES:
            return False, f"writes bf16, fp16 or fp32, not {spec.out_dtype}"
        if spec.act_input == "dynamic" and spec.act_dtype not in OUT_DTYPES:
            return False, f"activation dtype {spec.act_dtype} is not bf16/fp16/fp32"
        why = check_k(spec.k)
        return (False, why) if why else OK

    #: fp8_block: above this many tokens (a static M) the graph quantizes the activation
    BLOCK_QUANTIZED_ABOVE = 8

    def takes_quantized_activation(self, spec):
        """Per-token and per-tensor scales: yes, the kernel multiplies quantized bytes; the graph's
        quantization fuses into the kernel that writes the activation (the norm before q/k/v, the
        SwiGLU before down_proj).  fp8_block: up to 8 tokens (or a symbolic M) no, the kernel
        quantizes each 1x128 group in the chunk it reads (one pass over the activation fewer, and no
        quantization kernels in the graph); above, yes: each CTA quantizes the activation again for
        every row tile it computes, which at 16 tokens made the kernel 1.3-1.45x slower (H200,
        ``benchmarks/results/h200/decode/fp8_block_q/``).  End to end at batch 8 the graph's
        quantization was 7.4% slower than the kernel's (H200, 1884 against 2033-2034 tok/s,
        ``benchmarks/results/h200/e2e/fp8_block_b8_quant/``)."""
        if spec.scheme != "fp8_block":
            return True
        return spec.m is not None and spec.m > self.BLOCK_QUANTIZED_ABOVE

    @staticmethod
    def _quantized(spec, x, params):
        """(the quantized activation, its scale): the graph's, or (a layer run outside a compiled
        graph's plan) quantized here as the scheme's reference does."""
        from .. import schemes as S

        x = x if x.dim() == 2 else x.reshape(-1, spec.k)
        if spec.act_input == "static":
            return x, params[-1]
        return S.quantize_activation(spec.scheme, x)

    def run(self, spec, x, params, bias):
        from ..kernels.cuda_w8a8 import fp8_block_decode, fp8_block_q_decode, w8a8_decode

        if spec.scheme == "fp8_block":
            x = x if x.dim() == 2 else x.reshape(-1, spec.k)
            if spec.act_input == "static":
                return fp8_block_q_decode(x, params[-1], params[0], params[1], bias, spec.out_dtype)
            return fp8_block_decode(x, params[0], params[1], bias)
        xq, sx = self._quantized(spec, x, params)
        return w8a8_decode(xq, sx, params[0], params[1], bias, spec.out_dtype)

    def run_group(self, specs, x, params, biases, **fused):
        from ..kernels.cuda_w8a8 import Layer, fp8_block_decode_group, fp8_block_q_decode_group, w8a8_decode_group

        if specs[0].scheme == "fp8_block":
            x = x if x.dim() == 2 else x.reshape(-1, specs[0].k)
            layers = [Layer(p[0], p[1], b) for p, b in zip(params, biases)]
            if specs[0].act_input == "static":
                return fp8_block_q_decode_group(x, params[0][-1], layers, specs[0].out_dtype, **fused)
            return fp8_block_decode_group(x, layers, **fused)
        xq, sx = self._quantized(specs[0], x, params[0])
        return w8a8_decode_group(xq, sx, [Layer(p[0], p[1], b) for p, b in zip(params, biases)], specs[0].out_dtype,
                                 **fused)

    def why_not_fuse(self, spec, what):
        """The residual add after it at any M; the RMSNorm or SwiGLU before it with one token (a static
        M = 1) for fp8_block, which quantizes its 16-bit activation itself.  A quantized activation
        (the other schemes, fp8_block above 8 tokens) comes from the graph's quantization, into which
        the norm or SwiGLU already fuses."""
        from ..kernels.cuda_w8a8 import why_not_prologue

        if what != "residual" and (spec.scheme != "fp8_block" or self.takes_quantized_activation(spec)):
            return f"takes the graph's quantized activation ({what} fuses into the quantization's kernel)"
        return _why_not_fuse(what, spec, why_not_prologue)

    def run_fused(self, specs, x, params, biases, fused):
        from ..kernels.cuda_w8a8 import why_not_prologue

        return _run_fused(self, specs, x, params, biases, fused, why_not_prologue)


@register_kernel
class CudaW8A16(Kernel):
    name = "cuda_w8a16"
    backend = "cuda"
    schemes = ("int8_weight_only", "fp8_weight_only")

    def is_supported(self, device: DeviceInfo):
        # bf16 mma.sync and fma.rn.bf16x2: sm80; e4m3 -> f16 converts in hardware from sm89, in a few
        # instructions before (cuda_fp8.h)
        return _cuda_status(device, 80, "bf16 mma.sync (Ampere or newer)")

    def can_implement(self, spec: LayerSpec):
        from ..kernels.cuda_w8a8 import check_k

        return _act16_limits(spec, check_k(spec.k))

    def run(self, spec, x, params, bias):
        from ..kernels.cuda_w8a8 import w8a16_decode

        x = x if x.dim() == 2 else x.reshape(-1, spec.k)
        return w8a16_decode(x, params[0], params[1], bias)

    def run_group(self, specs, x, params, biases, **fused):
        from ..kernels.cuda_w8a8 import Layer, w8a16_decode_group

        x = x if x.dim() == 2 else x.reshape(-1, specs[0].k)
        return w8a16_decode_group(x, [Layer(p[0], p[1], b) for p, b in zip(params, biases)], **fused)

    def why_not_fuse(self, spec, what):
        """The residual add after it at any M; the RMSNorm or SwiGLU before it with one token (a static
        M = 1) up to K = 32768: each warp makes its share of the activation row once, in shared memory."""
        from ..kernels.cuda_w8a8 import why_not_prologue

        return _why_not_fuse(what, spec, why_not_prologue)

    def run_fused(self, specs, x, params, biases, fused):
        from ..kernels.cuda_w8a8 import why_not_prologue

        return _run_fused(self, specs, x, params, biases, fused, why_not_prologue)
