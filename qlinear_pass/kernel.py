"""The :class:`Kernel` base class: one implementation of one or more schemes.

A kernel belongs to exactly one backend and answers two questions, each with a reason:

* ``is_supported(device) -> (ok, reason)``: can it run on this device at all (GPU
  generation, libraries installed)?
* ``can_implement(spec) -> (ok, reason)``: can it run this layer (shape alignment, group
  size, dtypes, constant weights)?  It states every constraint of the op it wraps.

It then either runs behind the custom op (:meth:`Kernel.run`) or writes ATen nodes into the
graph (:meth:`Kernel.emit`, with the helpers of ``emit.py``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Optional, Sequence

import torch

from .spec import OK, DeviceInfo, LayerSpec, Reason

if TYPE_CHECKING:
    from .fusion import Fused


class Kernel:
    """Base class of every kernel.

    Subclasses set ``name`` (unique), ``backend`` and ``schemes``, and implement
    :meth:`run`.  Where ``auto`` tries a kernel is decided by the table of
    ``ranking.py``; a kernel its rows do not list (a plug-in's) is tried after the
    listed ones, ordered by ``priority``.  A kernel that wants Inductor to fuse around it
    overrides :meth:`emit` instead (see ``graph_pass.py``).
    """

    name: ClassVar[str]
    backend: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]
    #: a plug-in's hint for ``auto``: among kernels the ranking table does not list, lower runs first
    priority: ClassVar[int] = 50
    #: the weight layouts it reads (``LayerSpec.weight_layout``); the selection loop refuses the others
    weight_layouts: ClassVar[tuple[str, ...]] = ("public",)

    def is_supported(self, device: DeviceInfo) -> Reason:
        return OK

    def can_implement(self, spec: LayerSpec) -> Reason:
        return OK

    #: False for kernels that insert ATen ops into the graph (see emit)
    opaque: ClassVar[bool] = True


    @property
    def runs_behind_op(self) -> bool:
        """Can it run behind the custom op (it has a :meth:`run`)?  Per-M plans need that."""
        return type(self).run is not Kernel.run

    def run(
        self,
        spec: LayerSpec,
        x: torch.Tensor,
        params: Sequence[Optional[torch.Tensor]],
        bias: Optional[torch.Tensor],
    ) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self) -> None:
        """Work done once per process before the kernel's first call, while ``torch.compile`` runs:
        the pass calls it for every kernel it chose (each kernel of a per-M plan too), so a build on
        first use happens at compile time, where its progress lines belong, not inside a forward."""

    def takes_quantized_activation(self, spec: LayerSpec) -> bool:
        """Should this dynamic-activation layer get the graph's own quantized activation and its
        scale (``run`` then sees ``spec.act_input == "static"``, the scale the last parameter)
        instead of the float activation?  When every kernel a layer may run says yes, the pass
        leaves the quantization in the graph, where Inductor fuses it into the kernel that
        produces the activation (the norm before q/k/v, the SwiGLU before down_proj)."""
        return False

    def run_group(
        self,
        specs: Sequence[LayerSpec],
        x: torch.Tensor,
        params: Sequence[Sequence[Optional[torch.Tensor]]],
        biases: Sequence[Optional[torch.Tensor]],
    ) -> list[torch.Tensor]:
        """Layers that read the same activation (a transformer's q/k/v, gate/up): one output each.

        This default runs them one by one.  A kernel that overrides it runs them in one launch
        where that is faster (at decode sizes a small layer alone leaves SMs idle), and the pass
        then hands it such groups (``groups_layers``)."""
        return [self.run(s, x, p, b) for s, p, b in zip(specs, params, biases)]

    def why_not_fuse(self, spec: LayerSpec, what: str) -> str:
        """Why it does not run ``what`` (``fusion.FUSIONS``: the "rmsnorm" or "silu_mul" that makes
        its activation, the "residual" add after it) inside its launch for this layer; "" when it
        does (:meth:`run_fused` then gets it, and the pass takes it out of the graph)."""
        return f"does not run {what} in its launch"

    def run_fused(
        self,
        specs: Sequence[LayerSpec],
        x: torch.Tensor,
        params: Sequence[Sequence[Optional[torch.Tensor]]],
        biases: Sequence[Optional[torch.Tensor]],
        fused: "Fused",
    ) -> list[torch.Tensor]:
        """:meth:`run_group` on the activation ``fused.prologue`` makes of ``x``, each output plus its
        residual.  This default computes them around the product with the references of
        ``fusion.py`` (a call the pass did not fuse for this kernel: another kernel of a per-M plan's);
        a kernel whose :meth:`why_not_fuse` says yes overrides it."""
        from .fusion import add_residuals, prologue_of

        outs = self.run_group(specs, prologue_of(fused, x), params, biases)
        return add_residuals(outs, fused.residuals)

    @property
    def groups_layers(self) -> bool:
        """Does it run sibling layers together (it overrides :meth:`run_group`)?"""
        return type(self).run_group is not Kernel.run_group

    def __repr__(self) -> str:
        return f"<kernel {self.name} ({self.backend})>"


__all__ = ["Kernel"]
