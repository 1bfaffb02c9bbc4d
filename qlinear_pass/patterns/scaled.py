"""The matcher of ``_scaled_mm`` / ``_int_mm`` anchors: user code calling torch's quantized
matmuls, with per-tensor or rowwise scales (given, or from a dynamic quantization chain)."""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import schemes as S
from .common import (  # noqa: F401
    CONVERTS,
    FLOAT_DTYPES,
    Match,
    SCALED_MM_TARGETS,
    VIEWS,
    _Act,
    _Miss,
    _NotDynamic,
    _Side,
    _Weight,
    _act_candidates,
    _act_of,
    _bias_leaf,
    _dtype,
    _epilogue,
    _scheme_for_weight,
    _shape,
    _skip,
    _trace_quant_chain,
    build_match,
    operands,
)
from .regions import _verify_act


def match_scaled_or_int_mm(node: fx.Node, static: frozenset) -> Match:
    """``_scaled_mm`` / ``_int_mm``: the weight is used quantized, as is, and the scales are the
    op's arguments (``_scaled_mm``) or multiplies after it (``_int_mm``)."""
    a, b, wd, n, k, m = operands(node)
    t = node.target
    bias0 = None
    wdt = _dtype(wd)
    if t in SCALED_MM_TARGETS:
        if wdt != torch.float8_e4m3fn or _dtype(a) != torch.float8_e4m3fn:
            raise _Miss("_scaled_mm with non-e4m3 operands")
        args = list(node.args) + [None] * 8
        kw = node.kwargs
        scale_a, scale_b = args[2], args[3]
        bias0 = kw.get("bias", args[4])
        scale_result = kw.get("scale_result", args[5])
        out_dtype = kw.get("out_dtype", args[6]) or torch.float8_e4m3fn
        if scale_result is not None:
            raise _Miss("_scaled_mm with scale_result (fp8 output) is not supported")
        if out_dtype not in FLOAT_DTYPES:
            raise _Miss(f"_scaled_mm to {out_dtype} is not supported")
        ws = scale_b
        wgran = "tensor" if all(d == 1 for d in _shape(ws)) else "channel" if n in _shape(ws) and max(_shape(ws)) == n else None
        if wgran is None:
            raise _Miss(f"_scaled_mm weight scale of shape {_shape(ws)}")
        one_block = k == S.BLOCK and n <= S.BLOCK and wgran == "tensor"
        wt = _Weight("fp8", wgran, wd, ws, None, n, k, alts=("block",) if one_block else ())
        xscale = scale_a
    else:
        if wdt != torch.int8 or _dtype(a) != torch.int8:
            raise _Miss("_int_mm without int8 operands")
        end, bias, xscale, ws, out_dtype = _epilogue(node, n, None, allow_scales=True)
        if xscale is None or ws is None:
            raise _Miss("_int_mm is not followed by multiplies with a per-token [M, 1] and a per-channel [N] scale")
        wt = _Weight("int8", "channel", wd, _skip(ws, VIEWS), None, n, k)
    cands = _act_candidates(xscale, k)
    if not cands:
        raise _Miss(f"activation scale of shape {_shape(xscale)}")
    scheme = _scheme_for_weight(wt, cands)
    agran = _act_of(scheme)
    act = None
    if a.op == "call_function" and a.target in CONVERTS:
        try:
            src, s = _trace_quant_chain(a, k)
            scheme = _scheme_for_weight(wt, agran)
            if _skip(s, VIEWS) is _skip(xscale, VIEWS | CONVERTS):
                _verify_act(src, [a, xscale], scheme, k, "q")
                act = _Act("dynamic", src, agran, _dtype(a), a, xscale)
        except _NotDynamic:
            pass
    if act is None:
        act = _Act("static", a, agran, _dtype(a), a, xscale)
    scheme = _scheme_for_weight(wt, agran)
    if t in SCALED_MM_TARGETS:
        bias = _bias_leaf(bias0, n) if bias0 is not None else None
        end, bias, _, _, od = _epilogue(node, n, bias, allow_scales=False)
        out_dtype = od
    elif out_dtype not in FLOAT_DTYPES:
        raise _Miss("_int_mm epilogue does not end in a float tensor")
    return build_match(_Side(anchor=node, end=end, weight_t=b, act=act, weight=wt, scheme=scheme, bias=bias, m=m,
                             act_dtype=_dtype(act.x), out_dtype=out_dtype), static)
