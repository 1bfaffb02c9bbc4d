"""Backend ``emulation``: every scheme in float32, on any device.

The scheme's reference itself, run behind the custom op (a weight held in another layout is
read back into the public one first).  Slow, exact, and
``auto``'s last resort, so ``auto`` never fails for a known scheme.
"""
from __future__ import annotations

from ..config import SCHEMES
from ..kernel import Kernel
from ..kernels.int4_layout import LAYOUTS, MMA16, from_mma16
from ..registry import register_kernel
from ..schemes import reference


@register_kernel
class EmulationKernel(Kernel):
    name = "emulation"
    backend = "emulation"
    schemes = SCHEMES
    weight_layouts = LAYOUTS

    def run(self, spec, x, params, bias):
        if spec.weight_layout == MMA16:
            params = [from_mma16(params[0]), *params[1:]]
        input_scale = None
        if spec.act_input == "static":
            params, input_scale = params[:-1], params[-1]
        return reference(spec.scheme, x, params, bias, input_scale=input_scale, out_dtype=spec.out_dtype)
