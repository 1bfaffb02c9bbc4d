"""Writing nodes into a post-grad ATen graph: what the pass and the kernels that emit ATen ops share.

* :class:`Emitter` creates nodes before an anchor, with the fake values Inductor expects.
* :func:`canonical_inputs` / :func:`quantized_inputs`: a matched linear's inputs as a kernel
  takes them (2-D activation, canonical parameters, bias; or the graph's own quantized
  activation and its scale).

Backends import this module, never ``graph_pass``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.fx as fx

if TYPE_CHECKING:  # a match of patterns/, which imports this module
    from .patterns import Match


def val(n: Any) -> Any:
    """A node's fake (or real) value, if it has one."""
    return n.meta.get("val") if isinstance(n, fx.Node) else None


class Emitter:
    """Creates nodes before ``anchor`` with fake values, as Inductor expects.

    ``shared`` (one dict for all the replacements of one graph, made in graph order) keeps nodes
    that a later replacement may read instead of emitting the same ones again (:meth:`once`)."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, meta_from: fx.Node, shared: Optional[dict] = None) -> None:
        self.graph = graph
        self.anchor = anchor
        self.meta_from = meta_from
        self.shared = {} if shared is None else shared
        vals = [v for v in (val(n) for n in anchor.all_input_nodes) if isinstance(v, torch.Tensor)]
        self.fake_mode = torch._guards.detect_fake_mode(vals) if vals else None

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.meta_from.meta:
                node.meta[key] = self.meta_from.meta[key]

        def fake(a):
            return val(a) if isinstance(a, fx.Node) else a

        fargs = fx.node.map_aggregate(args, fake)
        fkwargs = fx.node.map_aggregate(kwargs, fake)
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*fargs, **fkwargs)
        else:
            node.meta["val"] = target(*fargs, **fkwargs)
        return node

    def once(self, key: tuple, make) -> Any:
        """``make()``'s nodes, emitted by the first replacement that asks for ``key`` and read by
        the later ones (they come after it in the graph)."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]

    def constant(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """A new constant of the graph module (weights prepared at compile time)."""
        gm = self.graph.owning_module
        base = f"_qlinear_{name}"
        attr = base
        i = 0
        while hasattr(gm, attr):
            i += 1
            attr = f"{base}_{i}"
        gm.register_buffer(attr, tensor)
        with self.graph.inserting_before(self.anchor):
            node = self.graph.get_attr(attr)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        else:
            node.meta["val"] = tensor
        return node


aten = torch.ops.aten

#: ops that only reshape their input (the pass looks through them to the data they show)
RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def canonical_inputs(emit: Emitter, m: "Match") -> tuple[fx.Node, list, Optional[fx.Node]]:
    """The kernel's inputs: 2-D activation, canonical parameters, bias."""
    x = m.x
    if len(val(x).shape) != 2:
        x = emit(aten.reshape.default, x, [-1, m.spec.k])
    return x, canonical_params(emit, m), m.bias


def canonical_params(emit: Emitter, m: "Match") -> list:
    """The matched linear's parameters in their canonical shapes."""
    params = []
    for p, shape in zip(m.params, m.param_shapes):
        if p is not None and shape is not None and tuple(val(p).shape) != tuple(shape):
            p = emit(aten.reshape.default, p, list(shape))
        params.append(p)
    return params


def quantized_inputs(emit: Emitter, m: "Match") -> tuple[fx.Node, fx.Node, list, Optional[fx.Node]]:
    """For kernels that keep a dynamic activation quantization in the graph (Inductor fuses it):
    the quantized 2-D activation, its scale, the weight parameters and the bias.
    For a static activation these are the given quantized activation and scale."""
    x, params, bias = canonical_inputs(emit, m)
    if m.spec.act_input == "static":
        return x, params[-1], params[:-1], bias
    q, scale = m.act_q, m.act_scale
    if len(val(q).shape) != 2:
        q = emit(aten.reshape.default, q, [-1, m.spec.k])
    return q, scale, params, bias


def mn_major_scale_view(emit: Emitter, scale: fx.Node, m: int, groups: int) -> fx.Node:
    """Per-group activation scales ``[M, G]`` (M fixed in the graph), written by the graph into a
    float32 ``[G, M4]`` buffer (M4 = M rounded up to 4, the pad zero) and handed on as the ``[M, G]``
    view of it (strides ``(1, M4)``): the same values for any kernel, and for the block-scaled
    GEMMs the MN-major layout they load, which ``kernels.ops.mn_major_scales`` then takes without a
    copy.  Inductor writes the buffer in a kernel of its own, or fused into the quantization.
    Layers that share one quantization (q/k/v) share the view too."""
    return emit.once(("mn_major_scale_view", scale, m, groups), lambda: _mn_major_scale_view(emit, scale, m, groups))


def _mn_major_scale_view(emit: Emitter, scale: fx.Node, m: int, groups: int) -> fx.Node:
    s = emit(aten.reshape.default, scale, [m, groups])
    if val(s).dtype != torch.float32:
        s = emit(aten._to_copy.default, s, dtype=torch.float32)
    t = emit(aten.permute.default, s, [1, 0])
    pad = -m % 4
    if pad:
        t = emit(aten.constant_pad_nd.default, t, [0, pad], 0.0)
    t = emit(aten.clone.default, t, memory_format=torch.contiguous_format)
    if pad:
        t = emit(aten.slice.Tensor, t, 1, 0, m)
    return emit(aten.permute.default, t, [1, 0])


__all__ = ["Emitter", "canonical_inputs", "canonical_params", "mn_major_scale_view", "quantized_inputs", "val"]
