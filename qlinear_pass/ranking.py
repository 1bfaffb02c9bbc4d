"""``auto``'s kernel order: one table, per device class, scheme and M bucket.

Every row of :data:`TABLE` names, for one device class and one scheme, the kernels
``auto`` tries (in order) for the M buckets it covers, and carries the measurements
that put them in that order (results file, numbers, card).  The selection loop
(``select.py``) asks :func:`order` for its candidates and takes the first kernel whose
``is_supported`` and ``can_implement`` both say yes; so a kernel listed first that
cannot run a layer (a library not installed, a shape it refuses) hands the layer to the
next one.

How a row is read: ``Row("sm90", "fp8_block", (16,), (a, b, c), ...)`` says that on a
Hopper GPU a ``fp8_block`` layer whose M is 2..16 tries ``a``, then ``b``, then ``c``.
M buckets are :data:`M_BUCKETS`: M <= 1, <= 16, <= 128, <= 1024 and larger (``None``).
A row may name activation dtypes (``act_dtypes``) where the measurements split by them (the
CPU's int8pack / int4pack ops win with bfloat16 and lose with float32); a row without them
serves every other dtype.  Likewise weight layouts (``weight_layouts``, ``LayerSpec.weight_layout``):
a w4a16 layer holding the MMA-fragment layout follows its own row where the kernels that read
that layout rank otherwise than for the public one.

How the full order is made, for one (device class, scheme, M bucket):

1. the kernels the row lists, in its order;
2. kernels no row lists (a plug-in package's kernels registered through
   ``register_kernel``), by their ``priority`` class attribute (lower first; the
   default is 50), then by name: a plug-in's hint of where it belongs until a row,
   backed by measurements, lists it;
3. ``emulation``, auto's last resort, unless the row lists it earlier (it runs every
   scheme anywhere, so nothing after it is ever chosen by ``auto``);
4. the kernels of :data:`BEHIND_EMULATION` for the device class: they still run when
   their backend is named, never under ``auto``.

Extending it: a new kernel that should run under ``auto`` gets a place in the rows of
the schemes and device classes it serves, with the benchmark that puts it there; a
device class without measurements keeps no rows and follows step 2.  Explicit backends
use the same order, filtered to their own kernels.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch

from .kernel import Kernel
from .spec import DeviceInfo

#: ``auto`` ranks kernels per M bucket: M <= 1, <= 16, <= 128, <= 1024, larger (None)
M_BUCKETS: tuple = (1, 16, 128, 1024, None)
ALL_M: tuple = M_BUCKETS
EMULATION = "emulation"

#: what the table is keyed by: Hopper, other CUDA GPUs, the CPU, any other device type
DEVICE_CLASSES = ("sm90", "cuda", "cpu", "other")


def m_bucket(m: int) -> Optional[int]:
    """The M bucket of a layer with ``m`` rows."""
    return next(b for b in M_BUCKETS if b is None or m <= b)


def device_class(device: DeviceInfo) -> str:
    """``sm90`` (Hopper), ``cuda`` (any other CUDA GPU, or an unknown one), ``cpu``, ``other``."""
    if device.type == "cuda":
        return "sm90" if device.sm == 90 else "cuda"
    return "cpu" if device.type == "cpu" else "other"


@dataclasses.dataclass(frozen=True)
class Row:
    """On ``device``, a ``scheme`` layer whose M falls in one of ``m`` tries ``kernels`` in order.

    With ``act_dtypes``, only layers whose activation has one of those dtypes; a row
    without them serves the other dtypes.  ``weight_layouts`` alike, for the layouts a layer
    holds its weight in.
    """

    device: str
    scheme: str
    m: tuple
    kernels: tuple
    evidence: str
    act_dtypes: Optional[tuple] = None
    weight_layouts: Optional[tuple] = None


# --- the table -----------------------------------------------------------------------------
# Results files are under benchmarks/results/; times in microseconds; "dyn" = the kernel
# quantizes the activation itself, "static" = it is given the quantized activation.

_H100 = "H100 80GB HBM3, torch 2.11"
_H200 = "H200, torch 2.11"
_FI_TENSOR = ("flashinfer_cublas_fp8", "flashinfer_cudnn_fp8", "flashinfer_cutlass_fp8")
_FI_BLOCK_SM100 = ("flashinfer_cutlass_fp8_block", "flashinfer_trtllm_fp8_block")

_WO8 = (f"h200/prefill/cutlass_wo8/bench.log ({_H200}), M=2048, us, our CUTLASS kernel (128x256x64 tiles) vs "
        "triton_weight_only (one dequantising pass + cuBLAS) vs bf16 F.linear, one run")
_W8A16 = (f"h200/decode/cuda_w8a16 ({_H200}), us, one run: cuda_w8a16 (its row tiles) vs triton_weight_only (the decode "
          "kernel at M=1, the GEMM above) vs bf16 F.linear")
_WO8_128 = (f"h200/prefill/cutlass_wo8_m128_4096 ({_H200}), us, one run: our CUTLASS kernel (fastest tiles) vs the "
            "Triton GEMM vs bf16 F.linear")
_BLOCK = (f"h100/decode/cuda_w8a8_fp8_block ({_H100}), us, one run, the kernels quantizing the activation "
          "themselves: cuda_w8a8 (its row tiles) vs triton_w8a8 vs bf16 F.linear")
_W8A8 = (f"h100/decode/cuda_w8a8 ({_H100}), us, the activation given quantized, cuda_w8a8 vs our Triton decode kernel "
         "(M=1) / Triton GEMM (M=8, 16) vs bf16 F.linear vs torch._scaled_mm, one run")

SM90: tuple = (
    Row("sm90", "fp8_rowwise", (1,), ("cuda_w8a8", "triton_w8a8", "cutlass_fp8", "torch_scaled_mm"),
        f"{_W8A8}: K=4096 N=14336 M=1 22.7 / 26.4 / 42.0 / 26.7, M=8 23.1 / 31.2 / 43.1 / 27.6, M=16 27.0 / "
        "32.0 / 42.3 / 26.4; K=14336 N=4096 M=1 23.5 / 31.8 / 44.8 / 48.6, M=16 24.7 / 34.4 / 45.4 / 45.1; "
        "gate/up (N=28672) M=8 42.8 / 53.5 / 86.2 / 47.3. cutlass_fp8 (not installed there) measured "
        "43.9 us at K=4096 N=28672 M=16 and 24.3 at K=14336 M=16 in another H100 run (h100/cutlass): about "
        "even, and cuda_w8a8 runs q/k/v and gate/up as one launch, so it leads."),
    Row("sm90", "fp8_rowwise", (16,), ("cuda_w8a8", "cutlass_fp8", "triton_w8a8", "torch_scaled_mm"),
        "cuda_w8a8: see the M=1 row (M=16 there). Without it, cutlass_fp8 before our Triton GEMM as before: "
        f"h100/cutlass/summary.md ({_H100}) K=4096 N=28672 M=16 cutlass_fp8 43.9 us, our Triton GEMM 55.5 in "
        "h100/decode/cuda_w8a8."),
    Row("sm90", "fp8_rowwise", (128, 1024, None), ("cutlass_fp8", "triton_w8a8", "torch_scaled_mm"),
        f"h100/cutlass/summary.md ({_H100}), K=4096 N=28672, cutlass_fp8 vs torch._scaled_mm (static): "
        "M=128 48.1 vs 48.6, M=1024 170.9 vs 202.1, M=4096 748.3 (dyn) vs 767.3; "
        "h100/cutlass/k14336 (K=14336 N=4096): M=128 28.7 vs 36.6; "
        "our Triton GEMM 1.2-1.4x behind cutlass_fp8 at M >= 1024 on K=4096."),
    Row("sm90", "fp8_tensor", (1,), ("cuda_w8a8", "triton_w8a8", "cutlass_fp8", "torch_scaled_mm") + _FI_TENSOR,
        "cuda_w8a8 is fp8_rowwise's kernel with one activation and one weight scale (its fp8_rowwise "
        "numbers: see that row); fp8_tensor not timed apart."),
    Row("sm90", "fp8_tensor", (16,), ("cuda_w8a8", "cutlass_fp8", "triton_w8a8", "torch_scaled_mm") + _FI_TENSOR,
        "as fp8_rowwise at M <= 16 (see those rows)."),
    Row("sm90", "fp8_tensor", (128, 1024, None), ("cutlass_fp8", "triton_w8a8", "torch_scaled_mm") + _FI_TENSOR,
        "cutlass_fp8 is fp8_rowwise's kernel with a scalar scale (its fp8_rowwise numbers: see that row). "
        f"h100/cutlass/summary.md ({_H100}), fp8_tensor K=4096 N=28672: flashinfer_cublas_fp8 167.6 at "
        "M=1024 and 680.7 at M=4096 vs torch._scaled_mm 179.0 / 772.9; not re-ranked here."),
    Row("sm90", "fp8_block", (1,), ("cuda_w8a8", "triton_w8a8", "cutlass_fp8_block", "flashinfer_deepgemm_fp8_block",
                                    "torch_scaled_mm_block") + _FI_BLOCK_SM100,
        f"{_BLOCK} (Triton: its decode kernel): M=1 K=4096 N=14336 22.7 / 22.1 / 41.6, K=14336 N=4096 23.5 / 24.5 / "
        "44.5, N=6144 11.6 / 12.4 / 20.9, N=1024 5.9 / 5.7 / 8.5, gate/up 41.4 / 41.2 / 81.6: even, and the CUDA "
        "kernel is built ahead (cached) where Triton's is compiled in the first call of each compiled graph: "
        f"end to end (h200/e2e/fp8_block_cuda_m1, {_H200}, one call) with it at M=1: batch-1 decode 1.65x bf16, "
        "compile 13.1 s against bf16's 12.7; with Triton at M=1 (h200/e2e/all_variants, another call) 1.57x, "
        "21.7 s against 16.7. "
        f"h100/summary.md ({_H100}): flashinfer_deepgemm with a dynamic activation 0.27-0.71x our Triton "
        "kernel at M=1 (it needs the activation quantized apart); cutlass_fp8_block behind Triton at "
        "M <= 16 in 3 of 4 shapes (0.78-1.05x, h100/cutlass/fp8_block)."),
    Row("sm90", "fp8_block", (16,), ("cuda_w8a8", "flashinfer_deepgemm_fp8_block", "triton_w8a8", "cutlass_fp8_block",
                                     "torch_scaled_mm_block") + _FI_BLOCK_SM100,
        f"{_BLOCK} (Triton: its decode kernel / its GEMM): M=8 K=4096 N=14336 23.2 / 33.3 / 48.2 / 41.7, K=14336 "
        "N=4096 24.1 / 47.1 / 92.7 / 44.9, N=6144 11.7 / 25.2 / 28.6 / 20.9, N=1024 5.8 / 10.7 / 20.7 / 8.6, "
        "gate/up 42.5 / 57.5 / 70.5 / 82.1; M=16 31.8 / 33.6 / 48.8 / 42.3, 26.5 / 48.6 / 93.4 / 45.5. With the "
        "quantization rounding as the reference (h100/decode/cuda_w8a8_fp8_block/exact_rounding, a later call): "
        "M=8 23.4 / 33.5, 24.3 / 47.0, 11.9 / 25.1; M=16 34.1 / 33.9, 28.2 / 48.2, 17.7 / 25.7 (even at 16 on "
        "K=4096 N=14336). "
        "End to end (h100/e2e/fp8_block_decode, same card): batch-8 decode 1.59x bf16 with it, 1.13x with "
        f"Triton. h100/flashinfer ({_H100}): flashinfer_deepgemm 0.98-1.16x our Triton block-scaled kernel "
        "at M=16 (K=4096 N=28672: 44.4 us static), so after cuda_w8a8; h100/cutlass/fp8_block: "
        "cutlass_fp8_block 0.78-1.05x Triton at M <= 16. Above 8 tokens cuda_w8a8 takes the graph's "
        f"quantized activation (h200/decode/fp8_block_q, {_H200}, one call, M=16, us, given it / quantizing "
        "in the kernel / Triton's decode kernel / bf16): K=4096 N=14336 23.7 / 34.3 / 28.6 / 32.4, K=14336 "
        "N=4096 20.7 / 27.4 / 47.7 / 33.4, N=6144 12.6 / 17.6 / 24.4 / 15.7."),
    Row("sm90", "fp8_block", (128, 1024, None), ("flashinfer_deepgemm_fp8_block", "cutlass_fp8_block", "torch_scaled_mm_block",
                                                "triton_w8a8") + _FI_BLOCK_SM100,
        f"h100/cutlass/fp8_block/summary.md ({_H100}): cutlass_fp8_block 1.6-1.75x our Triton GEMM at "
        "M >= 1024 and 1.01-1.35x at M=128; against flashinfer_deepgemm 0.88-1.16x at M >= 1024 (three "
        "runs) and 0.75-0.95x at M <= 128 (K=4096 N=28672 M=128: deepgemm 49.4 us), so DeepGEMM first "
        f"where FlashInfer is installed. h200/prefill/torch_block_scaled_mm/bench_linear ({_H200}, one call, "
        "bench_linear.py, the graph's quantized activation given; us, torch._scaled_mm's block scales "
        "(cuBLASLt) / our Triton GEMM / bf16 F.linear at M = 128, 1024, 4096): N=6144 16.6 / 20.8 / 16.3, "
        "45.4 / 81.8 / 68.5, 165.4 / 323.3 / 260.6; K=4096 N=4096 16.3 / 15.1 / 14.4, 29.5 / 55.0 / 44.6, "
        "112.1 / 211.7 / 174.0; gate/up 36.7 / 57.5 / 65.6, 191.3 / 375.2 / 305.8, 741.8 / 1466.1 / 1206.2; "
        "K=14336 N=4096 43.3 / 46.5 / 37.0, 92.7 / 175.8 / 148.9, 369.1 / 714.4 / 591.8: ahead of Triton "
        "in 11 of 12 cells (1.1-2.0x; 8% behind on N=4096 at M=128), with 20-34 us of host time a call "
        "against Triton's 53-142 (probe.log there), so before it. End to end without CUTLASS and "
        "FlashInfer (e2e/ there) the 2048-token prefill took 39.8 ms against bf16's 49.0 (1.23x; 59.9-63.3 "
        "ms on Triton in two calls before). Beside CUTLASS (torch_block_scaled_mm/beside_cutlass, one "
        "H200 call, us, cutlass_fp8_block / torch_scaled_mm_block): M=128 N=4096 14.7 / 16.3, N=6144 15.1 / "
        "16.7, gate/up 42.9 / 36.6, K=14336 36.7 / 43.5; at M >= 1024 cuBLASLt 1-6% faster on all 8 cells "
        "(gate/up M=4096 775.0 / 743.9) but with 1.71 launches a linear (a memset) against 1.0, and the "
        "2048-token prefill the same (36.26 / 36.03 ms, another call), so CUTLASS stays ahead at every M. "
        "Not timed beside DeepGEMM."),
    Row("sm90", "int8_rowwise", (1, 16), ("cuda_w8a8", "cutlass_int8", "triton_w8a8", "torch_int_mm"),
        f"{_W8A8}: K=4096 N=14336 M=1 22.4 / 27.6 / 41.9, M=8 22.7 / 31.3 / 42.1, M=16 24.8 / 32.1 / 42.6; "
        "K=14336 N=4096 M=16 24.2 / 36.2 / 45.4; gate/up (N=28672) M=1 41.1 / 50.1 / 81.6. "
        f"cutlass_int8 (dyn) at K=4096 N=28672 M=1: 47.8 us in another H100 run (h100/cutlass/bench_linear.json)."),
    Row("sm90", "int8_rowwise", (128, 1024, None), ("cutlass_int8", "triton_w8a8", "torch_int_mm"),
        f"h100/cutlass/summary.md ({_H100}), cutlass_int8 vs torch._int_mm + epilogue 1.9-3.8x at "
        "M >= 1024, vs our Triton kernels 1.2-1.4x there."),
    Row("sm90", "int8_weight_only", (1,), ("cuda_w8a16", "triton_weight_only", "cutlass_int8_weight_only", "torch_int8pack"),
        f"h200/e2e/w8a16_m1_cuda_vs_triton ({_H200}, one run): decode b1 295.8 tok/s with cuda, 290.7 with triton "
        "(1.63x / 1.60x bf16), b8 1967.9 / 1445.9. h200/decode/cuda_warps (cuda_w8a16 with 4 warps a CTA on many "
        "row tiles), us, M=1: K=4096 N=14336 18.0, K=14336 N=4096 18.3, N=6144 10.8, gate/up (N=28672) 32.7; "
        f"{_W8A16} (8 warps then, beside Triton): 17.3 / 18.8, 19.9 / 18.1, 10.8 / 10.7, 32.3 / 35.0. "
        f"h100/summary.md ({_H100}): torch._weight_int8pack_mm on CUDA runs at about 1 TFLOP/s (a slow path)."),
    Row("sm90", "int8_weight_only", (16,), ("cuda_w8a16", "triton_weight_only", "cutlass_int8_weight_only", "torch_int8pack"),
        f"{_W8A16}: int8, M=8 K=4096 N=14336 19.3 / 27.5 / 29.5, K=14336 N=4096 18.8 / 21.0 / 31.9, N=6144 10.8 / "
        "12.4 / 15.6, N=1024 5.7 / 7.5 / 7.9, gate/up 35.8 / 44.5 / 55.2; M=16 26.8 / 27.2, 20.4 / 21.3, 14.2 / "
        "12.5, 6.2 / 7.6, 45.3 / 44.0 (even at 16, 1.1-1.4x at 8). "
        f"h200/decode/cuda_w8a16/rows48 ({_H200}, one run): N=6144 at M=16 in 48-row tiles (the kernel's rule "
        "there) 11.1 against 14.3 in 32-row ones, ahead of Triton's 12.5 above."),
    Row("sm90", "int8_weight_only", (128,), ("cutlass_int8_weight_only", "triton_weight_only", "torch_int8pack", "cuda_w8a16"),
        f"{_WO8_128}: int8, M=128 K=4096 N=14336 29.9 / 46.0 / 32.8, K=14336 N=4096 37.9 / 79.7 / 37.0, K=4096 "
        "N=6144 24.7 / 35.9 / 16.6. cuda_w8a16 reads the weight once per 16 tokens: last. "
        f"M=17-64 (h200/prefill/cutlass_wo8_k128, {_H200}, us, cutlass with its 32-token / K-128 tiles vs bf16): "
        "K=4096 N=14336 M=32 23.1 / 30.7, M=64 24.6 / 32.8; K=14336 N=4096 30.1 / 33.3, 33.8 / 36.0; N=6144 "
        "19.3 / 16.0, 21.0 / 16.4."),
    Row("sm90", "int8_weight_only", (1024, None), ("cutlass_int8_weight_only", "triton_weight_only", "torch_int8pack"),
        f"{_WO8}: int8, K=4096 N=14336 337.4 / 345.1 / 315.6, K=14336 N=4096 306.8 / 342.7 / 331.3. End to end "
        "(h200/e2e/int8_weight_only_prefill, same call): 2048-token prefill 48.71 ms with cutlass, 53.23 with "
        "Triton (auto then), bf16 48.72. "
        f"{_WO8_128} (dequantise + cuBLAS in Triton's column): M=1024 187.1 / 195.9 / 153.0, 160.1 / 191.1 / 159.2, "
        "82.8 / 85.6 / 68.2 (N=6144); M=4096 754.1 / 739.3 / 725.0, 720.0 / 698.0 / 702.5, 307.0 / 284.4 / 299.1: "
        "dequantise + cuBLAS 2-8% ahead at M=4096, 10% behind at 2048; cutlass kept first for the bucket."),
    Row("sm90", "fp8_weight_only", (1,), ("cuda_w8a16", "triton_weight_only", "cutlass_fp8_weight_only"),
        f"h200/e2e/w8a16_m1_cuda_vs_triton ({_H200}, one run): decode b1 302.7 tok/s with cuda, 301.8 with triton "
        "(1.66x bf16 both), b8 1997.7 / 1566.1: one decode kernel for M <= 16. h200/decode/cuda_warps, us, M=1: "
        f"K=4096 N=14336 17.1, K=14336 N=4096 18.7, N=6144 10.3, gate/up 31.2; {_W8A16} (8 warps then, beside "
        "Triton): 16.0 / 18.1, 18.4 / 18.2, 10.1 / 10.3, 30.3 / 33.3."),
    Row("sm90", "fp8_weight_only", (16,), ("cuda_w8a16", "triton_weight_only", "cutlass_fp8_weight_only"),
        f"{_W8A16}: fp8, M=8 K=4096 N=14336 18.5 / 24.0 / 29.7, K=14336 N=4096 18.5 / 21.1 / 31.9, N=6144 10.4 / "
        "12.3 / 15.4, N=1024 5.6 / 7.6 / 7.9, gate/up 34.0 / 45.0 / 55.7; M=16 25.7 / 24.0, 20.2 / 21.2, 13.6 / "
        "12.4, 6.1 / 7.7, 43.0 / 44.1. "
        f"h200/decode/cuda_w8a16/rows48 ({_H200}, one run): N=6144 at M=16 in 48-row tiles (the kernel's rule "
        "there) 11.2 against 13.6 in 32-row ones, ahead of Triton's 12.4 above."),
    Row("sm90", "fp8_weight_only", (128,), ("cutlass_fp8_weight_only", "triton_weight_only", "cuda_w8a16"),
        f"{_WO8_128}: fp8, M=128 K=4096 N=14336 27.8 / 46.3 / 32.6, K=14336 N=4096 36.7 / 80.8 / 37.0, N=6144 "
        "23.6 / 34.6 / 16.3. "
        f"M=17-64 (h200/prefill/cutlass_wo8_k128, {_H200}, us, cutlass with its 32-token / K-128 tiles vs bf16): "
        "K=4096 N=14336 M=32 21.4 / 31.0, M=64 22.9 / 33.2; K=14336 N=4096 29.2 / 33.1, 30.6 / 36.1; N=6144 "
        "18.4 / 16.0, 19.5 / 16.3."),
    Row("sm90", "fp8_weight_only", (1024, None), ("cutlass_fp8_weight_only", "triton_weight_only"),
        f"{_WO8}: fp8, K=4096 N=14336 314.6 / 346.2 / 332.3, K=14336 N=4096 328.9 / 342.8 / 329.0. "
        f"{_WO8_128} (dequantise + cuBLAS in Triton's column): M=1024 181.4 / 193.8 / 151.3, 160.1 / 192.6 / 156.7, "
        "77.2 / 85.6 / 67.9; M=4096 749.5 / 705.9 / 736.0, 723.2 / 651.4 / 712.3, 298.5 / 280.8 / 301.1: "
        "dequantise + cuBLAS 6-11% ahead at M=4096, 9% behind at 2048; cutlass kept first for the bucket."),
    Row("sm90", "w4a16", (1, 16), ("cuda_w4a16", "triton_weight_only", "torch_int4pack"),
        f"h200/decode/cuda_w4a16/mma16 ({_H200}), g128, us, cuda_w4a16 vs triton_weight_only (its best decode "
        "configuration) vs bf16 F.linear: K=4096 N=14336 M=1 14.3 / 17.2 / 29.9, M=8 17.4 / 29.8 / 29.4, M=16 "
        "24.9 / 29.7 / 29.9; K=14336 N=4096 M=1 13.1 / 17.9 / 31.4, M=8 15.8 / 41.7 / 32.0, M=16 22.9 / 41.6 / "
        "32.3; with 4 warps a CTA on many row tiles (h200/decode/cuda_warps) K=4096 N=14336 M=1 13.0, gate/up "
        "(N=28672) 22.8. End to end (h200/e2e/warps_w8): decode b1 2.01x bf16, b8 1.67x; with triton in an earlier "
        "run (h200/e2e) 1.69x and 1.02x. Latest (h200/decode/cuda_w4a16/xr_swizzle, cuda_w4a16 vs bf16 F.linear): "
        "M=8 13.7 / 29.5, 13.9 / 31.8, 8.6 / 15.1 (N=6144); M=16 16.9 / 30.1, 19.6 / 32.1, 10.0 / 15.1. "
        "With empty token rows zero-filled and 48-row q/k/v tiles (h200/decode/cuda_w4a16/zero_rows, vs bf16): "
        "M=2 K=14336 N=4096 11.5 / 32.2, N=6144 7.0 / 15.1; end to end at batch 4 (h200/e2e/zero_rows_b4) "
        "1.94x bf16."),
    Row("sm90", "w4a16", (128, 1024, None), ("cutlass_w4a16", "triton_weight_only", "torch_int4pack"),
        f"h200/prefill/cutlass_w4a16_mma16 ({_H200}), g128, us, cutlass_w4a16 in the MMA-fragment layout (its "
        "fastest tile) vs triton_weight_only (the GEMM at M=128, one dequantising pass + cuBLAS above) vs bf16 "
        "F.linear: K=4096 N=14336 M=128 26.7 / 65.3 / 32.8, M=1024 160.7 / 190.9 / 155.2, M=4096 704.2 / 714.7 / "
        "724.2; K=14336 N=4096 M=128 36.3 / 97.2 / 37.1, M=1024 145.1 / 183.6 / 153.5, M=4096 660.4 / 671.4 / "
        "720.4; K=4096 N=6144 M=128 23.3 / 40.0 / 16.8, M=1024 74.7 / 83.2 / 68.9, M=4096 266.0 / 273.2 / 297.3: "
        "cutlass_w4a16 first in every cell. Before that layout (h200/prefill/cutlass_w4a16_tiles and _kv) "
        "dequantise + cuBLAS won at M=4096 by 4-9%. End to end the Triton path's Python launches left the GPU "
        "idle (h200/e2e/w4a16_prefill: 97.8 ms wall for 48.1 ms of device time, against 55.0 / 49.2 ms with "
        "cutlass_w4a16, bf16 50.8 / 47.6); with the MMA-fragment layout (h200/e2e/mma16_all) 48.7 ms against "
        "bf16's 49.8. tinygemm (torch_int4pack) kept as the fallback for shapes our kernels refuse. "
        f"M=17-64 (h200/prefill/cutlass_w4a16_k128, {_H200}, g128, us, cutlass_w4a16 with its 32-token / K-128 "
        "tiles vs cuda_w4a16 vs bf16): K=4096 N=14336 M=32 20.2 / 27.8 / 30.6, M=64 22.3 / 52.8 / 32.9; K=14336 "
        "N=4096 M=32 27.6 / 37.1 / 32.8, M=64 30.7 / 64.9 / 36.4; N=6144 M=32 17.6 / 14.9 / 16.1, M=64 18.8 / "
        "24.6 / 16.1: cutlass first (cuda_w4a16 ahead only at M=32 on N=6144)."),
    # a layer holding the MMA-fragment layout: triton_weight_only reads it only through one dequantising
    # pass (then cuBLAS), which adds a fixed 24-58 us a call; where CUTLASS cannot run, the decode kernel
    # serves M <= 128 better (above, the public row: that pass before cuda_w4a16)
    Row("sm90", "w4a16", (128,), ("cutlass_w4a16", "cuda_w4a16", "triton_weight_only", "torch_int4pack"),
        f"h200/prefill/mma16_no_cutlass ({_H200}, CUTLASS not installed), g128, us, cuda_w4a16 vs "
        "triton_weight_only's dequantising pass from the MMA-fragment layout + cuBLAS vs bf16 F.linear: K=4096 "
        "N=14336 M=32 28.9 / 88.1 / 30.6, M=64 54.3 / 89.8 / 33.2, M=128 103.7 / 89.5 / 33.2; K=14336 N=4096 M=32 "
        "34.1 / 90.0 / 33.1, M=64 61.8 / 93.2 / 36.0, M=128 116.7 / 95.0 / 37.3; N=6144 M=32 14.3 / 40.3 / 16.1, "
        "M=64 25.1 / 40.6 / 16.5, M=128 46.8 / 42.0 / 16.4: cuda_w4a16 up to 3x faster at M=32-64, 10-20% "
        "slower at 128. M=512 / 2048 the pass ran 138.8 / 372.4, 133.6 / 350.0, 59.3 / 156.3 against bf16's "
        "88.2 / 319.5, 82.3 / 317.3, 35.9 / 134.5, where cuda_w4a16 (16 tokens a CTA) took a 2048-token "
        "prefill to 0.22x bf16 end to end (h200/e2e/b16_no_cutlass).", weight_layouts=("mma16",)),
)

#: other CUDA GPUs (Ampere, Ada, Blackwell): nothing measured yet; our kernels first (sm80+)
_UNMEASURED = "not measured on this device class: our Triton kernels first, then torch's op, then FlashInfer"
CUDA: tuple = (
    Row("cuda", "fp8_tensor", ALL_M, ("triton_w8a8", "torch_scaled_mm") + _FI_TENSOR, _UNMEASURED),
    Row("cuda", "fp8_rowwise", ALL_M, ("triton_w8a8", "torch_scaled_mm"), _UNMEASURED),
    Row("cuda", "fp8_block", ALL_M, ("triton_w8a8", "torch_scaled_mm_block") + _FI_BLOCK_SM100, _UNMEASURED),
    Row("cuda", "int8_rowwise", ALL_M, ("triton_w8a8", "torch_int_mm"), _UNMEASURED),
    Row("cuda", "int8_weight_only", ALL_M, ("triton_weight_only", "torch_int8pack"), _UNMEASURED),
    Row("cuda", "fp8_weight_only", ALL_M, ("triton_weight_only",), _UNMEASURED),
    Row("cuda", "w4a16", ALL_M, ("triton_weight_only", "torch_int4pack"), _UNMEASURED),
    Row("cuda", "w4a16", (1, 16, 128), ("cuda_w4a16", "triton_weight_only", "torch_int4pack"),
        "not measured on this device class; as the sm90 rows for this layout: triton_weight_only reads it only "
        "through a dequantising pass, whose fixed cost a decode step cannot pay", weight_layouts=("mma16",)),
)

_CPU = ("cpu/bench_cpu.json (benchmarks/bench_cpu.py; AMD EPYC, 2 threads, shared machine, torch 2.13); "
        "geometric mean over K x N = 1024x1024 and 4096x1024, us; M > 128 follows M = 128")
_BF16 = (torch.bfloat16,)
CPU: tuple = (
    Row("cpu", "fp8_tensor", ALL_M, ("emulation", "torch_scaled_mm"),
        f"{_CPU}: emulation vs torch._scaled_mm (quantizing the activation), bf16: M=1 3401 vs 3990, "
        "M=16 4023 vs 4910, M=128 8315 vs 9223; fp32: 16543 vs 17803, 31448 vs 32479, 54503 vs 153407."),
    Row("cpu", "fp8_rowwise", ALL_M, ("emulation", "torch_scaled_mm"),
        f"{_CPU}: emulation vs torch._scaled_mm, bf16: M=1 4749 vs 5471, M=16 5466 vs 6284, "
        "M=128 8214 vs 9017; fp32: 18827 vs 28755, 37471 vs 45470, 16356 vs 19458."),
    Row("cpu", "fp8_block", ALL_M, ("emulation",), f"{_CPU}: the only CPU kernel (bf16 M=1 4923, M=128 8186)."),
    Row("cpu", "int8_rowwise", ALL_M, ("torch_int_mm", "emulation"),
        f"{_CPU}: torch._int_mm + epilogue vs emulation, bf16: M=1 68 vs 439, M=16 209 vs 950, "
        "M=128 604 vs 3289; fp32: 898 vs 3865, 4081 vs 30011, 71843 vs 93070."),
    Row("cpu", "int8_weight_only", ALL_M, ("torch_int8pack", "emulation"),
        f"{_CPU}: _weight_int8pack_mm vs emulation, bf16: M=1 71 vs 1101, M=16 267 vs 1889, M=128 1754 vs 4556.",
        act_dtypes=_BF16),
    Row("cpu", "int8_weight_only", (1,), ("torch_int8pack", "emulation"),
        f"{_CPU}: fp32 M=1 _weight_int8pack_mm 9954 vs emulation 19380."),
    Row("cpu", "int8_weight_only", (16, 128, 1024, None), ("emulation", "torch_int8pack"),
        f"{_CPU}: fp32 emulation vs _weight_int8pack_mm, M=16 6075 vs 27158, M=128 19772 vs 156375 "
        "(the op's float32 path; fp16 not measured, taken as fp32)."),
    Row("cpu", "fp8_weight_only", ALL_M, ("emulation",), f"{_CPU}: the only CPU kernel (bf16 M=1 4689, M=128 7446)."),
    Row("cpu", "w4a16", ALL_M, ("torch_int4pack", "emulation"),
        f"{_CPU}: _weight_int4pack_mm_for_cpu vs emulation (g128), bf16: M=1 72 vs 2362, M=16 246 vs 3203, "
        "M=128 2436 vs 8665.", act_dtypes=_BF16),
    Row("cpu", "w4a16", (1,), ("torch_int4pack", "emulation"),
        f"{_CPU}: fp32 M=1 _weight_int4pack_mm_for_cpu 7463 vs emulation 57259."),
    Row("cpu", "w4a16", (16, 128, 1024, None), ("emulation", "torch_int4pack"),
        f"{_CPU}: fp32 emulation vs _weight_int4pack_mm_for_cpu, M=16 30880 vs 36605, M=128 33683 vs 275217 "
        "(fp16 not measured, taken as fp32)."),
)

#: every row; :func:`order` reads it at each call (tests monkeypatch it)
TABLE: tuple = SM90 + CUDA + CPU

_GPU_ONLY = ("cuda_w4a16", "cuda_w8a8", "cuda_w8a16", "cutlass_fp8", "cutlass_int8", "cutlass_fp8_block", "cutlass_w4a16",
             "cutlass_int8_weight_only", "cutlass_fp8_weight_only",
             "flashinfer_deepgemm_fp8_block", "torch_scaled_mm_block") + _FI_TENSOR + _FI_BLOCK_SM100
#: kernels ``auto`` never reaches on a device class (placed after ``emulation``): our Triton
#: kernels run on a CPU only through the interpreter, for tests; the GPU libraries refuse it
BEHIND_EMULATION: dict = {
    "cpu": ("triton_w8a8", "triton_weight_only") + _GPU_ONLY,
    "other": ("triton_w8a8", "triton_weight_only") + _GPU_ONLY,
}


# --- the order -----------------------------------------------------------------------------

_index: dict = {}
_indexed: Optional[tuple] = None


def row(cls: str, scheme: str, bucket: Optional[int], act_dtype: Optional[torch.dtype] = None,
        weight_layout: Optional[str] = None) -> Optional[Row]:
    """The row for device class ``cls``, ``scheme``, M bucket ``bucket``, activation dtype
    ``act_dtype`` and weight layout ``weight_layout`` (a row naming that layout before one for any;
    among those, a row naming that dtype before one for any), or None."""
    global _index, _indexed
    if _indexed is not TABLE:
        index = {}
        for r in TABLE:
            for b in r.m:
                for dt in r.act_dtypes or (None,):
                    for lay in r.weight_layouts or (None,):
                        key = (r.device, r.scheme, b, dt, lay)
                        if key in index:
                            on = "".join(f", {v}" for v in (dt, lay) if v is not None)
                            raise ValueError(f"two rows of qlinear_pass.ranking.TABLE cover ({r.device}, {r.scheme}, M bucket {b}{on})")
                        index[key] = r
        _index, _indexed = index, TABLE
    for lay in ((weight_layout, None) if weight_layout is not None else (None,)):
        for dt in ((act_dtype, None) if act_dtype is not None else (None,)):
            hit = _index.get((cls, scheme, bucket, dt, lay))
            if hit is not None:
                return hit
    return None


def order(kernels: Iterable[Kernel], scheme: str, device: DeviceInfo, bucket: Optional[int],
          act_dtype: Optional[torch.dtype] = None, weight_layout: Optional[str] = None) -> list[Kernel]:
    """``kernels`` (those registered for ``scheme``) in the order ``auto`` tries them on ``device``
    for layers whose M falls in ``bucket``, whose activation is ``act_dtype`` and whose weight is
    held in ``weight_layout`` (see the module's docstring)."""
    if bucket not in M_BUCKETS:
        raise ValueError(f"M bucket {bucket!r} is not one of {M_BUCKETS}")
    cls = device_class(device)
    r = row(cls, scheme, bucket, act_dtype, weight_layout)
    listed = r.kernels if r is not None else ()
    behind = BEHIND_EMULATION.get(cls, ())
    by_name = {k.name: k for k in kernels}
    first = [by_name[n] for n in listed if n in by_name]
    rest = sorted((k for k in by_name.values() if k.name not in listed and k.name != EMULATION and k.name not in behind),
                  key=lambda k: (k.priority, k.name))
    last = [by_name[EMULATION]] if EMULATION in by_name and EMULATION not in listed else []
    hidden = [by_name[n] for n in behind if n in by_name and n not in listed]
    return first + rest + last + hidden


__all__ = ["M_BUCKETS", "DEVICE_CLASSES", "Row", "TABLE", "BEHIND_EMULATION", "m_bucket", "device_class", "row", "order"]
