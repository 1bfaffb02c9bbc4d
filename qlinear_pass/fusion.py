"""What a kernel may compute around its product: the norm or SwiGLU that makes its activation
(a *prologue*) and the residual add that consumes its output.

In a decoder layer at batch 1 each of those is a kernel of its own between the linears (an
RMSNorm before q/k/v and before gate/up, the SwiGLU before down_proj, a residual add after o_proj
and down_proj), each a few microseconds of launch for a few kilobytes of work.  A kernel that
does them as it loads its activation and stores its output (``Kernel.why_not_fuse``) takes them
out of the graph: after the pass has put the layers on their kernels, :func:`fuse` finds them
around each ``qlinear_pass`` call and moves them into one ``qlinear_pass::linear_fused`` call.

The references below compute what the compiled graph computes (fp32 arithmetic, rounded to the
activation dtype where the graph rounds); a kernel that does not fuse runs them around its product
(:meth:`Kernel.run_fused`).
"""
from __future__ import annotations

import dataclasses
import json
import operator
from typing import Optional, Sequence

import torch
import torch.fx as fx

from .emit import RESHAPES, Emitter, val

#: prologues: ``rmsnorm`` (``weight * rmsnorm(x)``, Llama's RMSNorm), ``silu_mul`` (``silu(x) * x2``, SwiGLU)
PROLOGUES = ("rmsnorm", "silu_mul")
#: the epilogue: the output plus a tensor of its shape and dtype
RESIDUAL = "residual"
FUSIONS = (*PROLOGUES, RESIDUAL)


@dataclasses.dataclass(frozen=True)
class Fused:
    """What one ``linear_fused`` call computes around its layers' product."""

    prologue: str = ""
    x2: Optional[torch.Tensor] = None
    norm_weight: Optional[torch.Tensor] = None
    eps: float = 0.0
    residuals: Sequence[Optional[torch.Tensor]] = ()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rmsnorm(x)`` as Llama's RMSNorm computes it: fp32 statistics, rounded to x's
    dtype before the weight."""
    xf = x.float()
    h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * h.float()).to(x.dtype)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """SwiGLU's ``silu(g) * u``: silu in fp32, rounded to g's dtype, times u."""
    gf = g.float()
    s = (gf / (1.0 + torch.exp(-gf))).to(g.dtype)
    return (s.float() * u.float()).to(g.dtype)


def prologue_of(f: Fused, x: torch.Tensor) -> torch.Tensor:
    """The activation ``f``'s prologue makes of ``x``."""
    if f.prologue == "rmsnorm":
        return rmsnorm(x, f.norm_weight, f.eps)
    if f.prologue == "silu_mul":
        return silu_mul(x, f.x2)
    if f.prologue:
        raise ValueError(f"unknown prologue {f.prologue!r} (known: {', '.join(PROLOGUES)})")
    return x


def add_residuals(outs: Sequence[torch.Tensor], residuals: Sequence[Optional[torch.Tensor]]) -> list[torch.Tensor]:
    """Each output plus its residual (None: none), in the output's dtype."""
    return [o if r is None else o + r.reshape(o.shape) for o, r in zip(outs, list(residuals) + [None] * len(outs))]


# --- finding them in a post-grad graph -------------------------------------------------------

aten = torch.ops.aten
prims = torch.ops.prims
_CVT = prims.convert_element_type.default


def _is(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _through_views(n: fx.Node) -> fx.Node:
    """The node whose data ``n`` shows through a chain of views, each read by the next alone."""
    while _is(n, *RESHAPES) and len(n.args[0].users) == 1:
        n = n.args[0]
    return n


def _only_reader(n: fx.Node) -> Optional[fx.Node]:
    """The node that reads ``n``'s data, through views, where it is the only one."""
    while len(n.users) == 1:
        (u,) = n.users
        if not _is(u, *RESHAPES):
            return u
        n = u
    return None


def _f32_of(n) -> Optional[fx.Node]:
    """``x`` where ``n`` is ``convert(x, float32)`` of a 16-bit x."""
    if _is(n, _CVT) and n.args[1] == torch.float32:
        v = val(n.args[0])
        if isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16):
            return n.args[0]
    return None


def _pair(n: fx.Node, target) -> Optional[tuple]:
    if _is(n, target) and len(n.args) == 2 and not n.kwargs:
        return n.args
    return None


def _normalised(n) -> Optional[tuple]:
    """``(x, eps)`` where ``n`` is ``xf * rsqrt(mean(xf ** 2, -1) + eps)``, ``xf`` a 16-bit x in fp32."""
    prod = _pair(n, aten.mul.Tensor)
    if prod is None:
        return None
    for xf, rs in (prod, prod[::-1]):
        x = _f32_of(xf)
        if x is None or not _is(rs, aten.rsqrt.default):
            continue
        add = _pair(rs.args[0], aten.add.Tensor) or _pair(rs.args[0], aten.add.Scalar)
        if add is None or not isinstance(add[1], (int, float)):
            continue
        mean = add[0]
        if not (_is(mean, aten.mean.dim) and len(mean.args) >= 3 and mean.args[2] is True
                and list(mean.args[1]) in ([-1], [val(xf).dim() - 1])):
            continue
        sq = mean.args[0]
        if _pair(sq, aten.pow.Tensor_Scalar) == (xf, 2) or _pair(sq, aten.mul.Tensor) == (xf, xf):
            return x, float(add[1])
    return None


def match_rmsnorm(n: fx.Node) -> Optional[tuple]:
    """``(x, weight, eps)`` where ``n`` is ``weight * convert(xf * rsqrt(mean(xf ** 2, -1) + eps))``,
    ``xf`` x in fp32 (Llama's RMSNorm in a post-grad graph); else None."""
    args = _pair(n, aten.mul.Tensor)
    if args is None:
        return None
    for w, h in (args, args[::-1]):
        if not (_is(h, _CVT) and isinstance(w, fx.Node)):
            continue
        wv, hv = val(w), val(h)
        if not (isinstance(wv, torch.Tensor) and isinstance(hv, torch.Tensor) and wv.dim() == 1
                and wv.shape[0] == hv.shape[-1] and wv.dtype == hv.dtype == h.args[1]):
            continue
        norm = _normalised(h.args[0])
        if norm is not None and val(norm[0]).dtype == hv.dtype:
            return norm[0], w, norm[1]
    return None


#: why an RMSNorm that applies its weight before it rounds stays in the graph (``explain()``)
WEIGHT_FIRST = ("its RMSNorm stays in the graph: it applies its weight in fp32 before it rounds (as torch.nn.RMSNorm "
                "does), where the kernels' prologue computes Hugging Face's Llama form, rounded before the weight")


def is_rmsnorm_weight_first(n: fx.Node) -> bool:
    """Whether ``n`` is ``convert(xf * rsqrt(mean(xf ** 2, -1) + eps) * weight)``: an RMSNorm with its
    weight applied in fp32 and one rounding (``torch.nn.RMSNorm``, ``F.rms_norm``), which no kernel's
    prologue computes (the pass says so rather than fuse another rounding)."""
    args = _pair(n.args[0], aten.mul.Tensor) if _is(n, _CVT) else None
    return args is not None and any(_normalised(a) is not None for a in args)


def _silu_of(n) -> Optional[fx.Node]:
    """``g`` where ``n`` is silu(g) rounded to g's 16-bit dtype: ``aten.silu(g)``, or the
    decompositions ``convert(gf / (1 + exp(-gf)))`` and ``convert(gf * sigmoid(gf))``."""
    if _is(n, aten.silu.default):
        g = n.args[0]
        return g if val(g).dtype in (torch.bfloat16, torch.float16) else None
    if not _is(n, _CVT):
        return None
    inner = n.args[0]
    div = _pair(inner, aten.div.Tensor)
    if div is not None:
        gf, den = div
        add = _pair(den, aten.add.Tensor)
        if add is not None and add[1] == 1 and _is(add[0], aten.exp.default) and _is(add[0].args[0], aten.neg.default) \
                and add[0].args[0].args[0] is gf:
            g = _f32_of(gf)
            return g if g is not None and val(g).dtype == n.args[1] else None
    mul = _pair(inner, aten.mul.Tensor)
    if mul is not None:
        for gf, sg in (mul, mul[::-1]):
            if _is(sg, aten.sigmoid.default) and sg.args[0] is gf:
                g = _f32_of(gf)
                return g if g is not None and val(g).dtype == n.args[1] else None
    return None


def match_silu_mul(n: fx.Node) -> Optional[tuple]:
    """``(g, u)`` where ``n`` is ``silu(g) * u`` of one shape and 16-bit dtype; else None."""
    args = _pair(n, aten.mul.Tensor)
    if args is None:
        return None
    for s, u in (args, args[::-1]):
        g = _silu_of(s)
        if g is None or not isinstance(u, fx.Node):
            continue
        gv, uv, nv = val(g), val(u), val(n)
        if tuple(gv.shape) == tuple(uv.shape) == tuple(nv.shape) and gv.dtype == uv.dtype == nv.dtype:
            return g, u
    return None


def match_residual(out: fx.Node) -> Optional[tuple]:
    """``(add, r)`` where the only reader of ``out`` (through views) is ``add(out, r)`` with ``r``
    of the add's shape and dtype (no broadcast, no type promotion); else None."""
    add = _only_reader(out)
    args = _pair(add, aten.add.Tensor) if add is not None else None
    if args is None:
        return None
    r = args[1] if _through_views(args[0]) is out else args[0]
    if not isinstance(r, fx.Node) or _through_views(r) is out:  # out + out reads no other tensor
        return None
    rv, av, ov = val(r), val(add), val(out)
    if not all(isinstance(v, torch.Tensor) for v in (rv, av, ov)):
        return None
    if tuple(rv.shape) != tuple(av.shape) or not (rv.dtype == av.dtype == ov.dtype) or av.numel() != ov.numel():
        return None
    return add, r


@dataclasses.dataclass
class Site:
    """One ``qlinear_pass`` call the pass emitted: its node, the kernels it may run, and the
    decisions to annotate."""

    node: fx.Node
    kernels: list
    specs: list
    decisions: list


def _can(site: Site, what: str) -> str:
    """"" when every kernel of the site runs ``what`` for every layer of it, else the first reason."""
    for k in site.kernels:
        for s in site.specs:
            why = k.why_not_fuse(s, what)
            if why:
                return f"{k.name}: {why}"
    return ""


def fuse(graph: fx.Graph, sites: Sequence[Site]) -> None:
    """Move the prologue before and the residual add after each site into a
    ``qlinear_pass::linear_fused`` call, where its kernels run them (each decision notes what was
    fused, or why a prologue or residual that was there was not)."""
    live = set(graph.nodes)
    for site in sites:
        node = site.node
        if node not in live:  # its output was never read: dead code already gone
            continue
        single = node.target is torch.ops.qlinear_pass.linear.default
        if single:
            x, params, bias, kernel, spec = node.args
            biases, specs = [bias], json.dumps([spec])
        else:
            x, params, biases, kernel, specs = node.args
        k = val(x).shape[-1]
        notes, prologue, x_new, x2, norm_w, eps = [], "", None, None, None, 0.0
        source = _through_views(x)
        if len(source.users) == 1:  # read by this call alone (through views): nothing else needs it
            norm, swiglu = match_rmsnorm(source), match_silu_mul(source)
            found = ("rmsnorm", norm) if norm else ("silu_mul", swiglu) if swiglu else None
            if found:
                why = _can(site, found[0])
                if why:
                    notes.append(f"{found[0]} before it stays in the graph ({why})")
                elif found[0] == "rmsnorm":
                    prologue, (x_new, norm_w, eps) = "rmsnorm", norm
                else:
                    prologue, (x_new, x2) = "silu_mul", swiglu
            elif is_rmsnorm_weight_first(source):
                notes.append(WEIGHT_FIRST)
        residual = match_residual(node) if single else None
        if residual is not None:
            why = _can(site, RESIDUAL)
            if why:
                notes.append(f"the residual add after it stays in the graph ({why})")
                residual = None
        if not prologue and residual is None:
            for d in site.decisions:
                d.note = "; ".join(filter(None, [d.note, *notes]))
            continue
        add = residual[0] if residual is not None else None
        emit = Emitter(graph, add if add is not None else node, node)
        if prologue:
            x = emit(aten.reshape.default, x_new, [-1, k])
            if x2 is not None:
                x2 = emit(aten.reshape.default, x2, [-1, k])
        residuals = [None] * len(json.loads(specs))
        if residual is not None:
            residuals[0] = emit(aten.reshape.default, residual[1], [-1, val(node).shape[-1]])
        new = emit(torch.ops.qlinear_pass.linear_fused.default, x, x2, list(params), list(biases), residuals,
                   norm_w, eps, prologue, kernel, specs)
        if residual is not None:  # the add's readers read the call; the old call and its views are dead
            add.replace_all_uses_with(emit(aten.reshape.default, emit(operator.getitem, new, 0), list(val(add).shape)))
        elif single:
            node.replace_all_uses_with(emit(operator.getitem, new, 0))
        else:
            node.replace_all_uses_with(new)
        done = [w for w, on in (({"rmsnorm": "the RMSNorm before it", "silu_mul": "the SwiGLU before it"}.get(prologue), prologue),
                                ("the residual add after it", residual is not None)) if on]
        for d in site.decisions:
            d.note = "; ".join(filter(None, [d.note, f"{' and '.join(done)} run{'' if len(done) > 1 else 's'} in the kernel", *notes]))

