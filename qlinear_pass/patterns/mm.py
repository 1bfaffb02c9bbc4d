"""The matcher of ``mm`` / ``addmm`` anchors: dequantise-then-linear (weight-only schemes, our
reference modules) and a dynamically quantized activation dequantized before a float matmul."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..emit import val
from .common import (  # noqa: F401
    CONVERTS,
    TRANSPOSES,
    _static,
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
    _widened_from,
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
from .common import VIEWS, _Weight, _shape, _single_user
from .regions import _ancestors, _verify_act, _verify_weight_operand, _verify_weight_region

#: ``torch._weight_int8pack_mm(x, w_int8 [N, K], scales [N])``: an int8 weight-only linear already
INT8PACK_TARGETS = {aten._weight_int8pack_mm.default}

#: tinygemm's packed int4 matmuls ``(x, packed, group_size, scales_and_zeros [K/g, N, 2])``: torchao's
#: ``Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")`` and gpt-fast's int4 on CUDA, the
#: CPU form.  Listed by ``explain()`` with why (``miss_int4pack``), never matched.
INT4PACK_TARGETS = {getattr(aten, name).default for name in ("_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu")
                    if hasattr(aten, name)}


def int4pack_nk(node: fx.Node) -> tuple:
    """(N, K) of a tinygemm int4 matmul, as far as its shapes say."""
    k = (_shape(node.args[0]) or (None,))[-1]
    sz = _shape(node.args[3]) if len(node.args) > 3 else ()
    return (sz[1] if len(sz) == 3 else None), k


def miss_int4pack(node: fx.Node) -> Match:
    """Why a tinygemm int4 matmul is not retargeted: its weight format is not a scheme's."""
    raise _Miss(f"tinygemm's packed int4 weight ({node.target}): its zero points are bf16 offsets added after "
                "scaling, w = (q - 8) * s + z, where w4a16 takes integer zero points, w = (q - z) * s; no scheme "
                "has it, so the graph keeps tinygemm's kernel")


def _mm_operands(node: fx.Node) -> tuple:
    """:func:`operands`, and whether the transpose sits inside the dequantise region.

    ``mm(x, dequant(w).t())`` gives the dequantise region ending at ``w``'s dequantisation;
    ``mm(x, convert(permute(w)))`` (torchao's weight-only tensors dequantise after the
    transpose) gives the region ending at the ``[K, N]`` operand itself.
    """
    try:
        return (*operands(node), False)
    except _Miss as miss:
        a, b = (node.args[1], node.args[2]) if node.target == aten.addmm.default else (node.args[0], node.args[1])
        if len(_shape(a)) != 2 or len(_shape(b)) != 2:
            raise
        k, n = _shape(b)
        if not isinstance(n, int) or not isinstance(k, int):
            raise
        inner, _ = _ancestors(b, set())
        if not any(x.target in TRANSPOSES for x in inner):
            raise miss
        return a, b, b, n, k, _static(_shape(a)[0]), True


def _post_scale(node: fx.Node, n: int) -> tuple:
    """A per-output-channel multiply after the matmul (through casts and views that keep N last):
    ``(mul node, scale operand)``, or ``(None, None)``."""
    cur = node
    while True:
        u = _single_user(cur)
        if u is None or u.op != "call_function":
            return None, None
        if u.target in CONVERTS or (u.target in VIEWS and _shape(u)[-1:] == (n,)):
            cur = u
            continue
        if u.target == aten.mul.Tensor and len(u.args) == 2 and (u.args[0] is cur) != (u.args[1] is cur):
            other = u.args[1] if u.args[0] is cur else u.args[0]
            shp = _shape(other) if isinstance(other, fx.Node) else ()
            if shp and shp[-1] == n and all(d == 1 for d in shp[:-1]) and _dtype(other) in FLOAT_DTYPES:
                return u, other
        return None, None


def _refuse_int8_zero_points(leaves: list, n: int, k: int) -> None:
    """An int8-stored [N, K] weight with integer zero points (torchao's ``IntxWeightOnlyConfig``,
    int8 or int4 values alike) has no scheme: say so rather than "found 2 scales"."""
    tensors = [l for l in leaves if isinstance(val(l), torch.Tensor)]
    w = [l for l in tensors if _dtype(l) == torch.int8 and _shape(l) == (n, k)]
    ints = [l for l in tensors if l not in w and _dtype(l) in (torch.int8, torch.uint8, torch.int32, torch.int64)
            and len(_shape(l)) == 2 and _shape(l)[0] == n]
    if len(w) != 1 or not ints:
        return
    groups = _shape(ints[0])[1]
    per = "per channel" if groups == 1 else f"in groups of {k // groups} along K" if k % groups == 0 else f"{groups} groups"
    raise _Miss(
        f"int8-stored weight with {_dtype(ints[0])} zero points {per} (torchao IntxWeightOnlyConfig's layout): "
        "no scheme has it (int8_weight_only has no zero points; w4a16 takes int4 packed two to a uint8 [N, K/2] "
        "with uint8 zero points, which this graph does not hold)")


def match_mm(node: fx.Node, static: frozenset) -> Match:
    """``mm`` / ``addmm`` whose weight operand is a dequantise region (weight-only schemes, or a
    dynamically quantized activation dequantized before a float matmul)."""
    a, b, wd, n, k, m, after_t = _mm_operands(node)
    bias0 = node.args[0] if node.target == aten.addmm.default else None
    inner, leaves = _ancestors(wd, set())
    post, post_scale = None, None
    tensors = [l for l in leaves if isinstance(val(l), torch.Tensor)]
    if len(tensors) == 1 and _dtype(tensors[0]) in (torch.int8, torch.float8_e4m3fn):
        # the weight alone is converted: its scale multiplies the matmul's output (torchao's
        # Int8/Float8WeightOnlyConfig, gpt-fast's ``F.linear(x, w.to(dt)) * scales``)
        post, post_scale = _post_scale(node, n)
        if post is not None:
            leaves = leaves + [l for l in _ancestors(post_scale, set())[1] if l not in leaves]
    _refuse_int8_zero_points(leaves, n, k)
    wt = _classify_weight_leaves(leaves, n, k)
    q = _find_quantized(a)
    if post is not None and q is not None:
        raise _Miss("the weight's scale multiplies the output of a matmul whose activation is quantized: not a weight-only scheme")
    if q is None:
        act = _Act("none", _widened_from(a))
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
    if post is not None or after_t:
        _verify_weight_operand(b, wt, scheme, post_scale)
    else:
        _verify_weight_region(wd, inner, leaves, wt, scheme)
    bias = _bias_leaf(bias0, n) if bias0 is not None else None
    if bias0 is not None and bias is None:
        raise _Miss("addmm's added tensor is not a [N] bias")
    if post is not None and bias is not None:
        raise _Miss("the weight's scale multiplies the output after the bias was added (the bias is scaled too)")
    start = post if post is not None else node
    if bias is None:  # torchao adds the bias after viewing the [M, N] output back to 3-D
        while (u := _single_user(start)) is not None and u.op == "call_function" and u.target in VIEWS and _shape(u)[-1:] == (n,):
            start = u
    end, bias, _, _, out_dtype = _epilogue(start, n, bias, allow_scales=False)
    if act.mode == "none":
        act_dtype = _dtype(act.x)
        if out_dtype == torch.float32 and act_dtype != torch.float32:
            out_dtype = torch.float32
    else:
        act_dtype = _dtype(act.x)
    return build_match(_Side(anchor=node, end=end, weight_t=b, act=act, weight=wt, scheme=scheme, bias=bias, m=m,
                             act_dtype=act_dtype, out_dtype=out_dtype), static)



def match_int8pack(node: fx.Node, static: frozenset) -> Match:
    """A direct ``torch._weight_int8pack_mm(x, w, scales)`` call: int8 weight-only, retargeted."""
    x, w, sc = node.args[:3]
    if len(_shape(x)) != 2 or len(_shape(w)) != 2:
        raise _Miss("_weight_int8pack_mm with operands that are not 2-D")
    n, k = _shape(w)
    if not isinstance(n, int) or not isinstance(k, int):
        raise _Miss("N or K is dynamic")
    if _dtype(w) != torch.int8:
        raise _Miss(f"_weight_int8pack_mm with a {_dtype(w)} weight (int8 expected)")
    if _dtype(x) not in FLOAT_DTYPES:
        raise _Miss(f"_weight_int8pack_mm with a {_dtype(x)} activation")
    if _shape(sc) != (n,):
        raise _Miss(f"_weight_int8pack_mm scales of shape {_shape(sc)}, not [N] = [{n}]")
    wt = _Weight("int8", "channel", w, sc, None, n, k)
    scheme = _scheme_for_weight(wt, None)
    end, bias, _, _, out_dtype = _epilogue(node, n, None, allow_scales=False)
    return build_match(_Side(anchor=node, end=end, weight_t=w, act=_Act("none", x), weight=wt, scheme=scheme, bias=bias,
                             m=_static(_shape(x)[0]), act_dtype=_dtype(x), out_dtype=out_dtype), static)
