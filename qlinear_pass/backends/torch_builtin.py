"""Backend ``torch``: PyTorch's own quantized matmuls, inlined as ATen ops.

Where Inductor can fuse around the library call, these kernels write ATen
nodes into the graph (``emit``) instead of hiding behind the custom op.

* ``torch_scaled_mm``: ``torch._scaled_mm`` for ``fp8_tensor`` / ``fp8_rowwise``
  (the activation quantization stays in the graph; the call is opaque)
* ``torch_scaled_mm_block``: ``torch._scaled_mm`` with (1x128, 128x128) block scales for
  ``fp8_block`` (cuBLASLt's block-scaled GEMM: a Hopper GPU and cuBLASLt 12.9+)
* ``torch_int_mm``: ``torch._int_mm`` + epilogue for ``int8_rowwise``
* ``torch_int8pack``: ``torch._weight_int8pack_mm`` for ``int8_weight_only``
  (behind the custom op: Inductor's lowering of it wants realized inputs)
* ``torch_int4pack``: the int4pack (tinygemm) ops for ``w4a16``, with weights
  repacked once and cached, so the weights must be module parameters/buffers
"""
from __future__ import annotations

import dataclasses
import functools
import weakref

import torch

from .. import schemes as S
from ..kernel import Kernel
from ..kernels.ops import mn_major_scales
from ..registry import register_kernel
from ..spec import OK, DeviceInfo, LayerSpec

aten = torch.ops.aten
prims = torch.ops.prims


def _has_kernel(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, key))
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def cpu_rowwise_scaled_mm() -> bool:
    """Does this torch's CPU ``_scaled_mm`` take rowwise scales? (2.13 does, 2.11 does not.)"""
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _device_key(device: DeviceInfo) -> str:
    return {"cuda": "CUDA", "cpu": "CPU"}.get(device.type, device.type.upper())


def _finish(emit, y, m, bias):
    """y (float32 or out dtype) + bias, cast to the layer's output dtype."""
    if bias is not None:
        if y.meta["val"].dtype != torch.float32:
            y = emit(prims.convert_element_type.default, y, torch.float32)
        y = emit(aten.add.Tensor, y, emit(prims.convert_element_type.default, bias, torch.float32))
    if y.meta["val"].dtype != m.spec.out_dtype:
        y = emit(prims.convert_element_type.default, y, m.spec.out_dtype)
    return y


@register_kernel
class TorchScaledMM(Kernel):
    """``torch._scaled_mm``: the matmul runs behind the custom op, the quantization stays in the graph.

    A dynamic activation chain is kept as ATen ops (Inductor fuses it into one
    kernel) and only the matmul is replaced: the op receives the quantized
    activation and its scale.  ``_scaled_mm`` checks the strides of its
    ``[M, 1]`` / ``[1, N]`` scales, which Inductor treats as free for size-1
    dims, so the call itself stays outside Inductor's layouts.
    """

    name = "torch_scaled_mm"
    backend = "torch"
    schemes = ("fp8_tensor", "fp8_rowwise")
    opaque = False

    def is_supported(self, device: DeviceInfo):
        if device.type == "cuda" and (device.sm or 0) < 89:
            return False, f"torch._scaled_mm needs sm89+ (FP8 tensor cores), this is {device}"
        if not _has_kernel("aten::_scaled_mm", _device_key(device)):
            return False, f"torch {torch.__version__} has no _scaled_mm for {device.type}"
        return OK

    def can_implement(self, spec: LayerSpec):
        if spec.n % 16 or spec.k % 16:
            return False, f"torch._scaled_mm needs N and K divisible by 16 (N={spec.n}, K={spec.k})"
        if spec.device == "cuda" and spec.scheme == "fp8_rowwise" and spec.out_dtype != torch.bfloat16:
            return False, f"torch._scaled_mm rowwise scaling on CUDA outputs bfloat16 only, this layer wants {spec.out_dtype}"
        if spec.device == "cpu" and spec.scheme == "fp8_rowwise" and not cpu_rowwise_scaled_mm():
            return False, f"torch {torch.__version__}'s CPU _scaled_mm takes per-tensor scales only"
        return OK

    def emit(self, emit, m):
        from ..emit import quantized_inputs

        q, sa, params, bias = quantized_inputs(emit, m)
        spec = dataclasses.replace(m.spec, act_input="static", act_dtype=torch.float8_e4m3fn)
        return emit(torch.ops.qlinear_pass.linear.default, q, [*params, sa], bias, self.name, spec.to_json())

    def run(self, spec, x, params, bias):
        if spec.act_input == "static":
            w, sw, sa = params
            xq = x
        else:
            w, sw = params
            xq, sa = S.quantize_activation(spec.scheme, x)
        if spec.scheme == "fp8_rowwise":
            sa = sa.float().reshape(-1).view(-1, 1)
            sb = sw.float().reshape(-1).view(1, -1)
        else:
            sa, sb = sa.float().reshape(()), sw.float().reshape(())
        fused_bias = bias is not None and bias.dtype == spec.out_dtype and spec.out_dtype != torch.float32
        y = torch._scaled_mm(xq, w.t(), sa, sb, bias=bias if fused_bias else None, out_dtype=spec.out_dtype)
        if bias is not None and not fused_bias:
            y = (y.float() + bias.float()).to(spec.out_dtype)
        return y


def _block_scaled_mm(xq: torch.Tensor, w: torch.Tensor, sa: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """``xq [M, K] @ w [N, K].T`` in fp8 with 1x128 activation scales ``sa [M, K/128]`` and 128x128
    weight-block scales ``sw [ceil(N/128), K/128]``, written in bfloat16.  cuBLASLt reads each K block's
    scales as one 16-byte-aligned column: the activation's MN-major (``kernels.ops.mn_major_scales``,
    M padded to a multiple of 4, and the rows with it), the weight's as the transposed view of its
    row-major ``sw`` (copies are made only where the layouts differ)."""
    m = xq.shape[0]
    cols = mn_major_scales(sa.reshape(m, -1))  # [K/128, M4], zero past M
    m4 = cols.shape[1]
    if m4 != m:
        xq = torch.cat([xq, xq.new_zeros(m4 - m, xq.shape[1])])
    sw = sw.float()
    if not sw.is_contiguous():
        sw = sw.contiguous()
    y = torch._scaled_mm(xq.contiguous(), w.t(), cols.t(), sw.t(), out_dtype=torch.bfloat16)
    return y[:m] if m4 != m else y


@functools.lru_cache(maxsize=None)
def block_scaled_mm_error(device: torch.device) -> str:
    """"" if this torch's ``_scaled_mm`` runs (1x128, 128x128) block scales on ``device``,
    else its error (cuBLASLt's block-scaled GEMM needs a Hopper GPU and cuBLASLt 12.9+); tried once, on
    real tensors even where the pass runs under a compile's fake tensors."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        with unset_fake_temporarily():
            return _try_block_scaled_mm(device)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _try_block_scaled_mm(dev: torch.device) -> str:
    xq = torch.ones(16, 512, device=dev).to(torch.float8_e4m3fn)
    w = torch.ones(256, 512, device=dev).to(torch.float8_e4m3fn)
    y = _block_scaled_mm(xq, w, torch.ones(16, 4, device=dev), torch.ones(2, 4, device=dev))
    return "" if bool((y.float() == 512).all()) else "torch._scaled_mm with block scales gave a wrong result"


@register_kernel
class TorchScaledMMBlock(Kernel):
    """``torch._scaled_mm`` with (1x128, 128x128) block scales: ``fp8_block`` on cuBLASLt's
    block-scaled GEMM.  As ``torch_scaled_mm``, the activation's quantization stays in the graph
    (Inductor fuses it), which writes its scales in the column layout cuBLASLt reads where M is
    fixed (as for ``cutlass_fp8_block``; else ``run`` copies them, a launch of its own); ``run``
    pads the rows to a multiple of 4."""

    name = "torch_scaled_mm_block"
    backend = "torch"
    schemes = ("fp8_block",)
    opaque = False

    def is_supported(self, device: DeviceInfo):
        if device.type != "cuda":
            return False, f"torch._scaled_mm takes (1x128, 128x128) block scales on CUDA GPUs only, not {device.type}"
        if device.sm != 90:
            return False, f"torch._scaled_mm's block-scaled GEMM (cuBLASLt) runs on Hopper (sm90), this is {device}"
        if not _has_kernel("aten::_scaled_mm", "CUDA"):
            return False, f"torch {torch.__version__} has no _scaled_mm for CUDA"
        if torch.cuda.is_available():
            why = block_scaled_mm_error(torch.device("cuda", torch.cuda.current_device()))
            if why:
                return False, f"torch {torch.__version__}'s _scaled_mm refused block scales here: {why}"
        return OK

    def can_implement(self, spec: LayerSpec):
        if spec.n % 16:
            return False, f"torch._scaled_mm needs N divisible by 16 (N={spec.n})"
        if spec.k % (4 * S.BLOCK):
            # cuBLASLt reads the weight's K/128 scales a block row in 16-byte columns: with K = 256,
            # 384 or 640 and more than one 128-row block its results were silently wrong on an H200
            # (benchmarks/results/h200/prefill/torch_block_scaled_mm/discover.json)
            return False, f"torch._scaled_mm's block scales need K divisible by 512 (whole 16-byte scale columns; K={spec.k})"
        if spec.out_dtype != torch.bfloat16:
            return False, f"torch._scaled_mm with block scales writes bfloat16 here, this layer wants {spec.out_dtype}"
        return OK

    def emit(self, emit, m):
        from ..emit import mn_major_scale_view, quantized_inputs, val

        q, sa, params, bias = quantized_inputs(emit, m)
        spec = dataclasses.replace(m.spec, act_input="static", act_dtype=torch.float8_e4m3fn)
        rows = val(q).shape[0]
        if isinstance(rows, int):
            sa = mn_major_scale_view(emit, sa, rows, spec.k // S.BLOCK)
        return emit(torch.ops.qlinear_pass.linear.default, q, [*params, sa], bias, self.name, spec.to_json())

    def run(self, spec, x, params, bias):
        if spec.act_input == "static":
            w, sw, sa = params
            xq = x.reshape(-1, spec.k)
        else:
            w, sw = params
            xq, sa = S.quantize_activation(spec.scheme, x.reshape(-1, spec.k))
        y = _block_scaled_mm(xq, w, sa, sw)
        if bias is not None:
            y = (y.float() + bias.float()).to(spec.out_dtype)
        return y.reshape(*x.shape[:-1], spec.n)


@register_kernel
class TorchIntMM(Kernel):
    name = "torch_int_mm"
    backend = "torch"
    schemes = ("int8_rowwise",)
    opaque = False

    def is_supported(self, device: DeviceInfo):
        if not _has_kernel("aten::_int_mm", _device_key(device)):
            return False, f"torch {torch.__version__} has no _int_mm for {device.type}"
        return OK

    def can_implement(self, spec: LayerSpec):
        if spec.device == "cuda":
            if spec.m is None:
                return False, "torch._int_mm needs M > 16 on CUDA, and this layer's M is dynamic (it may be 1..16 at run time)"
            if spec.m <= 16:
                return False, f"torch._int_mm needs M > 16 on CUDA, this layer has M={spec.m}"
            if spec.n % 8 or spec.k % 8:
                return False, f"torch._int_mm needs N and K divisible by 8 on CUDA (N={spec.n}, K={spec.k})"
        return OK

    def emit(self, emit, m):
        from ..emit import quantized_inputs

        q, sa, params, bias = quantized_inputs(emit, m)
        w, sb = params[0], params[1]
        acc = emit(aten._int_mm.default, q, emit(aten.permute.default, w, [1, 0]))
        y = emit(prims.convert_element_type.default, acc, torch.float32)
        y = emit(aten.mul.Tensor, y, emit(aten.reshape.default, emit(prims.convert_element_type.default, sa, torch.float32), [-1, 1]))
        y = emit(aten.mul.Tensor, y, emit(aten.reshape.default, emit(prims.convert_element_type.default, sb, torch.float32), [1, m.spec.n]))
        return _finish(emit, y, m, bias)


@register_kernel
class TorchInt8Pack(Kernel):
    name = "torch_int8pack"
    backend = "torch"
    schemes = ("int8_weight_only",)

    def is_supported(self, device: DeviceInfo):
        if not _has_kernel("aten::_weight_int8pack_mm", _device_key(device)):
            return False, f"torch {torch.__version__} has no _weight_int8pack_mm for {device.type}"
        return OK

    def can_implement(self, spec: LayerSpec):
        if spec.act_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return False, f"_weight_int8pack_mm takes bf16/fp16/fp32 activations, not {spec.act_dtype}"
        if spec.device == "cuda" and spec.act_dtype == torch.float32:
            return False, "_weight_int8pack_mm on CUDA takes bf16/fp16 activations"
        if spec.device == "cpu" and spec.act_dtype == torch.bfloat16 and spec.k % 16:
            # its vectorised bf16 path reads K 16 at a time with no tail: other K read past the
            # row (garbage or a crash), measured on torch 2.13 with AVX-512
            return False, f"_weight_int8pack_mm on CPU with bfloat16 activations needs K divisible by 16 (K={spec.k})"
        return OK

    def run(self, spec, x, params, bias):
        # opaque: Inductor's lowering of this op wants realized inputs
        y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), params[0], params[1].to(x.dtype))
        if bias is not None:
            y = (y.float() + bias.float()).to(spec.out_dtype)
        return y.to(spec.out_dtype)


@register_kernel
class TorchInt4Pack(Kernel):
    """The int4pack (tinygemm) ops: ``_weight_int4pack_mm`` (CUDA) and its CPU twin.

    Their weight layout is their own, so weights are repacked once, on first
    use, and the packed copy is cached for as long as the weight tensor lives
    (and is not modified in place).  That is only sound for weights that are
    the same tensors on every call: module parameters and buffers.
    """

    name = "torch_int4pack"
    backend = "torch"
    schemes = ("w4a16",)

    def __init__(self) -> None:
        # id(weight) -> (weakref to weight, validity key, packed, scales_and_zeros); tensors
        # compare elementwise, so they cannot be WeakKeyDictionary keys
        self._packed: dict[int, tuple] = {}
        self.repacks = 0

    def is_supported(self, device: DeviceInfo):
        op = "aten::_weight_int4pack_mm_for_cpu" if device.type == "cpu" else "aten::_weight_int4pack_mm"
        if not _has_kernel(op, _device_key(device)):
            return False, f"torch {torch.__version__} has no {op.split('::')[1]} for {device.type}"
        return OK

    def can_implement(self, spec: LayerSpec):
        if not spec.weights_constant:
            return False, (
                "the int4pack ops need the weights repacked into their own layout once, so the weights must be "
                "module parameters/buffers (graph constants), not tensors computed or passed in per call"
            )
        if spec.device == "cuda":
            if spec.act_dtype != torch.bfloat16:
                return False, f"tinygemm (_weight_int4pack_mm) on CUDA takes bfloat16 activations, not {spec.act_dtype}"
            if spec.k % 256:
                return False, f"tinygemm needs K divisible by 256 (K={spec.k})"
            if spec.n % 8:
                return False, f"tinygemm needs N divisible by 8 (N={spec.n})"
        else:
            if spec.act_dtype not in (torch.bfloat16, torch.float16, torch.float32):
                return False, f"_weight_int4pack_mm_for_cpu takes float activations, not {spec.act_dtype}"
            if spec.n % 16:
                return False, f"_convert_weight_to_int4pack_for_cpu needs N divisible by 16 (N={spec.n})"
        return OK

    def prepack(self, weight, scale, zero, spec: LayerSpec):
        q = S.unpack_int4(weight).to(torch.int32)
        sc = scale.float()
        z = zero.float() if zero is not None else torch.full_like(sc, 8.0)
        # ours: (q - z) * s  ==  tinygemm's (q - 8) * s + (8 - z) * s
        dt = spec.act_dtype if weight.device.type == "cpu" else torch.bfloat16
        sz = torch.stack([sc, (8.0 - z) * sc], dim=-1).transpose(0, 1).contiguous().to(dt)
        if weight.device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack(pack_for_tinygemm(q), 8)
        self.repacks += 1
        return packed, sz

    def _get_packed(self, spec, weight, scale, zero):
        key = (weight._version, scale.data_ptr(), scale._version, None if zero is None else (zero.data_ptr(), zero._version), spec.act_dtype)
        hit = self._packed.get(id(weight))
        if hit is None or hit[0]() is not weight or hit[1] != key:
            wid = id(weight)
            ref = weakref.ref(weight, lambda _r, wid=wid, packed=self._packed: packed.pop(wid, None))
            hit = (ref, key, *self.prepack(weight, scale, zero, spec))
            self._packed[wid] = hit
        return hit[2], hit[3]

    def run(self, spec, x, params, bias):
        weight, scale, zero = params
        packed, sz = self._get_packed(spec, weight, scale, zero)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, spec.group_size, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x.contiguous(), packed, spec.group_size, sz)
        if bias is not None:
            y = y.float() + bias.float()
        return y.to(spec.out_dtype)


def pack_for_tinygemm(q: torch.Tensor) -> torch.Tensor:
    """[N, K] int32 0..15 -> [N, K/2] uint8, the even k in the HIGH nibble (the CUDA op's input)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]
