"""What every matcher shares: the match types, the op sets, and the weight, activation and
epilogue helpers."""
from __future__ import annotations

import dataclasses
import math
import re
import weakref
from typing import Any, Optional

import torch
import torch.fx as fx

from .. import schemes as S
from ..emit import val
from ..kernels.int4_layout import MMA16, PUBLIC
from ..kernels.ops import FROM_MMA16
from ..spec import LayerSpec

aten = torch.ops.aten
prims = torch.ops.prims

MM_TARGETS = {aten.mm.default, aten.addmm.default}
SCALED_MM_TARGETS = {aten._scaled_mm.default}
INT_MM_TARGETS = {aten._int_mm.default}
ANCHORS = MM_TARGETS | SCALED_MM_TARGETS | INT_MM_TARGETS

CONVERTS = {prims.convert_element_type.default, aten._to_copy.default}
VIEWS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.default,
    aten.expand.default,
    aten.clone.default,
    aten.alias.default,
}
TRANSPOSES = {aten.permute.default, aten.t.default, aten.transpose.int}
QUANT_DTYPES = {torch.float8_e4m3fn, torch.int8}
FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}

# the ops a dequantise or quantize region may consist of (anything else ends it)
def _resolve(names: str) -> set:
    """ATen overloads by name; ones this torch lacks are skipped."""
    out = set()
    for name in names.split():
        op, _, overload = name.partition(".")
        packet = getattr(aten, op, None)
        target = getattr(packet, overload or "default", None) if packet is not None else None
        if target is not None:
            out.add(target)
    return out


REGION_OPS = CONVERTS | VIEWS | TRANSPOSES | _resolve(
    "mul.Tensor mul.Scalar div.Tensor div.Scalar sub.Tensor sub.Scalar add.Tensor add.Scalar "
    "neg reciprocal abs amax max clamp clamp_min clamp_max round "
    "bitwise_and.Scalar bitwise_and.Tensor bitwise_right_shift.Tensor bitwise_right_shift.Tensor_Scalar "
    "__rshift__.Scalar __rshift__.Tensor __and__.Scalar __and__.Tensor "
    "cat stack repeat_interleave.self_int repeat_interleave.Tensor slice.Tensor index.Tensor "
    "iota full scalar_tensor where.self sym_size.int"
)


@dataclasses.dataclass
class Match:
    """One quantized linear found in the graph."""

    spec: LayerSpec
    anchor: fx.Node
    end: fx.Node  # the node whose uses the replacement takes over ([M, N])
    x: fx.Node  # the activation the kernel receives (float, or quantized when static)
    params: list  # canonical parameter nodes (see schemes.py), input_scale last when static
    param_shapes: list  # canonical shape for each param (None: keep as is)
    bias: Optional[fx.Node]
    act_q: Optional[fx.Node] = None  # the graph's own quantized activation (dynamic chains)
    act_scale: Optional[fx.Node] = None  # and its scale
    weight_t: Optional[fx.Node] = None  # the [K, N] operand as the graph has it
    # the graph widens the layer's output (``spec.out_dtype``) to ``end``'s dtype, its rounding folded
    # away (see _folded_rounding): the replacement rounds, then widens
    widened: bool = False


@dataclasses.dataclass
class Unmatched:
    """A matmul the matcher saw but could not turn into a quantized linear."""

    node: fx.Node
    module: str
    reason: str
    n: Optional[int] = None
    k: Optional[int] = None


class _Miss(Exception):
    """This matmul is not a quantized linear we can replace (the message says why)."""


class _NotDynamic(_Miss):
    """The activation's quantization is not computed in the graph from a float activation
    alone (a given scale, say): treat the quantized activation as an input ("static")."""

    def __init__(self) -> None:
        super().__init__("unrecognised activation quantization")


def _shape(n: fx.Node) -> tuple:
    v = val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _dtype(n: Any) -> Optional[torch.dtype]:
    v = val(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _hint(x: Any) -> Any:
    if isinstance(x, torch.SymInt):
        h = x.node.hint
        if h is None:
            raise _Miss("a symbolic size without a hint")
        return int(h)
    return x


def _static(x: Any) -> Optional[int]:
    return x if isinstance(x, int) else None


#: the global name under which explain() hands the model to Dynamo
EXPLAIN_ROOT = "_qlinear_explain_model"
_MODULE_PART = re.compile(r"\._modules\['([^']*)'\]|\[(\d+)\]|\['([^']*)'\]")
#: what Dynamo names the object a traced frame started from: a local or global, then the
#: indexing that reached the module (``L['self']``, ``L['args'][0]``, ``G['model']``)
_ROOT = re.compile(r"""^[LG]\[(?:'([^']*)'|"([^"]*)")\]((?:\[\d+\])*)""")
#: ``.forward._torchdynamo_inline.__self__``: a hop through a bound method back to its module
#: (a bare ``.__self__`` when the frame's root is the bound method itself)
_BOUND = re.compile(r"(?:\.[A-Za-z_]\w*)?(?:\._torchdynamo_inline|\._torchdynamo_orig_callable)*\.__self__(?=\.|$)")
_GRAPH_ROOTS: "weakref.WeakKeyDictionary[fx.Graph, frozenset]" = weakref.WeakKeyDictionary()


def _split_root(path: str) -> tuple[str, str]:
    """``L['args'][0].model.layers.0`` -> (``args.0``, ``.model.layers.0``); the root named as
    its frame knows it, ``""`` for the model explain() compiles."""
    m = _ROOT.match(path)
    if m is None:
        return "", "." + path
    name = m.group(1) if m.group(1) is not None else m.group(2)
    root = "" if name == EXPLAIN_ROOT else name + "".join("." + i for i in re.findall(r"\d+", m.group(3)))
    return root, path[m.end():]


def _roots(graph: fx.Graph) -> frozenset:
    """The roots the module paths of ``graph`` start from (explain()'s model not counted)."""
    roots = _GRAPH_ROOTS.get(graph)
    if roots is None:
        found = set()
        for n in graph.nodes:
            for path, *_ in (n.meta.get("nn_module_stack") or {}).values():
                root = _split_root(str(path))[0]
                if root:
                    found.add(root)
        roots = _GRAPH_ROOTS[graph] = frozenset(found)
    return roots


def module_path(node: fx.Node) -> str:
    """The module's name as ``model.named_modules()`` gives it.

    Dynamo names modules from the frame it traced: ``L['self'].layers[0].mlp`` for a compiled
    module, ``L['args'][0].model.layers.0.mlp`` for a Hugging Face forward (a decorated
    ``forward(*args)``), ``G['net']._modules['0']`` for a global, through
    ``forward._torchdynamo_inline.__self__`` for a module whose ``forward`` was compiled.  The
    root is dropped when the whole graph starts from one (one model: ``layers.0.mlp``, as
    ``named_modules()`` names it); when a compiled function reaches modules from several
    roots, each keeps its root's name (``enc.layers.0``, ``args.1.fc``) to tell them apart.
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    root, rest = _split_root(str(list(stack.values())[-1][0]))
    rest = _MODULE_PART.sub(lambda m: "." + next(g for g in m.groups() if g is not None), rest)
    rest = _BOUND.sub("", rest).strip(".")
    if root and node.graph is not None and len(_roots(node.graph)) > 1:
        return f"{root}.{rest}" if rest else root
    return rest


@dataclasses.dataclass
class _Weight:
    scheme_family: str  # "fp8", "int8", "int4"
    granularity: str  # tensor / channel / block / group
    weight: fx.Node
    scale: Optional[fx.Node]
    zero: Optional[fx.Node]
    n: int
    k: int
    group_size: Optional[int] = None
    #: other granularities the same scale shape means (one 128x128 block is one tensor scale)
    alts: tuple = ()


def _strip_transpose(b: fx.Node) -> fx.Node:
    if b.op == "call_function" and b.target in TRANSPOSES and len(_shape(b)) == 2:
        if b.target == aten.permute.default and list(b.args[1]) not in ([1, 0], [-1, -2], [-1, 0], [1, -2]):
            raise _Miss("the weight operand is permuted, not transposed")
        return b.args[0]
    raise _Miss("the weight operand is not a transposed [N, K] tensor (expected w.t() / permute(w, [1, 0]))")


def _classify_weight_leaves(leaves: list[fx.Node], n: int, k: int) -> _Weight:
    tensors = [l for l in leaves if isinstance(val(l), torch.Tensor)]
    quant = [l for l in tensors if _dtype(l) in (torch.float8_e4m3fn, torch.int8) and _shape(l) == (n, k)]
    packed = [l for l in tensors if _dtype(l) == torch.uint8 and _shape(l) == (n, k // 2)]
    if any(isinstance(s, torch.SymInt) for l in tensors for s in _shape(l)):
        raise _Miss("the weight operand depends on a tensor with a dynamic shape (the activation?)")
    others = [l for l in tensors if l not in quant and l not in packed]
    if len(quant) + len(packed) != 1:
        if not quant and not packed and all(_dtype(l) in FLOAT_DTYPES for l in tensors):
            raise _Miss("float weight: not a quantized linear")
        raise _Miss(f"expected one quantized weight [N, K] (int8/fp8) or packed int4 [N, K/2] (uint8) among {[(_dtype(l), _shape(l)) for l in tensors]}")
    if quant:
        w = quant[0]
        fam = "fp8" if _dtype(w) == torch.float8_e4m3fn else "int8"
        if len(others) != 1:
            raise _Miss(f"expected one weight scale next to the {fam} weight, found {len(others)}")
        sc = others[0]
        numel = 1
        for d in _shape(sc):
            numel *= d
        one_block = k == S.BLOCK and n <= S.BLOCK
        if numel == 1:
            gran, alts = "tensor", (("block",) if one_block else ())
        elif numel == n and max(_shape(sc)) == n:
            gran, alts = "channel", ()
        elif _shape(sc) == (-(-n // S.BLOCK), k // S.BLOCK) and k % S.BLOCK == 0:
            gran, alts = "block", ()
        else:
            raise _Miss(f"weight scale of shape {_shape(sc)} is neither per-tensor, per-channel [N] nor 128x128 blocks")
        return _Weight(fam, gran, w, sc, None, n, k, alts=alts)
    w = packed[0]
    cand = [l for l in others if len(_shape(l)) == 2 and _shape(l)[0] == n and k % _shape(l)[1] == 0]
    floats = [l for l in cand if _dtype(l) in FLOAT_DTYPES]
    if not floats or len(cand) > 2 or len(others) != len(cand):
        raise _Miss(f"int4 weight needs group scales [N, K/group] (and optionally zero points), found {[(_dtype(l), _shape(l)) for l in others]}")
    if len(cand) == 1:
        scale, zero = cand[0], None
    else:
        ints = [l for l in cand if _dtype(l) not in FLOAT_DTYPES]
        scale, zero = (floats[0], ints[0]) if ints else (None, None)
        if scale is None:
            raise _Miss("two float group tensors next to an int4 weight: cannot tell scales from zero points")
    if _shape(zero or scale) != _shape(scale):
        raise _Miss("zero points and scales differ in shape")
    gs = k // _shape(scale)[1]
    if gs not in S.GROUP_SIZES:
        raise _Miss(f"int4 group size {gs} is not one of {S.GROUP_SIZES}")
    return _Weight("int4", "group", w, scale, zero, n, k, gs)


def _canonical_weight_params(wt: _Weight) -> tuple[list, list]:
    """Parameter nodes and the shape each must have for kernels (None: as is)."""
    n, k = wt.n, wt.k
    if wt.granularity == "tensor":
        return [wt.weight, wt.scale], [None, ()]
    if wt.granularity == "channel":
        return [wt.weight, wt.scale], [None, (n,)]
    if wt.granularity == "block":
        return [wt.weight, wt.scale], [None, (-(-n // S.BLOCK), k // S.BLOCK)]
    return [wt.weight, wt.scale, wt.zero], [None, None, None]


_SCHEME_TABLE = {
    ("fp8", "tensor", "tensor"): "fp8_tensor",
    ("fp8", "channel", "token"): "fp8_rowwise",
    ("fp8", "block", "group"): "fp8_block",
    ("int8", "channel", "token"): "int8_rowwise",
    ("int8", "channel", None): "int8_weight_only",
    ("fp8", "channel", None): "fp8_weight_only",
    ("int4", "group", None): "w4a16",
}


def _scheme_for_weight(wt: _Weight, act: "Optional[str] | list") -> str:
    """The scheme of a weight and an activation granularity (or candidates, first that fits).

    Picks among equivalent readings of one scale shape and fixes
    ``wt.granularity`` to the one used.
    """
    acts = act if isinstance(act, list) else [act]
    for wg in (wt.granularity, *wt.alts):
        for ag in acts:
            scheme = _SCHEME_TABLE.get((wt.scheme_family, wg, ag))
            if scheme is not None:
                wt.granularity, wt.alts = wg, ()
                return scheme
    a = f"{acts[0]} activation scales" if acts[0] else "float activations"
    raise _Miss(f"{wt.scheme_family} weights with {wt.granularity} scales and {a} is not a supported scheme")


def _act_of(scheme: str) -> Optional[str]:
    return S.get_scheme(scheme).act_granularity


# --- the activation side ------------------------------------------------------


@dataclasses.dataclass
class _Act:
    mode: str  # "none", "dynamic", "static"
    x: fx.Node  # float source (none/dynamic) or quantized activation (static)
    granularity: Optional[str] = None
    dtype: Optional[torch.dtype] = None  # quantized dtype
    q: Optional[fx.Node] = None
    scale: Optional[fx.Node] = None


def _skip(n: fx.Node, targets: set) -> fx.Node:
    while n.op == "call_function" and n.target in targets:
        n = n.args[0]
    return n


def _widened_from(n: fx.Node) -> fx.Node:
    """The float activation a chain of lossless converts (bf16 / fp16 -> fp32) starts from: a
    narrowing convert (the previous layer's output cast to bf16) is kept, so the activation a
    kernel gets has the values the graph computes."""
    while n.op == "call_function" and n.target in CONVERTS:
        src, dst = _dtype(n.args[0]), _dtype(n)
        if src not in FLOAT_DTYPES or not (src == dst or dst == torch.float32):
            break
        n = n.args[0]
    return n


def _find_quantized(a: fx.Node, depth: int = 8) -> Optional[fx.Node]:
    """The nearest fp8/int8 node above ``a`` through dequantise ops (convert, mul, views)."""
    frontier = [a]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if _dtype(n) in QUANT_DTYPES:
                return n
            if n.op == "call_function" and n.target in (CONVERTS | VIEWS | {aten.mul.Tensor, aten.div.Tensor}):
                nxt += [x for x in n.args if isinstance(x, fx.Node)]
        frontier = nxt
    return None


def _act_granularity(scale: fx.Node, k: int) -> Optional[str]:
    """[] / [1, 1] -> tensor, [M, 1] -> token, [M, K/128] (or [M, K/128, 1]) -> group."""
    dims = list(_shape(scale))
    while dims and isinstance(dims[-1], int) and dims[-1] == 1:
        dims.pop()
    if all(isinstance(d, int) and d == 1 for d in dims):
        return "tensor"
    if len(dims) == 1:
        return "token"
    if len(dims) == 2 and isinstance(dims[1], int) and dims[1] == k // S.BLOCK and k % S.BLOCK == 0:
        return "group"
    return None


def _act_candidates(scale: fx.Node, k: int) -> list:
    """Activation granularities one scale shape can mean.

    A [M, 1] scale is per token and, when K == 128, per 1x128 group too; with
    one row (M == 1) a [1, 1] scale is also per tensor.  The numeric check of
    the chain still decides whether the math is right.
    """
    g = _act_granularity(scale, k)
    if g is None:
        return []
    cands = [g]
    if g == "token" and k == S.BLOCK:
        cands.append("group")
    if g == "tensor" and len(_shape(scale)) >= 2:
        cands += ["token"] + (["group"] if k == S.BLOCK else [])
    return cands


def _trace_quant_chain(q: fx.Node, k: int) -> tuple[fx.Node, fx.Node]:
    """q = convert(clamp(x / s)) -> (float source x, scale s)."""
    t = q.args[0] if q.op == "call_function" and q.target in CONVERTS else None
    if t is None:
        raise _NotDynamic()
    t = _skip(t, {aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.round.default} | VIEWS | CONVERTS)
    if t.op != "call_function" or t.target not in (aten.div.Tensor, aten.mul.Tensor):
        raise _NotDynamic()
    a, b = t.args[0], t.args[1]
    if not isinstance(b, fx.Node):
        raise _NotDynamic()
    scale = b
    if t.target == aten.mul.Tensor:  # x * (1 / s)
        scale = b.args[0] if b.op == "call_function" and b.target == aten.reciprocal.default else b
    src = a
    best = None
    while True:
        shp = _shape(src)
        if _dtype(src) in FLOAT_DTYPES and len(shp) == 2 and shp[-1] == k:
            best = src
        if src.op == "call_function" and src.target in (CONVERTS | VIEWS):
            src = src.args[0]
            continue
        break
    if _dtype(src) not in FLOAT_DTYPES or _shape(src)[-1:] != (k,):
        if best is None:
            raise _NotDynamic()
    return (best if best is not None else src), scale


# --- anchors ----------------------------------------------------------------


def _single_user(n: fx.Node) -> Optional[fx.Node]:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _bias_leaf(b: fx.Node, n: int, rows: Optional[int] = None) -> Optional[fx.Node]:
    """The bias ``b`` is, through converts and views: [N], or [1, N] unless the output is known to
    have one row (``rows``), where a [1, N] addend is as likely an activation (a residual add,
    ``fusion.py``) as a bias."""
    b = _skip(b, CONVERTS | VIEWS)
    shp = _shape(b)
    if _dtype(b) in FLOAT_DTYPES and (shp == (n,) or shp == (1, n) and rows != 1):
        return b
    return None


def _epilogue(anchor: fx.Node, n: int, bias: Optional[fx.Node], allow_scales: bool):
    """Walk the single-user chain after the matmul: (end, bias, x-scale, w-scale, out dtype)."""
    end = anchor
    xs = ws = None
    narrowed = False
    while True:
        u = _single_user(end)
        if u is None or u.op != "call_function":
            break
        if u.target in CONVERTS:
            src, dst = _dtype(end), _dtype(u)
            wider = src is not None and dst is not None and dst.itemsize > src.itemsize
            if wider and (narrowed or src in (torch.bfloat16, torch.float16)):
                # the layer's output is 16-bit (the matmul's, or rounded to it), then widened by its
                # reader (the next linear, a norm or SwiGLU computing in fp32): the layer ends before
                break
            narrowed = narrowed or (src is not None and dst is not None and dst.itemsize < src.itemsize)
            end = u
            continue
        if u.target == aten.add.Tensor and bias is None:
            other = u.args[1] if u.args[0] is end else u.args[0]
            out = _shape(end)
            rows = math.prod(out[:-1]) if out and all(isinstance(d, int) for d in out) else None
            leaf = _bias_leaf(other, n, rows) if isinstance(other, fx.Node) else None
            if leaf is None:
                break
            bias, end = leaf, u
            continue
        if allow_scales and u.target == aten.mul.Tensor and bias is None:
            other = u.args[1] if u.args[0] is end else u.args[0]
            if not isinstance(other, fx.Node):
                break
            shp = _shape(other)
            if shp and shp[-1] == n and all(d == 1 for d in shp[:-1]) and ws is None:
                ws, end = other, u
                continue
            if len(shp) == 2 and shp[-1] == 1 and xs is None:
                xs, end = other, u
                continue
            if all(isinstance(d, int) and d == 1 for d in shp) and xs is None:
                xs, end = other, u
                continue
            break
        break
    return end, bias, xs, ws, _dtype(end)


@dataclasses.dataclass
class _Side:
    """What a matcher found, before it becomes a :class:`Match`."""

    anchor: fx.Node  # the matmul
    end: fx.Node  # the last node of the epilogue
    weight_t: fx.Node  # the [K, N] operand as the graph has it
    act: "_Act"
    weight: "_Weight"
    scheme: str
    bias: Optional[fx.Node]
    m: Optional[int]  # M when fixed in the graph
    act_dtype: torch.dtype
    out_dtype: torch.dtype


def build_match(found: _Side, static: frozenset) -> Match:
    """The :class:`Match` (and its :class:`LayerSpec`) of what a matcher found."""
    wt, act = found.weight, found.act
    params, shapes = _canonical_weight_params(wt)
    layout = PUBLIC
    w = wt.weight
    if w.op == "call_function" and w.target == FROM_MMA16:
        # a layer holding its weight in the MMA-fragment layout: the kernels get the packed tensor
        # (those that read that layout; the selection loop turns the others away)
        layout, params[0] = MMA16, w.args[0]
    if act.mode == "static":
        params = params + [act.scale]
        shapes = shapes + [() if act.granularity == "tensor" else None]
    anchor_val = val(found.anchor)
    out_dtype, widened = found.out_dtype, False
    if out_dtype == torch.float32 and found.act_dtype in (torch.bfloat16, torch.float16) \
            and _folded_rounding(found.anchor, found.end):
        out_dtype, widened = found.act_dtype, True
    spec = LayerSpec(
        scheme=found.scheme,
        n=wt.n,
        k=wt.k,
        act_dtype=found.act_dtype,
        out_dtype=out_dtype,
        has_bias=found.bias is not None,
        group_size=wt.group_size,
        zero_points=wt.zero is not None,
        act_input=act.mode,
        device=anchor_val.device.type if isinstance(anchor_val, torch.Tensor) else "cpu",
        weights_constant=all(p.op == "get_attr" or p in static for p in (params[0], wt.scale, wt.zero) if p is not None),
        m=found.m,
        module=module_path(found.anchor),
        weight_layout=layout,
    )
    return Match(spec, found.anchor, found.end, act.x, params, shapes, found.bias, act.q, act.scale, found.weight_t,
                 widened)


def _folded_rounding(anchor: fx.Node, end: fx.Node) -> bool:
    """Whether the layer's float32 output comes through a convert to its own dtype and through no
    narrowing one: what Inductor of torch 2.11 leaves of convert(convert(y, bf16), float32), the
    layer's rounding to its 16-bit activation dtype and its reader's widening folded into one.  No
    trace makes such a convert (a no-op ``.to`` leaves none), so the eager module rounded there."""
    folded, n = False, anchor
    while n is not end:  # the epilogue's chain of single users (_epilogue)
        n = _single_user(n)
        if n is None:
            return False
        if n.target in CONVERTS:
            src, dst = _dtype(n.args[0]), _dtype(n)
            if src == dst:
                folded = True
            elif src is None or dst is None or dst.itemsize < src.itemsize:
                return False
    return folded


def operands(node: fx.Node) -> tuple:
    """(activation, [K, N] weight operand, weight [N, K], N, K, M or None) of a 2-D matmul anchor."""
    a, b = (node.args[1], node.args[2]) if node.target == aten.addmm.default else (node.args[0], node.args[1])
    if len(_shape(a)) != 2 or len(_shape(b)) != 2:
        raise _Miss("not a 2-D matmul")
    k, n = _shape(b)
    if not isinstance(n, int) or not isinstance(k, int):
        raise _Miss("N or K is dynamic")
    return a, b, _strip_transpose(b), n, k, _static(_shape(a)[0])
