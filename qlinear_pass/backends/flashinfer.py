"""FlashInfer's GEMMs as backends (``pip install 'qlinear_pass[flashinfer]'``).

One file for the five FlashInfer backends, since they share the library glue:

* ``flashinfer_cublas``, ``flashinfer_cudnn``: ``fp8_tensor`` through
  ``flashinfer.gemm.bmm_fp8`` with that backend (sm89 and newer).
* ``flashinfer_deepgemm``: ``fp8_block`` through ``fp8_blockscale_gemm_sm90``
  (Hopper only).  Its activation scales must be MN-major (column-major
  ``[M, K/128]`` with M padded to a multiple of 4); a row-major tensor of the
  right shape is accepted and silently gives wrong results, so this module
  lays the scales out itself.  N must be a multiple of 64.
* ``flashinfer_cutlass``, ``flashinfer_trtllm``: the sm100+ GEMMs
  (``gemm_fp8_nt_groupwise`` for ``fp8_block``; ``bmm_fp8`` with the
  ``cutlass`` backend for ``fp8_tensor``).  Whether they can run is asked
  of FlashInfer itself (``is_backend_supported(backend, cc)``).

FlashInfer is imported lazily: without it every kernel here says how to
install it.  Its first use compiles CUDA code (tens of seconds for the GEMM
module, about two minutes for the block-scale one); a line on stderr says so.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import sys

import torch

from ..kernels import ops
from ..kernels.ops import quantize_activation
from ..kernel import Kernel
from ..registry import register_kernel
from ..spec import OK, DeviceInfo, LayerSpec

log = logging.getLogger("qlinear_pass")

INSTALL = "pip install 'qlinear_pass[flashinfer]'"
#: compute capabilities FlashInfer knows, to name the ones a backend needs
_KNOWN_CC = (89, 90, 100, 103, 107, 110, 120, 121)


@functools.lru_cache(maxsize=None)
def _flashinfer():
    """The flashinfer module, or None (it is imported once, on first need)."""
    if importlib.util.find_spec("flashinfer") is None:
        return None
    try:
        import flashinfer  # noqa: F401
        import flashinfer.gemm  # noqa: F401
    except Exception as exc:  # a broken install must not break the pass
        log.warning("qlinear_pass: importing flashinfer failed: %s", exc)
        return None
    return flashinfer


def _library_status(device: DeviceInfo):
    if _flashinfer() is None:
        why = "FlashInfer is not installed" if importlib.util.find_spec("flashinfer") is None else "FlashInfer failed to import"
        return False, f"{why} ({INSTALL})"
    if device.type != "cuda":
        return False, f"FlashInfer's GEMMs need a CUDA GPU, this is {device}"
    return OK


def _cc_reason(api_name: str, backend: str, device: DeviceInfo):
    """Ask FlashInfer whether ``backend`` of ``api_name`` runs on this compute capability."""
    api = getattr(_flashinfer().gemm, api_name, None)
    if api is None or not hasattr(api, "is_backend_supported"):
        return False, f"this FlashInfer has no {api_name} with backend {backend!r}"
    cc = device.sm
    if cc is not None and api.is_backend_supported(backend, cc):
        return OK
    needs = [f"sm{c}" for c in _KNOWN_CC if api.is_backend_supported(backend, c)]
    return False, (f"FlashInfer's {api_name} backend {backend!r} runs on {', '.join(needs) or 'no known GPU'}, "
                   f"this is {device}")


_announced: set = set()


def _announce_jit(name: str, spec_path: str, seconds: str) -> None:
    """Say once that FlashInfer is about to compile a module (it takes a while)."""
    if name in _announced:
        return
    _announced.add(name)
    compiled = None
    try:
        module, fn = spec_path.rsplit(":", 1)
        compiled = getattr(__import__(module, fromlist=[fn]), fn)().is_compiled
    except Exception:
        pass
    if compiled:
        return
    msg = (f"qlinear_pass: FlashInfer is compiling its {name} module for this GPU (first use only, "
           f"about {seconds}; cached under ~/.cache/flashinfer)")
    log.warning(msg)
    print(msg, file=sys.stderr, flush=True)


def _scalar(t: torch.Tensor) -> torch.Tensor:
    return t.float().reshape(1)


class _FlashInferKernel(Kernel):
    """Shared glue: support asked of FlashInfer (``fi_api`` with ``fi_backend``), activation, bias."""

    fi_api: str = ""
    fi_backend: str = ""

    def is_supported(self, device: DeviceInfo):
        ok, why = _library_status(device)
        if not ok:
            return ok, why
        return _cc_reason(self.fi_api, self.fi_backend, device)

    @staticmethod
    def activation(spec: LayerSpec, x: torch.Tensor, params):
        """The quantized 2-D activation and its scale: given (static) or made here (dynamic)."""
        x = x.reshape(-1, spec.k)
        if spec.act_input == "static":
            return x, params[2]
        return quantize_activation(spec.scheme, x)

    @staticmethod
    def with_bias(y: torch.Tensor, bias, out_dtype: torch.dtype) -> torch.Tensor:
        return y if bias is None else (y.float() + bias.float()).to(out_dtype)


class _BmmFp8(_FlashInferKernel):
    """``fp8_tensor``: ``bmm_fp8`` on [1, M, K] x [1, K, N] (column-major B: the [N, K] weight's transpose)."""

    schemes = ("fp8_tensor",)
    fi_api = "bmm_fp8"

    def can_implement(self, spec: LayerSpec):
        if spec.out_dtype not in (torch.bfloat16, torch.float16):
            return False, f"bmm_fp8 writes bf16 or fp16, this layer wants {spec.out_dtype}"
        if spec.k % 16 or spec.n % 16:
            return False, f"bmm_fp8 needs N and K divisible by 16 (N={spec.n}, K={spec.k})"
        if spec.act_input == "dynamic" and spec.act_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return False, f"activation dtype {spec.act_dtype} is not a float"
        return OK

    def run(self, spec, x, params, bias):
        _announce_jit("gemm", "flashinfer.jit.gemm.core:gen_gemm_module", "40 s")
        w, sw = params[0], params[1]
        xq, sa = self.activation(spec, x, params)
        y = _flashinfer().gemm.bmm_fp8(xq.contiguous().unsqueeze(0), w.contiguous().unsqueeze(0).transpose(-2, -1),
                                       _scalar(sa), _scalar(sw), spec.out_dtype, backend=self.fi_backend)[0]
        return self.with_bias(y, bias, spec.out_dtype)


@register_kernel
class FlashInferCublas(_BmmFp8):
    name = "flashinfer_cublas_fp8"
    backend = "flashinfer_cublas"
    fi_backend = "cublas"


@register_kernel
class FlashInferCudnn(_BmmFp8):
    name = "flashinfer_cudnn_fp8"
    backend = "flashinfer_cudnn"
    fi_backend = "cudnn"

    def is_supported(self, device: DeviceInfo):
        ok, why = super().is_supported(device)
        if ok and importlib.util.find_spec("cudnn") is None:
            return False, "FlashInfer's cudnn backend needs the cuDNN frontend (pip install nvidia-cudnn-frontend)"
        return ok, why


@register_kernel
class FlashInferDeepGemm(_FlashInferKernel):
    """``fp8_block`` on Hopper: DeepGEMM-style block-scaled FP8 GEMM (swap-AB below M = 32)."""

    name = "flashinfer_deepgemm_fp8_block"
    backend = "flashinfer_deepgemm"
    schemes = ("fp8_block",)

    def is_supported(self, device: DeviceInfo):
        ok, why = _library_status(device)
        if not ok:
            return ok, why
        if device.sm not in (90,):
            return False, f"fp8_blockscale_gemm_sm90 runs on Hopper (sm90) only, this is {device}"
        return OK

    def can_implement(self, spec: LayerSpec):
        if spec.n % 64:
            return False, f"fp8_blockscale_gemm_sm90 needs N divisible by 64 (N={spec.n})"
        if spec.out_dtype != torch.bfloat16:
            return False, f"fp8_blockscale_gemm_sm90 writes bfloat16 only, this layer wants {spec.out_dtype}"
        return OK

    def run(self, spec, x, params, bias):
        _announce_jit("fp8_blockscale_gemm_90", "flashinfer.jit.gemm.fp8_blockscale:gen_fp8_blockscale_gemm_sm90_module", "130 s")
        w, sw = params[0], params[1]
        xq, sa = self.activation(spec, x, params)
        y = _flashinfer().gemm.fp8_blockscale_gemm_sm90(xq.contiguous(), w, mn_major_scales(sa), sw.float().contiguous(),
                                                        out_dtype=torch.bfloat16)
        return self.with_bias(y, bias, spec.out_dtype)


def mn_major_scales(scale: torch.Tensor) -> torch.Tensor:
    """[M, K/128] activation scales laid out MN-major, M padded to a multiple of 4 (as the kernel reads them)."""
    return ops.mn_major_scales(scale)[:, :scale.shape[0]].t()


class _Groupwise(_FlashInferKernel):
    """sm100+: ``fp8_block`` through ``gemm_fp8_nt_groupwise`` (K-major scales, as ours are)."""

    schemes = ("fp8_block",)
    fi_api = "gemm_fp8_nt_groupwise"

    def can_implement(self, spec: LayerSpec):
        if spec.out_dtype not in (torch.bfloat16, torch.float16):
            return False, f"gemm_fp8_nt_groupwise writes bf16 or fp16, this layer wants {spec.out_dtype}"
        if spec.n % 128:
            return False, f"gemm_fp8_nt_groupwise with 128x128 weight blocks needs N divisible by 128 (N={spec.n})"
        return OK

    def run(self, spec, x, params, bias):
        w, sw = params[0], params[1]
        xq, sa = self.activation(spec, x, params)
        y = _flashinfer().gemm.gemm_fp8_nt_groupwise(
            xq.contiguous(), w, sa.float().contiguous(), sw.float().contiguous(), scale_major_mode="K",
            scale_granularity_mnk=(1, 128, 128), out_dtype=spec.out_dtype, backend=self.fi_backend)
        return self.with_bias(y, bias, spec.out_dtype)


@register_kernel
class FlashInferCutlassBlock(_Groupwise):
    name = "flashinfer_cutlass_fp8_block"
    backend = "flashinfer_cutlass"
    fi_backend = "cutlass"


@register_kernel
class FlashInferCutlassTensor(_BmmFp8):
    name = "flashinfer_cutlass_fp8"
    backend = "flashinfer_cutlass"
    fi_backend = "cutlass"


@register_kernel
class FlashInferTrtllmBlock(_Groupwise):
    name = "flashinfer_trtllm_fp8_block"
    backend = "flashinfer_trtllm"
    fi_backend = "trtllm"

    def can_implement(self, spec: LayerSpec):
        if spec.k < 256:
            return False, f"the trtllm groupwise GEMM needs K >= 256 (K={spec.k})"
        return super().can_implement(spec)
