"""Reference quantized modules and :func:`quantize`.

Each :class:`QuantizedLinear` holds real quantized weights and computes its
scheme's float32 reference in plain torch, so it is correct in eager mode on
any device.  ``torch.compile`` with :func:`qlinear_pass.make` swaps the
reference math for a fast kernel.
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from . import schemes as S
from .kernels import ops as _ops  # noqa: F401  (registers qlinear_pass::int4_from_mma16, read by public_weight)
from .kernels.int4_layout import MMA16, PUBLIC, check_layout, check_shape, from_mma16, to_mma16


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored quantized in ``scheme``.

    It is for inference: the quantized weight, its scales and the bias are
    buffers, not parameters, so nothing in it asks for gradients.

    ``weight_layout``: how ``weight`` is held.  ``"public"`` is the scheme's layout (``schemes.py``).
    A ``w4a16`` layer may hold the MMA-fragment layout instead (``"mma16"``, see
    :meth:`repack`): the layout the CUDA and CUTLASS int4 kernels read, so the layer keeps one copy
    of its weight where a public one gets a second for them.  Either way ``state_dict()`` and
    checkpoints carry the public layout, ``load_state_dict`` takes it, and the module computes the
    same reference.
    """

    weight_layout: str = PUBLIC

    def __init__(
        self,
        scheme: str,
        in_features: int,
        out_features: int,
        params: dict,
        bias: Optional[torch.Tensor] = None,
        group_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.scheme = S.get_scheme(scheme).name
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.register_buffer("weight", params["weight"])
        self.register_buffer("weight_scale", params["weight_scale"])
        self.register_buffer("weight_zero", params.get("weight_zero"))
        # inference only: every tensor is a buffer, so a compiled model called without
        # torch.no_grad() still has nothing to differentiate and gets the pass
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, *, group_size: Optional[int] = None,
                    zero_points: bool = False) -> "QuantizedLinear":
        name = S.get_scheme(scheme).name
        group_size = _group_size(name, group_size)
        params = S.quantize_weight(scheme, linear.weight, group_size=group_size or 128, zero_points=zero_points)
        return cls(
            name,
            linear.in_features,
            linear.out_features,
            params,
            linear.bias,
            group_size=group_size if name == "w4a16" else None,
        )

    @property
    def params(self) -> list:
        """The scheme's parameters in the public layout (``weight`` read back when held otherwise)."""
        names = S.get_scheme(self.scheme).param_names
        return [self.public_weight() if n == "weight" else getattr(self, n) for n in names]

    def public_weight(self) -> torch.Tensor:
        """``weight`` in the public layout: the buffer itself, or read back from the layout held."""
        if self.weight_layout == MMA16:
            return torch.ops.qlinear_pass.int4_from_mma16(self.weight)
        return self.weight

    def repack(self, layout: str) -> "QuantizedLinear":
        """Hold ``weight`` in ``layout`` from now on (``"public"`` or, for w4a16, ``"mma16"``), in
        place: the old buffer is replaced, not kept.  Returns the module."""
        check_layout(layout)
        if layout == self.weight_layout:
            return self
        if layout == MMA16:
            why = self.why_not_layout(layout)
            if why:
                raise ValueError(f"cannot hold this layer's weight in the {layout} layout: {why}")
            self.weight = to_mma16(self.weight)
        else:
            self.weight = from_mma16(self.weight)
        self.weight_layout = layout
        return self

    def why_not_layout(self, layout: str) -> str:
        """Why this layer cannot hold ``layout`` ("" when it can)."""
        check_layout(layout)
        if layout == PUBLIC:
            return ""
        if self.scheme != "w4a16":
            return f"the {layout} layout holds int4 weights (w4a16), not {self.scheme}"
        return check_shape(self.out_features, self.in_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_layout != PUBLIC:  # checkpoints carry the public layout
            destination[prefix + "weight"] = from_mma16(self.weight)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        t = state_dict.get(key)
        if self.weight_layout != PUBLIC and isinstance(t, torch.Tensor) and tuple(t.shape) == (self.out_features, self.in_features // 2):
            state_dict[key] = to_mma16(t.to(self.weight.device))  # the public layout, as state_dict() gives it
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def dequantized_weight(self) -> torch.Tensor:
        return S.dequantize_weight(self.scheme, self.params, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return S.reference(self.scheme, x, self.params, self.bias)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        z = ", zero_points=True" if self.weight_zero is not None else ""
        lay = f", weight_layout={self.weight_layout!r}" if self.weight_layout != PUBLIC else ""
        return (f"{self.scheme}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{g}{z}{lay}")


def _group_size(scheme: str, group_size: Optional[int]) -> Optional[int]:
    """The group size of a w4a16 layer (default 128); an error for schemes without groups."""
    if scheme != "w4a16":
        if group_size is not None:
            raise ValueError(f"group_size is a w4a16 option; scheme {scheme} has no weight groups "
                             f"(got group_size={group_size})")
        return None
    group_size = 128 if group_size is None else group_size
    if group_size not in S.GROUP_SIZES:
        raise ValueError(f"w4a16 group size must be one of {S.GROUP_SIZES}, got {group_size}")
    return group_size


def _matches(name: str, patterns: Optional[Iterable[str]]) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _as_patterns(value) -> Optional[list[str]]:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def quantize(
    model: nn.Module,
    scheme: str,
    *,
    group_size: Optional[int] = None,
    zero_points: bool = False,
    include=None,
    exclude=None,
    weight_layout: str = PUBLIC,
    progress: Optional[bool] = None,
) -> nn.Module:
    """Replace the model's ``nn.Linear`` modules by :class:`QuantizedLinear`, in place.

    ``include`` / ``exclude`` are module-name globs (``"layers.*.mlp.*"``).  A
    layer whose shape the scheme cannot hold (K not a multiple of the group
    size, say) is an error naming it; exclude it to keep it in float.  Nothing
    is replaced unless every selected layer can be: no half-quantized model.
    Nothing to replace is an error too (an already quantized model, an
    ``include`` that matches no linear), and a glob that matches no linear is
    a warning.  ``weight_layout``: how the layers hold their weights
    (:class:`QuantizedLinear`); ``"mma16"`` (w4a16 only, N and K multiples of 16) keeps one copy
    for the CUDA / CUTLASS int4 kernels instead of two.  ``progress``: True always, False never,
    None (default) a bar on stderr once quantizing takes more than a few seconds.
    """
    s = S.get_scheme(scheme)
    group_size = _group_size(s.name, group_size)
    if zero_points and s.name != "w4a16":
        raise ValueError(f"zero_points is a w4a16 option; scheme {s.name} is symmetric")
    check_layout(weight_layout)
    if weight_layout != PUBLIC and s.name != "w4a16":
        raise ValueError(f"weight_layout={weight_layout!r} holds int4 weights (w4a16); scheme {s.name} has the public layout only")
    inc, exc = _as_patterns(include), _as_patterns(exclude)
    chosen: list[tuple[str, nn.Linear]] = []
    problems: list[str] = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        if inc is not None and not _matches(name, inc):
            continue
        if _matches(name, exc):
            continue
        k = mod.in_features
        if s.name == "w4a16" and k % group_size:
            problems.append(f"{name or '<root>'}: K={k} is not a multiple of group_size={group_size}")
        elif weight_layout != PUBLIC and check_shape(mod.out_features, k):
            problems.append(f"{name or '<root>'}: weight_layout={weight_layout!r} needs N and K divisible by 16 "
                            f"(N={mod.out_features}, K={k})")
        elif s.name == "fp8_block" and k % S.BLOCK:
            problems.append(f"{name or '<root>'}: K={k} is not a multiple of the 128-wide block")
        else:
            chosen.append((name, mod))
    if problems:
        raise ValueError(
            f"cannot quantize {len(problems)} layer(s) to {s.name}:\n  "
            + "\n  ".join(problems)
            + "\nPass exclude=[...] with these names to keep them in float."
        )
    _check_selection(model, s.name, chosen, inc, exc)
    if s.name == "w4a16":
        warn_if_layout_unread(weight_layout, chosen[0][1].weight.device, stacklevel=3)
    from .checkpoints.progress import Progress

    bar = Progress(len(chosen), f"quantizing to {s.name}", progress, unit="layer")
    for name, mod in chosen:
        q = QuantizedLinear.from_linear(mod, s.name, group_size=group_size, zero_points=zero_points).repack(weight_layout)
        bar.update()
        if not name:
            bar.close()
            return q
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q)
    bar.close()
    return model


def warn_if_layout_unread(layout: str, device: torch.device, stacklevel: int = 2) -> None:
    """A warning where w4a16 layers on a GPU hold the MMA-fragment layout but this machine cannot
    build the CUDA kernels that read it fast (no nvcc): every call then runs Triton's dequantising
    pass and cuBLAS, which a decode step cannot afford."""
    if layout != MMA16 or torch.device(device).type != "cuda":
        return
    from .kernels import cuda_build

    path, why = cuda_build.toolchain()
    if path is None:
        warnings.warn(f"qlinear_pass: weight_layout='mma16' is read fast by cuda_w4a16 and cutlass_w4a16, which this "
                      f"machine cannot build ({why}); without them its layers run Triton's dequantising pass and "
                      "cuBLAS at every M, 24-58 us more a call than the matmul on Llama-3-8B shapes, even for one token (H200). "
                      "weight_layout='public' keeps Triton's decode kernel and GEMMs.", UserWarning, stacklevel=stacklevel)


def _check_selection(model: nn.Module, scheme: str, chosen: list, inc, exc) -> None:
    """No silent no-op: an empty selection is an error that says why, an unused glob a warning."""
    linears = [name for name, mod in model.named_modules() if type(mod) is nn.Linear]
    if not chosen:
        done = [(name, mod.scheme) for name, mod in model.named_modules() if isinstance(mod, QuantizedLinear)]
        if done and not linears:
            raise ValueError(
                f"the model is already quantized ({len(done)} QuantizedLinear layer(s), e.g. {done[0][0] or '<root>'!r} "
                f"in {done[0][1]}): quantize() replaces nn.Linear modules, so quantize the float model to get {scheme}"
            )
        if not linears:
            raise ValueError("the model has no nn.Linear module to quantize")
        shown = ", ".join(repr(n) for n in linears[:6]) + (", ..." if len(linears) > 6 else "")
        raise ValueError(f"include={inc} / exclude={exc} leave no nn.Linear to quantize; the model's linears: {shown}")
    for kind, patterns in (("include", inc), ("exclude", exc)):
        for p in patterns or ():
            if not any(fnmatch.fnmatchcase(name, p) for name in linears):
                warnings.warn(f"qlinear_pass.quantize: {kind} pattern {p!r} matches no nn.Linear of the model", stacklevel=3)
