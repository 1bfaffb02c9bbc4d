"""Post-grad ATen graph -> matched quantized linears (the only package that knows graph shapes).

How a linear is found
---------------------
Every matmul node is an *anchor*: ``aten.mm``, ``aten.addmm``,
``aten._scaled_mm``, ``aten._int_mm`` and ``aten._weight_int8pack_mm`` (tinygemm's
``aten._weight_int4pack_mm`` too, only to list it with why: no scheme has its weight format).  From an anchor the matcher walks
up the two operands and down the epilogue:

* the **weight side** (the ``[K, N]`` operand, a transposed ``[N, K]``
  tensor) is either a quantized weight used directly (``_scaled_mm``,
  ``_int_mm``) or a *dequantise region*: every op between the quantized
  weight and the matmul (unpacking, ``.to(dtype)``, scale multiplies, in any
  order).  The region's leaves say which scheme it could be (weight dtype,
  scale shapes); the region is then **run on random data and compared with
  the scheme's reference dequantisation**, so ``w.to(dt) * s`` and
  ``(w * s).to(dt)`` and our own reference modules all match, and a region
  that only looks right does not.
* the **activation side** is a float activation (weight-only schemes), an
  already-quantized activation with its scale ("static"), or a dynamic
  quantization chain from a float activation (abs -> amax -> ... -> convert),
  which is likewise run on random data and compared with the scheme's
  reference quantization.
* the **epilogue** is the chain after the matmul: scale multiplies (for
  ``_int_mm``), a bias add, a cast to the output dtype.

Hand-written ``CallFunction`` patterns would need one pattern per order,
dtype, bias and view variant; checking the semantics numerically covers them
all and explains every miss (:class:`Unmatched`).

Layout: ``common.py`` (the match types, op sets, weight / activation / epilogue helpers, and
``build_match``), ``regions.py`` (the numeric checks), ``mm.py`` and ``scaled.py`` (one matcher
per anchor family); this module walks the graph.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .common import (  # noqa: F401  (the names the pass and explain use)
    ANCHORS,
    EXPLAIN_ROOT,
    MM_TARGETS,
    Match,
    Unmatched,
    _Miss,
    _shape,
    _static,
    aten,
    module_path,
    val,
)
from .mm import INT4PACK_TARGETS, INT8PACK_TARGETS, int4pack_nk, match_int8pack, match_mm, miss_int4pack
from .scaled import match_scaled_or_int_mm


def _match_anchor(node: fx.Node, static: frozenset) -> Match:
    if node.target in MM_TARGETS:
        return match_mm(node, static)
    if node.target in INT8PACK_TARGETS:
        return match_int8pack(node, static)
    if node.target in INT4PACK_TARGETS:
        return miss_int4pack(node)
    return match_scaled_or_int_mm(node, static)


def find_linears(graph: fx.Graph) -> tuple[list[Match], list[Unmatched]]:
    """Every quantized linear in ``graph``, and every matmul that is not one (with why)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # the numeric checks run real (CPU) tensors, outside the compiler's fake mode
    with unset_fake_temporarily():
        return _find_linears(graph)


def static_inputs(graph: fx.Graph) -> frozenset:
    """Placeholders that are module parameters / buffers: the same tensors every call."""
    tc = torch._guards.TracingContext.try_get()
    meta = getattr(tc, "fw_metadata", None) if tc is not None else None
    indices = set(getattr(meta, "static_input_indices", None) or ())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return frozenset(p for i, p in enumerate(placeholders) if i in indices)


def _find_linears(graph: fx.Graph) -> tuple[list[Match], list[Unmatched]]:
    static = static_inputs(graph)
    matches: list[Match] = []
    misses: list[Unmatched] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or (node.target not in ANCHORS and node.target not in INT8PACK_TARGETS
                                          and node.target not in INT4PACK_TARGETS):
            continue
        try:
            matches.append(_match_anchor(node, static))
        except _Miss as miss:
            b = node.args[2] if node.target == aten.addmm.default else node.args[1]
            kn = _shape(b) if isinstance(b, fx.Node) else ()
            k, n = (kn if len(kn) == 2 else (None, None))
            if node.target in INT8PACK_TARGETS:  # its weight is [N, K]
                k, n = n, k
            elif node.target in INT4PACK_TARGETS:
                n, k = int4pack_nk(node)
            misses.append(Unmatched(node, module_path(node), str(miss), _static(n), _static(k)))
    return matches, misses
