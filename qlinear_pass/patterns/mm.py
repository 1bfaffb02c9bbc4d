"""The matcher of ``mm`` / ``addmm`` anchors: dequantise-then-linear (weight-only schemes, our
reference modules) and a dynamically quantized activation dequantized before a float matmul."""
from __future__ import annotations

import torch
import torch.fx as fx

from .common import (  # noqa: F401
    CONVERTS,
    FLOAT_DTYPES,
    Match,
    _Act,
    _Miss,
    _NotDynamic,
    _Side,
    _act_candidates,
    _act_of,
    _bias_leaf,
    _classify_weight_leaves,
    _dtype,
    _epilogue,
    _find_quantized,
    _scheme_for_weight,
    _skip,
    _trace_quant_chain,
    aten,
    build_match,
    operands,
)
from .regions import _ancestors, _verify_act, _verify_weight_region


def match_mm(node: fx.Node, static: frozenset) -> Match:
    """``mm`` / ``addmm`` whose weight operand is a dequantise region (weight-only schemes, or a
    dynamically quantized activation dequantized before a float matmul)."""
    a, b, wd, n, k, m = operands(node)
    bias0 = node.args[0] if node.target == aten.addmm.default else None
    inner, leaves = _ancestors(wd, set())
    wt = _classify_weight_leaves(leaves, n, k)
    q = _find_quantized(a)
    if q is None:
        act = _Act("none", _skip(a, CONVERTS) if _dtype(_skip(a, CONVERTS)) in FLOAT_DTYPES else a)
    else:
        src, scale = None, None
        try:
            src, scale = _trace_quant_chain(q, k)
        except _Miss:
            pass
        cands = _act_candidates(scale, k) if scale is not None else []
        act = _Act("dynamic", src, None, _dtype(q), q, scale) if src is not None and cands else None
        if act is not None:
            scheme = _scheme_for_weight(wt, cands)
            act.granularity = _act_of(scheme)
            try:
                _verify_act(src, [a], scheme, k, "dq")
            except _NotDynamic:
                act = None
        if act is None:
            raise _Miss("the activation is dequantized from a quantized tensor that is not a dynamic quantization of a float activation")
    scheme = _scheme_for_weight(wt, act.granularity)
    _verify_weight_region(wd, inner, leaves, wt, scheme)
    bias = _bias_leaf(bias0, n) if bias0 is not None else None
    if bias0 is not None and bias is None:
        raise _Miss("addmm's added tensor is not a [N] bias")
    end, bias, _, _, out_dtype = _epilogue(node, n, bias, allow_scales=False)
    if act.mode == "none":
        act_dtype = _dtype(act.x)
        if out_dtype == torch.float32 and act_dtype != torch.float32:
            out_dtype = torch.float32
    else:
        act_dtype = _dtype(act.x)
    return build_match(_Side(anchor=node, end=end, weight_t=b, act=act, weight=wt, scheme=scheme, bias=bias, m=m,
                             act_dtype=act_dtype, out_dtype=out_dtype), static)

