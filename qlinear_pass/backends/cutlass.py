"""Backend ``cutlass``: our CUTLASS 3.x GEMMs for Hopper (sources in ``kernels/cutlass/``).

* ``cutlass_fp8``: ``fp8_tensor`` and ``fp8_rowwise``; TMA warp-specialized
  FP8 GEMM whose epilogue applies the scales (one value, or one per token /
  per channel) and the bias.
* ``cutlass_int8``: ``int8_rowwise``; the same with int8 operands and int32
  accumulation.
* ``cutlass_fp8_block``: ``fp8_block``; the scales of the 1x128 activation
  groups and the 128x128 weight blocks are applied in the mainloop, once per
  128-wide K block.
* ``cutlass_w4a16``: ``w4a16`` with groups of 64 or more (the K tile); the
  mixed-input mainloop loads the 4-bit weight with TMA and converts it in
  registers, as wgmma's A operand, so the problem runs swapped (weight rows x
  tokens) and prefill pays for 4-bit weights, not 16-bit ones.  It runs behind
  the custom op (the activation stays 16-bit), for the M buckets ``ranking.py``
  gives it.
* ``cutlass_int8_weight_only`` / ``cutlass_fp8_weight_only``: the same mainloop
  for 8-bit weights, converted exactly to the activation's dtype, the per-channel
  scale applied in the epilogue.

Each family is built with a few tile configurations (``*Configs`` in
``kernels/cutlass/qlp_gemm.cuh``); ``tile_config`` below picks one per call by
M, N and K, from what ``benchmarks/bench_cutlass_tiles.py`` measured.  Nothing is
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
import math
import weakref
from typing import Optional

import torch

from .. import schemes as S
from ..kernels import cutlass_build as B
from ..kernels.ops import mn_major_scales, quantize_activation
from ..kernel import Kernel
from ..registry import register_kernel
from ..spec import OK, DeviceInfo, LayerSpec

OUT_DTYPES = (torch.bfloat16, torch.float16)
FLOAT_ACTS = (torch.bfloat16, torch.float16, torch.float32)
#: family -> {tile configuration name: index in its built module}, read once per process
_CONFIG_INDICES: dict = {}


def tile_config(family: str, m: int, n: int, k: int, group: int = 0) -> str:
    """The tile configuration (its name in qlp_gemm.cuh) a family runs for an M x N x K problem.

    From benchmarks/results/h100/cutlass/tiles/ (H100, every configuration timed on Llama-3-8B's
    four shapes at M = 1, 16, 128, 1024, 4096): decode-sized M takes 64-row tiles, prefill
    128x128 tiles in 2-CTA clusters.  Each family's rule picks the fastest configuration in at
    least 17 of those 20 cells and is within 5% of it in the rest.  For fp8_block the cluster
    along M (sharing the weight tile) beat the one along N by up to 10% from M = 1024 up; a
    stream-K schedule, also timed, was never faster.  ``group``: w4a16's group size (its K 128 tiles
    need groups of a multiple of 128; 0 or any other size takes the K 64 tiles).
    """
    if family == "fp8":
        if m <= 64:
            return "64x64x128 c1x8 pingpong"
        return "64x128x128 c2x1 pingpong" if m <= 128 else "128x128x128 c2x1 pingpong"
    if family == "int8":
        if m <= 64:
            return "64x128x256 c1x8"
        return "64x128x128 c2x1 pingpong" if m <= 128 else "128x128x128 c2x1 pingpong"
    if family == "fp8_block":
        return "64x128x128 pingpong" if m <= 128 else "128x128x128 c2x1 cooperative"
    if family in ("w4a16", "int8_wo", "fp8_wo"):
        # h200/prefill: every configuration at M = 16 .. 4096 on (K, N) = (4096, 14336), (14336, 4096),
        # (4096, 6144), (4096, 1024): stream-K wins where few tiles leave SMs idle; above M = 128,
        # 256 tokens a tile while that gives at least half of Hopper's 132 SMs a tile, 128 where 256 would
        # not (k_proj / v_proj, N = 1024).  h200/prefill/cutlass_wo_tiles (every family, M = 128 / 1024
        # / 4096 on the first three shapes): where the 256-token tiles leave the last wave under 90% full,
        # stream-K was 8-13% faster than the plain schedule (M = 1024 on the K = 4096 shapes), and where
        # the waves are full the plain schedule was within 2% or up to 22% faster; at M = 128 on (4096,
        # 6144), whose 48 tiles of 128 x 128 fill a third of the GPU, 64-row pingpong tiles were 15-18%
        # faster than stream-K, which kept the lead where K is long ((14336, 4096): 32 tiles)
        # M <= 64, every configuration at M = 16 / 32 / 64 on the three shapes above
        # (h200/prefill/cutlass_w4a16_k128 for w4a16 g128, h200/prefill/cutlass_wo8_k128 for the 8-bit
        # families): 32-token tiles up to M = 32, 64 above, each with K 128 (half the mainloop
        # iterations of K 64 for the same bytes), fastest or within 4% in every cell; against the
        # 128x64x64 tiles before them 6-22% faster on (4096, 14336) (w4a16 M = 32: 20.2 us against
        # 23.6, bf16 30.6), at most 4% slower (M = 64 on (14336, 4096)).  w4a16's K 128 needs groups
        # of a multiple of 128; other groups keep K 64
        if m <= 64:
            k128 = family != "w4a16" or (group > 0 and group % 128 == 0)
            return f"128x{32 if m <= 32 else 64}x{128 if k128 else 64} cooperative stream-K"
        tiles128 = -(-n // 128) * -(-m // 128)
        if m <= 128 and k <= 8192 and 40 <= tiles128 < 66:  # (fewer tiles: not measured)
            return "64x128x64 pingpong"
        if m > 128:
            tiles = -(-n // 128) * -(-m // 256)
            if tiles >= 66:
                waves = tiles / 132
                if waves / math.ceil(waves) < 0.9:
                    return "128x256x64 cooperative stream-K"
                return "128x256x64 cooperative"
            if tiles128 >= 66:
                return "128x128x64 cooperative"
        return "128x128x64 cooperative stream-K"
    raise ValueError(f"unknown CUTLASS kernel family {family!r}")


class _CutlassKernel(Kernel):
    backend = "cutlass"
    opaque = False
    #: which extension module (kernels/cutlass_build.FAMILIES) runs it
    family: str = ""

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

    def config_index(self, m: int, n: int, k: int, name: Optional[str] = None, group: int = 0) -> int:
        """The index in the built module of configuration ``name`` (default: ``tile_config``'s choice)."""
        indices = _CONFIG_INDICES.get(self.family)
        if indices is None:
            indices = _CONFIG_INDICES[self.family] = {c: i for i, c in enumerate(self.module().configs())}
        name = name or tile_config(self.family, m, n, k, group)
        if name not in indices:
            raise RuntimeError(f"the CUTLASS {self.family} build has no tile configuration {name!r} "
                               f"(it has {', '.join(indices)})")
        return indices[name]

    def takes_quantized_activation(self, spec):
        return True  # the GEMMs take a quantized activation only

    def prepare(self) -> None:
        self.module()  # build now, while torch.compile runs, not on the first forward

    def emit(self, emit, m):
        from ..emit import quantized_inputs

        q, sa, params, bias = quantized_inputs(emit, m)
        spec = dataclasses.replace(m.spec, act_input="static", act_dtype=q.meta["val"].dtype)
        sa = self.emit_activation_scale(emit, sa, q, spec)
        return emit(torch.ops.qlinear_pass.linear.default, q, [*params, sa], bias, self.name, spec.to_json())

    def emit_activation_scale(self, emit, sa, q, spec: LayerSpec):
        """The activation scale node the op is given (by default the graph's own)."""
        return sa

    def activation_scale(self, sa: torch.Tensor, m: int) -> torch.Tensor:
        """The activation scale as the family's kernels read it."""
        return sa.float().reshape(-1).contiguous()

    def run(self, spec, x, params, bias, config: Optional[str] = None):
        x = x.reshape(-1, spec.k)
        if spec.act_input == "static":
            w, sw, sa = params
            xq = x
        else:
            w, sw = params[:2]
            xq, sa = quantize_activation(spec.scheme, x)
        m = xq.shape[0]
        out = torch.empty((m, spec.n), device=xq.device, dtype=spec.out_dtype)
        if bias is not None:
            bias = bias.to(spec.out_dtype).contiguous()
        return self.module().gemm(xq.contiguous(), w.contiguous(), self.activation_scale(sa, m),
                                  sw.float().reshape(-1).contiguous(), bias, out,
                                  self.config_index(m, spec.n, spec.k, config))


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

    def activation_scale(self, sa: torch.Tensor, m: int) -> torch.Tensor:
        # [M, K/128] -> MN-major [K/128, M rounded up to 4]: the mainloop loads a tile's column by TMA
        # (no copy when emit_activation_scale had the graph write it so)
        return mn_major_scales(sa.reshape(m, -1))

    def emit_activation_scale(self, emit, sa, q, spec):
        """With M fixed in the graph, the graph writes the scales MN-major (Inductor fuses or
        launches that write); a symbolic M keeps the graph's [M, K/128] and ``run`` copies."""
        from ..emit import mn_major_scale_view, val

        m = val(q).shape[0]
        if not isinstance(m, int):
            return sa
        return mn_major_scale_view(emit, sa, m, spec.k // S.BLOCK)


class _CutlassWeightOnly(_CutlassKernel):
    """A weight-only family: it runs behind the custom op on the 16-bit activation (nothing to
    quantize, so nothing for Inductor to fuse) and writes the activation's dtype."""

    opaque = True
    #: K must be a multiple of this (16-byte TMA rows of the weight)
    k_multiple = 16

    def can_implement(self, spec: LayerSpec):
        if spec.act_dtype not in OUT_DTYPES:
            return False, f"bf16 / fp16 activations only (the MMA's type), not {spec.act_dtype}"
        if spec.out_dtype != spec.act_dtype:
            return False, f"writes the activation's dtype ({spec.act_dtype}), not {spec.out_dtype}"
        if spec.n % 8 or spec.k % self.k_multiple:
            return False, (f"TMA moves 16-byte rows: N must be a multiple of 8 and K of {self.k_multiple} "
                           f"(N={spec.n}, K={spec.k})")
        return OK

    def takes_quantized_activation(self, spec):
        return False

    @staticmethod
    def _io(spec, x, bias):
        """The 2-D contiguous activation, the output to fill and the bias in the activation's dtype."""
        x = x.reshape(-1, spec.k).contiguous()
        out = torch.empty((x.shape[0], spec.n), device=x.device, dtype=x.dtype)
        return x, out, None if bias is None else bias.to(x.dtype).contiguous()


@register_kernel
class CutlassW4A16(_CutlassWeightOnly):
    """W4A16 through CUTLASS's sm90 mixed-input GEMM (see ``W4A16Gemm`` in qlp_gemm.cuh)."""

    name = "cutlass_w4a16"
    schemes = ("w4a16",)
    family = "w4a16"
    k_multiple = 8
    weight_layouts = ("public", "mma16")  # a public weight is read through its MMA-fragment copy

    def __init__(self) -> None:
        #: id(scale) -> (weakref to it, versions, zero, scale MN-major, -zero * scale MN-major): the
        #: kernel's view of a layer's groups, made on the layer's first call and dropped with its scale
        self._groups: dict = {}

    def can_implement(self, spec: LayerSpec):
        from ..kernels.int4_layout import check_shape

        g = spec.group_size or 0
        if g < 64 or g % 64 or spec.k % g:
            return False, (f"the mixed-input mainloop needs groups of 64 or a multiple (its K tile) that divide K; "
                           f"this layer has groups of {g} with K={spec.k}")
        why = check_shape(spec.n, spec.k)
        if why:
            return False, why
        return super().can_implement(spec)

    def group_params(self, scale: torch.Tensor, zero: Optional[torch.Tensor], dtype: torch.dtype):
        """(scale, -zero_point * scale), both [K / group, N] in ``dtype``: the layout the mainloop loads."""
        versions = (scale._version, None if zero is None else zero._version, dtype)
        hit = self._groups.get((id(scale), dtype))
        if hit is not None and hit[0]() is scale and hit[1] == versions and hit[2] is zero:
            return hit[3], hit[4]
        s32 = scale.float()
        z = zero.float() if zero is not None else torch.full_like(s32, 8.0)
        s_t = s32.t().to(dtype).contiguous()
        z_t = (-z * s32).t().to(dtype).contiguous()
        if not (scale.is_cuda and torch.cuda.is_current_stream_capturing()):  # a graph's pool must not outlive it
            key = (id(scale), dtype)
            if key not in self._groups:
                weakref.finalize(scale, self._groups.pop, key, None)
            self._groups[key] = (weakref.ref(scale), versions, zero, s_t, z_t)
        return s_t, z_t

    def run(self, spec, x, params, bias, config: Optional[str] = None):
        from ..kernels.int4_layout import MMA16, mma16_of

        w, scale = params[0], params[1]
        zero = params[2] if len(params) > 2 else None
        x, out, bias = self._io(spec, x, bias)
        s_t, z_t = self.group_params(scale, zero, x.dtype)
        w = w if spec.weight_layout == MMA16 else mma16_of(w)
        return self.module().gemm(x, w, s_t, z_t, spec.group_size, bias, out,
                                  self.config_index(x.shape[0], spec.n, spec.k, config, spec.group_size))


class _CutlassWeightOnly8(_CutlassWeightOnly):
    """int8 / fp8 weight-only through the mixed-input GEMM (``W8A16Gemm`` in qlp_gemm.cuh)."""

    def run(self, spec, x, params, bias, config: Optional[str] = None):
        w, scale = params[0], params[1]
        x, out, bias = self._io(spec, x, bias)
        return self.module().gemm(x, w.contiguous(), scale.float().reshape(-1).contiguous(), bias, out,
                                  self.config_index(x.shape[0], spec.n, spec.k, config))


@register_kernel
class CutlassInt8WeightOnly(_CutlassWeightOnly8):
    name = "cutlass_int8_weight_only"
    schemes = ("int8_weight_only",)
    family = "int8_wo"


@register_kernel
class CutlassFp8WeightOnly(_CutlassWeightOnly8):
    name = "cutlass_fp8_weight_only"
    schemes = ("fp8_weight_only",)
    family = "fp8_wo"
