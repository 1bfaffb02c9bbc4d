"""Post-grad ATen graph -> matched quantized linears (the only file that knows graph shapes).

How a linear is found
---------------------
Every matmul node is an *anchor*: ``aten.mm``, ``aten.addmm``,
``aten._scaled_mm`` and ``aten._int_mm``.  From an anchor the matcher walks
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
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx

from . import schemes as S
from .emit import val
from .spec import LayerSpec

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


def module_path(node: fx.Node) -> str:
    """``L['self'].layers[0].mlp`` -> ``layers.0.mlp``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['(self|fn|mod|model|m)'\]\.?", "", str(path))
    path = re.sub(r"^G\['%s'\]\.?" % EXPLAIN_ROOT, "", path)  # the model explain() compiles
    path = re.sub(r"^L\['([^']*)'\]\.?", r"\1.", path)
    path = _MODULE_PART.sub(lambda m: "." + next(g for g in m.groups() if g is not None), path)
    return path.strip(".")


# --- evaluating a region on random data ------------------------------------


def _ancestors(root: fx.Node, stop: set) -> tuple[list[fx.Node], list[fx.Node]]:
    """Nodes of the region ending at ``root``, topologically, and its tensor leaves.

    A node is a leaf when it is in ``stop``, a placeholder, a get_attr, or an
    op outside REGION_OPS.
    """
    seen: set = set()
    inner: list[fx.Node] = []
    leaves: list[fx.Node] = []

    def visit(n: fx.Node) -> None:
        if n in seen:
            return
        seen.add(n)
        if n in stop or n.op in ("placeholder", "get_attr") or n.op != "call_function" or n.target not in REGION_OPS:
            leaves.append(n)
            return
        for a in n.all_input_nodes:
            visit(a)
        inner.append(n)

    visit(root)
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    inner.sort(key=order.__getitem__)
    return inner, leaves


def _evaluate(inner: list[fx.Node], env: dict, outputs: list[fx.Node]) -> list[torch.Tensor]:
    env = dict(env)

    def load(a):
        return env[a] if isinstance(a, fx.Node) else a

    for n in inner:
        args = fx.node.map_arg(n.args, load)
        kwargs = dict(fx.node.map_arg(n.kwargs, load))
        if "device" in kwargs:
            kwargs["device"] = "cpu"
        args = tuple(_hint(a) if isinstance(a, torch.SymInt) else a for a in args)
        args = tuple([_hint(b) for b in a] if isinstance(a, (list, tuple)) and not any(isinstance(b, torch.Tensor) for b in a) else a for a in args)
        env[n] = n.target(*args, **kwargs)
    return [env[o] for o in outputs]


def _bind_symbols(leaves: Iterable[fx.Node], env: dict) -> None:
    for leaf in leaves:
        v = val(leaf)
        if isinstance(v, torch.SymInt):
            env[leaf] = _hint(v)


def _random_like(n: fx.Node, role: str, gen: torch.Generator) -> torch.Tensor:
    v = val(n)
    shape = tuple(_hint(s) for s in v.shape)
    dt = v.dtype
    if dt == torch.float8_e4m3fn:
        t = (torch.randn(shape, generator=gen) * 64).clamp(-448, 448).to(dt)
    elif dt == torch.uint8:
        hi = 16 if role == "zero" else 256
        t = torch.randint(0, hi, shape, generator=gen, dtype=torch.uint8)
    elif dt == torch.int8:
        t = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
    elif dt in (torch.int32, torch.int64):
        hi = 16 if role == "zero" else 100
        t = torch.randint(0, hi, shape, generator=gen, dtype=dt)
    elif role == "zero":
        t = torch.randint(0, 16, shape, generator=gen).to(dt)
    else:  # scales: positive, spread over two decades
        t = (torch.rand(shape, generator=gen) * 2 - 1).exp2().mul(0.05).to(dt)
    return t


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    if tuple(got.shape) != tuple(want.shape):
        return False
    err = S.relative_error(got, want)
    return err <= tol


_VERIFY_CACHE: dict = {}


def _signature(inner: list[fx.Node], leaves: list[fx.Node], extra: tuple) -> tuple:
    index = {n: ("leaf", i) for i, n in enumerate(leaves)}
    index.update({n: ("n", i) for i, n in enumerate(inner)})

    def enc(a):
        if isinstance(a, fx.Node):
            return index.get(a, ("?", a.name))
        if isinstance(a, (list, tuple)):
            return tuple(enc(b) for b in a)
        if isinstance(a, torch.SymInt):
            return ("sym", str(a))
        return repr(a)

    body = tuple((str(n.target), enc(n.args), enc(tuple(sorted(n.kwargs.items())))) for n in inner)
    leafsig = tuple((str(_dtype(n)), tuple(str(s) for s in _shape(n))) for n in leaves)
    return body, leafsig, extra


# --- the weight side ----------------------------------------------------------


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


def _verify_weight_region(wd: fx.Node, inner, leaves, wt: _Weight, scheme: str) -> None:
    """Run the dequantise region on random weights and compare with the scheme's reference."""
    key = _signature(inner, leaves, (scheme, "w"))
    hit = _VERIFY_CACHE.get(key)
    if hit is None:
        gen = torch.Generator().manual_seed(1234)
        env: dict = {}
        _bind_symbols(leaves, env)
        for leaf in leaves:
            if isinstance(val(leaf), torch.Tensor):
                role = "zero" if leaf is wt.zero else "scale" if leaf is wt.scale else "weight"
                env[leaf] = _random_like(leaf, role, gen)
        try:
            (got,) = _evaluate(inner, env, [wd])
        except Exception as exc:  # an op we cannot run on the CPU: treat as no match
            hit = f"could not evaluate the weight's dequantise ops ({type(exc).__name__}: {exc})"
        else:
            params = [env[wt.weight], env[wt.scale]]
            if wt.granularity in ("tensor", "channel"):
                params[1] = params[1].reshape(-1)[0] if wt.granularity == "tensor" else params[1].reshape(-1)
            if wt.zero is not None:
                params.append(env[wt.zero])
            want = S.dequantize_weight(scheme, params, wt.k)
            tol = 1e-5 if got.dtype == torch.float32 else 1e-2
            ok = _close(got.float(), want, tol)
            hit = "" if ok else f"its dequantisation does not compute {scheme}'s (x - zero) * scale reference (relative error {S.relative_error(got, want):.2g})"
        _VERIFY_CACHE[key] = hit
    if hit:
        raise _Miss(hit)


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


def _verify_act(x: fx.Node, outputs: list[fx.Node], scheme: str, k: int, kind: str) -> None:
    """Run the activation chain (x -> outputs) on random data against the reference quantization.

    kind "dq": outputs = [dequantized activation]; kind "q": outputs = [q, scale].
    """
    inner_all: list = []
    leaves_all: list = []
    for o in outputs:
        inner, leaves = _ancestors(o, {x})
        inner_all += [n for n in inner if n not in inner_all]
        leaves_all += [n for n in leaves if n not in leaves_all]
    order = {n: i for i, n in enumerate(x.graph.nodes)}
    inner_all.sort(key=order.__getitem__)
    foreign = [l for l in leaves_all if l is not x and isinstance(val(l), torch.Tensor)]
    if foreign:
        raise _NotDynamic()
    key = _signature(inner_all, leaves_all, (scheme, kind, tuple(outputs.index(o) for o in outputs)))
    hit = _VERIFY_CACHE.get(key)
    if hit is None:
        gen = torch.Generator().manual_seed(4321)
        v = val(x)
        shape = tuple(_hint(s) for s in v.shape)
        m = 1
        for d in shape[:-1]:
            m *= d
        # rows and 128-groups of very different magnitude tell the granularities apart
        base = torch.randn(shape, generator=gen)
        row = torch.exp2(torch.randint(-6, 7, shape[:-1] + (1,), generator=gen).float())
        grp = torch.exp2(torch.randint(-4, 5, shape[:-1] + (max(1, k // S.BLOCK), 1), generator=gen).float())
        if k % S.BLOCK == 0:
            base = (base.reshape(*shape[:-1], k // S.BLOCK, S.BLOCK) * grp).reshape(shape)
        xs = (base * row).to(v.dtype)
        env: dict = {x: xs}
        _bind_symbols(leaves_all, env)
        try:
            got = _evaluate(inner_all, env, outputs)
        except Exception as exc:
            hit = f"could not evaluate the activation quantization ({type(exc).__name__}: {exc})"
        else:
            x2 = xs.reshape(m, k)
            xq, xsc = S.quantize_activation(scheme, x2)
            if kind == "dq":
                want = S.dequantize_activation(scheme, xq, xsc)
                ok = _close(got[0].float().reshape(m, k), want, 1e-3)
            else:
                gq, gs = got
                want = S.dequantize_activation(scheme, xq, xsc)
                gs = gs.float()
                if S.get_scheme(scheme).act_granularity == "group":
                    gs = gs.reshape(m, k // S.BLOCK)
                elif S.get_scheme(scheme).act_granularity == "token":
                    gs = gs.reshape(m, 1)
                else:
                    gs = gs.reshape(())
                gotd = S.dequantize_activation(scheme, gq.reshape(m, k), gs)
                ok = _close(gotd, want, 1e-3) and _close(gs, xsc.float(), 1e-5)
            hit = "" if ok else "the activation quantization does not compute amax(|x|)/qmax scales with round-to-nearest and saturation"
        _VERIFY_CACHE[key] = hit
    if hit:
        raise _Miss(hit)


# --- anchors ----------------------------------------------------------------


def _single_user(n: fx.Node) -> Optional[fx.Node]:
    users = list(n.users)
    return users[0] if len(users) == 1 else None


def _bias_leaf(b: fx.Node, n: int) -> Optional[fx.Node]:
    b = _skip(b, CONVERTS | VIEWS)
    shp = _shape(b)
    if _dtype(b) in FLOAT_DTYPES and shp in ((n,), (1, n)):
        return b
    return None


def _epilogue(anchor: fx.Node, n: int, bias: Optional[fx.Node], allow_scales: bool):
    """Walk the single-user chain after the matmul: (end, bias, x-scale, w-scale, out dtype)."""
    end = anchor
    xs = ws = None
    while True:
        u = _single_user(end)
        if u is None or u.op != "call_function":
            break
        if u.target in CONVERTS:
            end = u
            continue
        if u.target == aten.add.Tensor and bias is None:
            other = u.args[1] if u.args[0] is end else u.args[0]
            leaf = _bias_leaf(other, n) if isinstance(other, fx.Node) else None
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


def _match_anchor(node: fx.Node, static: frozenset) -> Match:
    t = node.target
    if t in MM_TARGETS:
        a, b = (node.args[1], node.args[2]) if t == aten.addmm.default else (node.args[0], node.args[1])
        bias0 = node.args[0] if t == aten.addmm.default else None
    else:
        a, b = node.args[0], node.args[1]
        bias0 = None
    if len(_shape(a)) != 2 or len(_shape(b)) != 2:
        raise _Miss("not a 2-D matmul")
    k, n = _shape(b)
    if not isinstance(n, int) or not isinstance(k, int):
        raise _Miss("N or K is dynamic")
    wd = _strip_transpose(b)
    m = _static(_shape(a)[0])

    if t in MM_TARGETS:
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
        params, shapes = _canonical_weight_params(wt)
        return _make(node, end, act, scheme, wt, params, shapes, bias, n, k, m, act_dtype, out_dtype, b, static)

    # _scaled_mm / _int_mm: the weight is used quantized, as is
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
    params, shapes = _canonical_weight_params(wt)
    return _make(node, end, act, scheme, wt, params, shapes, bias, n, k, m, _dtype(act.x), out_dtype, b, static)


def _make(anchor, end, act: _Act, scheme, wt, params, shapes, bias, n, k, m, act_dtype, out_dtype, b, static) -> Match:
    if act.mode == "static":
        params = params + [act.scale]
        g = act.granularity
        shapes = shapes + [() if g == "tensor" else None]
    spec = LayerSpec(
        scheme=scheme,
        n=n,
        k=k,
        act_dtype=act_dtype,
        out_dtype=out_dtype,
        has_bias=bias is not None,
        group_size=wt.group_size,
        zero_points=wt.zero is not None,
        act_input=act.mode,
        device=val(anchor).device.type if isinstance(val(anchor), torch.Tensor) else "cpu",
        weights_constant=all(p.op == "get_attr" or p in static for p in (wt.weight, wt.scale, wt.zero) if p is not None),
        m=m,
        module=module_path(anchor),
    )
    return Match(spec, anchor, end, act.x, params, shapes, bias, act.q, act.scale, b)


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
        if node.op != "call_function" or node.target not in ANCHORS:
            continue
        try:
            matches.append(_match_anchor(node, static))
        except _Miss as miss:
            b = node.args[2] if node.target == aten.addmm.default else node.args[1]
            kn = _shape(b) if isinstance(b, fx.Node) else ()
            k, n = (kn if len(kn) == 2 else (None, None))
            misses.append(Unmatched(node, module_path(node), str(miss), _static(n), _static(k)))
    return matches, misses
