"""Numeric region checks: run a dequantise or quantize region of the graph on random data and
compare it with the scheme's reference, so that every spelling of the same math matches and a
look-alike that computes something else does not (the reason says why).

A region runs at the layer's full size (its reshapes name the sizes), on the device its tensors
live on: on a GPU an 8B model's checks take milliseconds, where on the CPU, drawing and
dequantising tens of millions of random weights took more than a second of every compile."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx

from .. import schemes as S
from ..emit import val
from .common import (  # noqa: F401
    REGION_OPS,
    _Miss,
    _NotDynamic,
    _Weight,
    _dtype,
    _hint,
    _shape,
)


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


def _device(nodes: Iterable[fx.Node]) -> torch.device:
    """Where a region runs: the GPU its tensors are on (when this process can use it and is not
    capturing a CUDA graph, which would record the check), else the CPU."""
    for n in nodes:
        v = val(n)
        if isinstance(v, torch.Tensor) and v.device.type == "cuda" and torch.cuda.is_available():
            with torch.cuda.device(v.device):
                if not torch.cuda.is_current_stream_capturing():
                    return v.device
    return torch.device("cpu")


def _evaluate(inner: list[fx.Node], env: dict, outputs: list[fx.Node], device: torch.device) -> list[torch.Tensor]:
    env = dict(env)

    def load(a):
        return env[a] if isinstance(a, fx.Node) else a

    for n in inner:
        args = fx.node.map_arg(n.args, load)
        kwargs = dict(fx.node.map_arg(n.kwargs, load))
        if "device" in kwargs:
            kwargs["device"] = device
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
    on = {"generator": gen, "device": gen.device}
    if dt == torch.float8_e4m3fn:
        t = (torch.randn(shape, **on) * 64).clamp(-448, 448).to(dt)
    elif dt == torch.uint8:
        hi = 16 if role == "zero" else 256
        t = torch.randint(0, hi, shape, dtype=torch.uint8, **on)
    elif dt == torch.int8:
        t = torch.randint(-128, 128, shape, dtype=torch.int8, **on)
    elif dt in (torch.int32, torch.int64):
        hi = 16 if role == "zero" else 100
        t = torch.randint(0, hi, shape, dtype=dt, **on)
    elif role == "zero":
        t = torch.randint(0, 16, shape, **on).to(dt)
    else:  # scales: positive, spread over two decades
        t = (torch.rand(shape, **on) * 2 - 1).exp2().mul(0.05).to(dt)
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


def _random_weight_leaves(leaves, wt: _Weight, device: torch.device) -> dict:
    """The region's inputs: random weights, scales and zero points (seeded, on ``device``), symbols bound."""
    gen = torch.Generator(device).manual_seed(1234)
    env: dict = {}
    _bind_symbols(leaves, env)
    for leaf in leaves:
        if isinstance(val(leaf), torch.Tensor):
            role = "zero" if leaf is wt.zero else "scale" if leaf is wt.scale else "weight"
            env[leaf] = _random_like(leaf, role, gen)
    return env


def _reference_weight(env: dict, wt: _Weight, scheme: str) -> torch.Tensor:
    """The scheme's float32 dequantisation of the same random inputs."""
    params = [env[wt.weight], env[wt.scale]]
    if wt.granularity in ("tensor", "channel"):
        params[1] = params[1].reshape(-1)[0] if wt.granularity == "tensor" else params[1].reshape(-1)
    if wt.zero is not None:
        params.append(env[wt.zero])
    return S.dequantize_weight(scheme, params, wt.k)


def _verify_weight_region(wd: fx.Node, inner, leaves, wt: _Weight, scheme: str) -> None:
    """Run the dequantise region on random weights and compare with the scheme's reference."""
    key = _signature(inner, leaves, (scheme, "w"))
    hit = _VERIFY_CACHE.get(key)
    if hit is None:
        device = _device(leaves)
        env = _random_weight_leaves(leaves, wt, device)
        try:
            (got,) = _evaluate(inner, env, [wd], device)
        except Exception as exc:  # an op we cannot run here: treat as no match
            hit = f"could not evaluate the weight's dequantise ops ({type(exc).__name__}: {exc})"
        else:
            want = _reference_weight(env, wt, scheme)
            tol = 1e-5 if got.dtype == torch.float32 else 1e-2
            ok = _close(got.float(), want, tol)
            hit = "" if ok else f"its dequantisation does not compute {scheme}'s (x - zero) * scale reference (relative error {S.relative_error(got, want):.2g})"
        _VERIFY_CACHE[key] = hit
    if hit:
        raise _Miss(hit)


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
        device = _device([x])
        gen = torch.Generator(device).manual_seed(4321)
        on = {"generator": gen, "device": device}
        v = val(x)
        shape = tuple(_hint(s) for s in v.shape)
        m = 1
        for d in shape[:-1]:
            m *= d
        # rows and 128-groups of very different magnitude tell the granularities apart
        base = torch.randn(shape, **on)
        row = torch.exp2(torch.randint(-6, 7, shape[:-1] + (1,), **on).float())
        grp = torch.exp2(torch.randint(-4, 5, shape[:-1] + (max(1, k // S.BLOCK), 1), **on).float())
        if k % S.BLOCK == 0:
            base = (base.reshape(*shape[:-1], k // S.BLOCK, S.BLOCK) * grp).reshape(shape)
        xs = (base * row).to(v.dtype)
        env: dict = {x: xs}
        _bind_symbols(leaves_all, env)
        try:
            got = _evaluate(inner_all, env, outputs, device)
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


def _verify_weight_operand(b: fx.Node, wt: _Weight, scheme: str, out_scale: "fx.Node | None" = None) -> None:
    """The ``[K, N]`` matmul operand ``b`` (with the transpose, wherever it sits in the dequantise
    region) times ``out_scale`` (a per-output-channel multiply after the matmul, or None), run on
    random weights and compared with the scheme's reference dequantisation.

    Covers ``mm(x, convert(permute(w))) * s`` (torchao's weight-only tensors),
    ``mm(x, (permute(w).float() * permute(s)).to(dt))`` and ``linear(x, w.to(dt)) * s`` (gpt-fast):
    since ``(x @ B) * s == x @ (B * s)`` for ``s`` along N, the effective weight is ``(B * s).t()``.
    """
    inner, leaves = _ancestors(b, set())
    if out_scale is not None:
        s_inner, s_leaves = _ancestors(out_scale, set())
        inner += [n for n in s_inner if n not in inner]
        leaves += [n for n in s_leaves if n not in leaves]
        order = {n: i for i, n in enumerate(b.graph.nodes)}
        inner.sort(key=order.__getitem__)
    outs = [b] + ([out_scale] if out_scale is not None else [])
    roots = tuple(("n", inner.index(o)) if o in inner else ("leaf", leaves.index(o)) for o in outs)
    key = _signature(inner, leaves, (scheme, "kn", roots))
    hit = _VERIFY_CACHE.get(key)
    if hit is None:
        device = _device(leaves)
        env = _random_weight_leaves(leaves, wt, device)
        try:
            got = _evaluate(inner, env, outs, device)
        except Exception as exc:  # an op we cannot run here: treat as no match
            hit = f"could not evaluate the weight's dequantise ops ({type(exc).__name__}: {exc})"
        else:
            kn = got[0]
            low = kn.dtype
            eff = kn.float()
            if out_scale is not None:
                s = got[1]
                low = s.dtype if s.dtype != torch.float32 else low
                eff = eff * s.float().reshape(1, -1)
            want = _reference_weight(env, wt, scheme)
            tol = 1e-5 if low == torch.float32 else 1e-2
            ok = _close(eff.t(), want, tol)
            where = " with the multiply after the matmul" if out_scale is not None else ""
            hit = "" if ok else (f"its dequantisation{where} does not compute {scheme}'s (x - zero) * scale reference"
                                 f" (relative error {S.relative_error(eff.t(), want) if eff.t().shape == want.shape else float('inf'):.2g})")
        _VERIFY_CACHE[key] = hit
    if hit:
        raise _Miss(hit)
