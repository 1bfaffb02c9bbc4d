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


def unpad_rows(graph: fx.Graph, matches: list[Match], misses: list[Unmatched] = ()) -> bool:
    """Undo Inductor's row padding around the quantized linears' ``mm`` / ``addmm`` anchors: on a GPU
    its ``pad_mm`` may turn ``mm(a, w)`` of M rows into ``slice(mm(constant_pad_nd(a, [0, 0, 0, p]),
    w), 0, 0, -p)`` (M + p a multiple of 4 for float32 operands, 8 for 16-bit, where that
    benchmarks faster).  The
    layer's kernel takes any M, and the padded activation is a copy of another node (its float32
    widening: the layer would lose its 16-bit activation, its siblings and its fusions), so a
    matched anchor gets its M rows back, and so does a missed one that matches without its padding
    (where the activation is dequantized before the matmul, fp8_block's and fp8_tensor's, the padding
    hides its quantization chain); the matmuls the pass does not replace keep their padding.
    True where the graph changed (then match again)."""
    anchors = [m.anchor for m in matches]
    padded_misses = [u.node for u in misses if _padding(u.node) is not None]
    if padded_misses:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        static = static_inputs(graph)
        with unset_fake_temporarily():
            anchors += [node for node in padded_misses if _matches_unpadded(node, static)]
    changed = False
    for node in anchors:
        padding = _padding(node)
        if padding is None:
            continue
        i, pad, sl = padding
        args = list(node.args)
        args[i] = pad.args[0]
        with graph.inserting_before(node):
            new = graph.call_function(node.target, tuple(args), dict(node.kwargs))
        new.meta = {**node.meta, "val": sl.meta["val"]}
        sl.replace_all_uses_with(new)
        for dead in (sl, node, pad):
            graph.erase_node(dead)
        changed = True
    return changed


def _padding(node: fx.Node) -> "tuple[int, fx.Node, fx.Node] | None":
    """(activation argument index, the pad, the slice) where ``node`` is an mm / addmm in pad_mm's
    row-padded form, else None."""
    if node.target not in MM_TARGETS or len(node.users) != 1:
        return None
    i = 1 if node.target == aten.addmm.default else 0
    pad, sl = node.args[i], next(iter(node.users))
    if not (isinstance(pad, fx.Node) and pad.target == aten.constant_pad_nd.default and len(pad.users) == 1
            and sl.target == aten.slice.Tensor):
        return None
    widths, value = list(pad.args[1]), (pad.args[2] if len(pad.args) > 2 else 0)
    rows = _shape(pad.args[0])[0] if len(_shape(pad.args[0])) == 2 else None
    if len(widths) != 4 or widths[:3] != [0, 0, 0] or not isinstance(widths[3], int) or widths[3] <= 0 \
            or value != 0 or not isinstance(rows, int):
        return None
    dim, start, end, step = tuple(sl.args[1:]) + (0, None, None, 1)[len(sl.args) - 1:]  # slice's defaults
    if dim != 0 or start not in (0, None) or end not in (rows, -widths[3]) or step != 1:
        return None
    if i == 1 and len(_shape(node.args[0])) == 2 and _shape(node.args[0])[0] != 1:
        return None  # a bias of M + p rows
    return i, pad, sl


def _matches_unpadded(node: fx.Node, static: frozenset) -> bool:
    """Whether the padded anchor ``node`` is a quantized linear once it reads the unpadded activation
    (tried on the node itself, its argument and output shape put back after)."""
    i, pad, sl = _padding(node)
    old_val = node.meta.get("val")
    node.update_arg(i, pad.args[0])
    node.meta["val"] = sl.meta["val"]
    try:
        _match_anchor(node, static)
        return True
    except _Miss:
        return False
    finally:
        node.update_arg(i, pad)
        node.meta["val"] = old_val


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
