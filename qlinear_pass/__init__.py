"""qlinear_pass: a torch.compile pass that runs quantized linears on the fastest kernel you pick.

::

    model = qlinear_pass.quantize(model, "fp8_rowwise")
    fast = torch.compile(model, backend=qlinear_pass.make(linear_backend="triton"))
    print(qlinear_pass.explain(model, x))
"""
from .checkpoints import CheckpointError, load_quantized, save_quantized
from .compile import make
from .config import EnvConfigError, LinearBackendConfig, linear_backend
from .nn import QuantizedLinear, quantize
from .kernel import Kernel
from .registry import register_kernel
from .select import NoKernelError, available_backends
from .spec import DeviceInfo, LayerSpec
from .report import Report, explain

__version__ = "0.1.0"

__all__ = [
    "make",
    "linear_backend",
    "LinearBackendConfig",
    "quantize",
    "load_quantized",
    "save_quantized",
    "CheckpointError",
    "QuantizedLinear",
    "explain",
    "Report",
    "register_kernel",
    "Kernel",
    "LayerSpec",
    "DeviceInfo",
    "available_backends",
    "NoKernelError",
    "EnvConfigError",
]
