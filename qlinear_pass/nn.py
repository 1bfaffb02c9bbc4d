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


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored quantized in ``scheme``.

    It is for inference: the quantized weight, its scales and the bias are
    buffers, not parameters, so nothing in it asks for gradients.
    """

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
        names = S.get_scheme(self.scheme).param_names
        return [getattr(self, n) for n in names]

    def dequantized_weight(self) -> torch.Tensor:
        return S.dequantize_weight(self.scheme, self.params, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return S.reference(self.scheme, x, self.params, self.bias)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        z = ", zero_points=True" if self.weight_zero is not None else ""
        return f"{self.scheme}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{g}{z}"


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
    progress: Optional[bool] = None,
) -> nn.Module:
    """Replace the model's ``nn.Linear`` modules by :class:`QuantizedLinear`, in place.

    ``include`` / ``exclude`` are module-name globs (``"layers.*.mlp.*"``).  A
    layer whose shape the scheme cannot hold (K not a multiple of the group
    size, say) is an error naming it; exclude it to keep it in float.  Nothing
    is replaced unless every selected layer can be: no half-quantized model.
    Nothing to replace is an error too (an already quantized model, an
    ``include`` that matches no linear), and a glob that matches no linear is
    a warning.  ``progress``: True always, False never, None (default) a bar
    on stderr once quantizing takes more than a few seconds.
    """
    s = S.get_scheme(scheme)
    group_size = _group_size(s.name, group_size)
    if zero_points and s.name != "w4a16":
        raise ValueError(f"zero_points is a w4a16 option; scheme {s.name} is symmetric")
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
    from .checkpoints.progress import Progress

    bar = Progress(len(chosen), f"quantizing to {s.name}", progress, unit="layer")
    for name, mod in chosen:
        q = QuantizedLinear.from_linear(mod, s.name, group_size=group_size, zero_points=zero_points)
        bar.update()
        if not name:
            bar.close()
            return q
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, q)
    bar.close()
    return model


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
