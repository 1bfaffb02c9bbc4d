"""The pass: match -> select -> replace, and the record of every decision.

It runs as Inductor's ``post_grad_custom_pre_pass``, before Inductor's own
quantization patterns rewrite the same chains.  ``uuid()`` includes the
resolved config and the registered kernels, so Inductor's FX-graph and
AOTAutograd caches never hand back a graph compiled for another backend.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import operator
import pathlib
import time
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._inductor import custom_graph_pass as _cgp

from . import config as C
from . import fusion
from .kernels import ops as _ops  # noqa: F401  (registers qlinear_pass::linear)
from .emit import RESHAPES, Emitter, canonical_inputs, canonical_params, quantized_inputs, val
from .patterns import Match, Unmatched, find_linears, unpad_rows
from .patterns.common import CONVERTS
from .kernel import Kernel
from .registry import registry_key
from .select import Selection, select
from .spec import DeviceInfo, LayerSpec


@dataclasses.dataclass
class Decision:
    """What the pass did with one matched linear."""

    spec: LayerSpec
    backend: str
    kernel: Optional[str]
    rejected: list[tuple[str, str]]
    fallback: bool = False
    note: str = ""

    def as_row(self) -> dict:
        s = self.spec
        return {
            "module": s.module,
            "scheme": s.scheme,
            "n": s.n,
            "k": s.k,
            "m": s.m,
            "group_size": s.group_size,
            "weight_layout": s.weight_layout,
            "act_input": s.act_input,
            "act_dtype": str(s.act_dtype).removeprefix("torch."),
            "out_dtype": str(s.out_dtype).removeprefix("torch."),
            "bias": s.has_bias,
            "backend": self.backend,
            "kernel": self.kernel,
            "rejected": list(self.rejected),
            "fallback": self.fallback,
            "note": self.note,
        }


@dataclasses.dataclass
class CompileRecord:
    """One compile of one graph: the config it used and what the pass decided.

    Each record belongs to the compile that made it: the compiled callable carries it
    (``qlinear_record``), and :func:`watch` collects the records of the compiles inside a
    block.  ``origin`` says where the decisions come from: ``"pass"`` (the pass ran),
    ``"cache"`` (Inductor's cache returned a compiled graph, so the pass did not run, and the
    decisions stored beside it were read back) or ``"rederived"`` (a cache hit with no stored
    decisions: the pass was run again over the graph, without code generation).
    """

    config: C.LinearBackendConfig
    source: str  # where the config came from: make / context / env / default
    decisions: list[Decision] = dataclasses.field(default_factory=list)
    unmatched: list[dict] = dataclasses.field(default_factory=list)
    training: bool = False
    origin: str = "pass"
    #: why the graph was left untouched, when ``training``
    training_reason: str = ""
    #: wall seconds the pass itself took over this graph (matching, selection, replacement)
    pass_seconds: float = 0.0
    #: wall-clock seconds the compile took, when known
    seconds: Optional[float] = None

    def to_json(self) -> str:
        return json.dumps({
            "decisions": [
                {"spec": d.spec.to_json(), "backend": d.backend, "kernel": d.kernel, "rejected": d.rejected,
                 "fallback": d.fallback, "note": d.note}
                for d in self.decisions
            ],
            "unmatched": self.unmatched,
            "training": self.training,
            "training_reason": self.training_reason,
        })

    @classmethod
    def from_json(cls, text: str, config: C.LinearBackendConfig, source: str, origin: str) -> "CompileRecord":
        d = json.loads(text)
        decisions = [
            Decision(LayerSpec.from_json(x["spec"]), x["backend"], x["kernel"], [tuple(r) for r in x["rejected"]],
                     x["fallback"], x["note"])
            for x in d["decisions"]
        ]
        return cls(config, source, decisions, d["unmatched"], d["training"], origin, d.get("training_reason", ""))


_WATCHERS: list = []


@contextlib.contextmanager
def watch():
    """Collect the :class:`CompileRecord` of every compile that finishes inside the block.

    >>> with watch() as records:
    ...     compiled(x)
    """
    out: list[CompileRecord] = []
    _WATCHERS.append(out)
    try:
        yield out
    finally:
        _WATCHERS.remove(out)


def publish(record: CompileRecord) -> None:
    """Hand a finished record to every :func:`watch` in progress."""
    for w in list(_WATCHERS):
        w.append(record)


def _package_hash() -> str:
    h = hashlib.sha256()
    root = pathlib.Path(__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


_PKG_HASH: Optional[str] = None

_Base: Any = getattr(_cgp, "CustomInferenceAwareGraphPass", _cgp.CustomGraphPass)


class QLinearPass(_Base):
    """Rewrites the quantized linears of one graph for one config.

    ``record`` is None until the pass runs; after a compile it still being None means
    Inductor's cache supplied the compiled graph.
    """

    def __init__(self, config: C.LinearBackendConfig, source: str = "make", device: Optional[DeviceInfo] = None) -> None:
        self.config = config
        self.source = source
        self.device = device
        self.record: Optional[CompileRecord] = None

    def uuid(self) -> Any:
        global _PKG_HASH
        if _PKG_HASH is None:
            _PKG_HASH = _package_hash()
        return f"qlinear_pass:{_PKG_HASH}:{self.config.describe()}:{registry_key()}"

    def __call__(self, graph: fx.Graph, is_inference: bool = True) -> None:
        record = CompileRecord(self.config, self.source)
        self.record = record
        if not is_inference:
            record.training = True
            record.training_reason = "AOTAutograd traced a training graph: left untouched (the pass rewrites inference graphs only)"
            return
        start = time.perf_counter()
        try:
            rewrite(graph, self.config, record, self.device)
        finally:
            record.pass_seconds = time.perf_counter() - start


def rewrite(graph: fx.Graph, cfg: C.LinearBackendConfig, record: CompileRecord, device: Optional[DeviceInfo] = None) -> None:
    matches, misses = find_linears(graph)
    if unpad_rows(graph, matches, misses):
        matches, misses = find_linears(graph)
    for miss in misses:
        record.unmatched.append(_miss_row(miss))
    chosen = []
    for m in matches:
        dev = device or DeviceInfo.of(_device_of(m))
        sel = select(m.spec, cfg, dev)
        decision = Decision(m.spec, sel.backend, sel.describe(), sel.rejected, sel.fallback, sel.note)
        record.decisions.append(decision)
        chosen.append((m, sel, decision))
    # every kernel chosen does its once-per-process work (a build) now, at compile time
    for kernel in {k.name: k for _, sel, _ in chosen for k in ([k for _, k in sel.plan] or [sel.kernel]) if k}.values():
        kernel.prepare()
    share_activation_quantization(graph, chosen)
    memo: dict = {}  # nodes the replacements share (``Emitter.shared``)
    sites = []  # the qlinear_pass calls emitted, for fusion.fuse
    for group in sibling_groups(graph, chosen):
        group = [(_after_takeovers(m, memo), sel, d) for m, sel, d in group]
        if len(group) == 1:
            node = _replace(graph, group[0][0], group[0][1], memo)
        else:
            node = _replace_group(graph, group, memo)
        if node is not None:
            sel = group[0][1]
            sites.append(fusion.Site(node, [k for _, k in sel.plan] or [sel.kernel], _specs_of(node), [d for _, _, d in group]))
    if sites and cfg.fuse:
        graph.eliminate_dead_code()  # the replaced layers' nodes: a norm read by them alone is then read by the call alone
        fusion.fuse(graph, sites)
    if matches:
        graph.eliminate_dead_code()
        graph.lint()


def _device_of(m: Match) -> torch.device:
    v = val(m.anchor)
    return v.device if isinstance(v, torch.Tensor) else torch.device("cpu")


def _miss_row(miss: Unmatched) -> dict:
    return {"module": miss.module, "node": miss.node.name, "op": str(miss.node.target), "n": miss.n, "k": miss.k, "reason": miss.reason}


aten = torch.ops.aten


def _quantized_in_graph(m: Match, sel: Selection) -> bool:
    """Does the layer's dynamic activation quantization stay in the graph (every kernel it may run
    takes the quantized activation, see ``Kernel.takes_quantized_activation``)?"""
    kernels = [k for _, k in sel.plan] or [sel.kernel]
    return m.spec.act_input == "dynamic" and m.act_q is not None and all(k.takes_quantized_activation(m.spec) for k in kernels)


def _op_inputs(emit: Emitter, m: Match, sel: Selection) -> tuple:
    """What ``qlinear_pass::linear`` is given for one layer: activation, parameters, bias, spec."""
    if _quantized_in_graph(m, sel):
        q, scale, params, bias = quantized_inputs(emit, m)
        return q, [*params, scale], bias, dataclasses.replace(m.spec, act_input="static", act_dtype=val(q).dtype)
    x, params, bias = canonical_inputs(emit, m)
    return x, params, bias, m.spec


def _specs_of(node: fx.Node) -> list:
    """The layer specs a ``linear`` / ``linear_group`` call carries."""
    text = node.args[4]
    if node.target is torch.ops.qlinear_pass.linear.default:
        return [LayerSpec.from_json(text)]
    return [LayerSpec.from_json(t) for t in json.loads(text)]


def _replace(graph: fx.Graph, m: Match, sel: Selection, memo: dict) -> Optional[fx.Node]:
    """Replace one layer; its ``qlinear_pass::linear`` call, or None where the kernel wrote ATen nodes."""
    kernel: Kernel = sel.kernel
    emit = Emitter(graph, m.end, m.anchor, memo)
    op = None
    if kernel.opaque or sel.plan:
        x, params, bias, spec = _op_inputs(emit, m, sel)
        new = op = emit(torch.ops.qlinear_pass.linear.default, x, params, bias, sel.kernel_name, spec.to_json())
    else:
        new = kernel.emit(emit, m)
    _take_over(emit, m, new, kernel)
    return op


#: ``memo`` key of {matched output: the replacement that took over its uses}
_TAKEN = ("taken",)


def _take_over(emit: Emitter, m: Match, new: fx.Node, kernel: Kernel) -> None:
    """The replacement, in the matched output's shape, takes over its uses."""
    want = val(m.end)
    got = val(new)
    if tuple(got.shape) != tuple(want.shape):
        new = emit(aten.reshape.default, new, list(want.shape))
    if got.dtype != want.dtype:
        if not m.widened:
            raise AssertionError(f"{kernel.name} produced {got.dtype}, the graph expects {want.dtype}")
        new = emit(torch.ops.prims.convert_element_type.default, new, want.dtype)
        got = val(new)
    m.end.replace_all_uses_with(new)
    taken = emit.shared.setdefault(_TAKEN, {})
    # the output and what it converts from in the same dtype (a no-op): a reader that skips such a
    # convert (torch 2.11's Inductor folds the bf16 round trip between two linears into one) reads it too
    n = m.end
    while True:
        taken[n] = new
        src = n.args[0] if n.op == "call_function" and n.target in CONVERTS and n.args else None
        if not isinstance(src, fx.Node) or getattr(val(src), "dtype", None) != got.dtype:
            break
        n = src


def _after_takeovers(m: Match, memo: dict) -> Match:
    """``m`` reading the replacements of layers replaced before it: a layer whose activation is
    another's output (two linears back to back) would otherwise keep that one's reference alive."""
    taken = memo.get(_TAKEN)
    if not taken:
        return m

    def now(n):
        return taken.get(n, n) if isinstance(n, fx.Node) else n

    return dataclasses.replace(m, x=now(m.x), params=[now(p) for p in m.params], bias=now(m.bias),
                               act_q=now(m.act_q), act_scale=now(m.act_scale))


# --- sibling layers: one launch for the layers that read the same activation ------------------

def _root(n: Any) -> Any:
    """The node whose data a chain of reshapes / views shows."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in RESHAPES:
        n = n.args[0]
    return n


def share_activation_quantization(graph: fx.Graph, chosen: list) -> None:
    """Layers that quantize the same activation the same way in the graph (q/k/v and gate/up of
    an fp8 / int8 model, each reference module quantizing its own input) read the first one's
    quantization: ``Match.act_q`` / ``act_scale`` of the later ones are re-pointed, and their own
    chains become dead code.  Inductor keeps such copies apart (one fp8 copy and scale per
    layer), so without this a prefill quantizes q/k/v's input three times.

    Two chains are the same when their nodes, walked back to the activation both layers read,
    are the same pure ATen ops on the same inputs and constants (a mutating or random op is
    never shared)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    seen: dict = {}  # structural key -> the first node computing it
    rep: dict = {}  # a chain's node -> the node it reads instead
    items = sorted((it for it in chosen if _quantized_in_graph(it[0], it[1])), key=lambda it: order[it[0].anchor])
    for m, _, _ in items:
        if m.act_scale is None:
            continue
        root = _root(m.x)
        for n in _chain_nodes((m.act_q, m.act_scale), root, order):
            key = _pure_key(n, rep)
            rep[n] = n if key is None else seen.setdefault(key, n)
        m.act_q, m.act_scale = rep[m.act_q], rep[m.act_scale]


def _chain_nodes(outs: tuple, root: fx.Node, order: dict) -> list:
    """The call_function nodes ``outs`` are computed by after ``root`` (their ancestors that come
    after it in the graph, ``root`` itself excluded), in graph order."""
    start = order.get(root, -1)
    found: set = set()
    todo = [n for n in outs if isinstance(n, fx.Node)]
    while todo:
        n = todo.pop()
        if n in found or n is root or n.op != "call_function" or order[n] <= start:
            continue
        found.add(n)
        todo.extend(n.all_input_nodes)
    return sorted(found, key=order.__getitem__)


def _pure_key(n: fx.Node, rep: dict) -> Optional[tuple]:
    """A hashable description of what ``n`` computes (its inputs as ``rep`` maps them), or None
    when it must not be shared: not an ATen op, mutating, random, or with unhashable arguments."""
    target = n.target
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return None
    if torch.Tag.nondeterministic_seeded in target.tags:
        return None

    def freeze(a):
        if isinstance(a, fx.Node):
            return ("node", rep.get(a, a))
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(freeze(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple(sorted((k, freeze(v)) for k, v in a.items())))
        hash(a)
        return (type(a).__name__, a.hex() if isinstance(a, float) else a)  # -0.0 is not 0.0, True not 1

    try:
        return (target, freeze(n.args), freeze(n.kwargs))
    except TypeError:
        return None


def _group_key(m: Match, sel: Selection) -> Optional[tuple]:
    """Layers with equal keys may run as one group: same activation (and given scale), same
    kernel or plan, same spec but for N; None when the layer's kernels do not run groups."""
    kernels = [k for _, k in sel.plan] or [sel.kernel]
    if not (sel.kernel.opaque or sel.plan) or not any(k.groups_layers for k in kernels):
        return None
    scale = _root(m.params[-1]) if m.spec.act_input == "static" else None
    spec = dataclasses.replace(m.spec, n=0, module="")
    return (_root(m.x), scale, sel.kernel_name, _quantized_in_graph(m, sel), spec)


def sibling_groups(graph: fx.Graph, chosen: list) -> list:
    """``chosen`` ([(match, selection, decision)]) as groups of layers to replace together, in
    graph order: layers that read the same activation with the same kernel (a transformer's
    q/k/v, gate/up), where the kernel runs groups and every member's parameters exist before the
    first member's output (where the group's call goes)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    buckets: dict = {}
    groups: list = []
    for item in chosen:
        key = _group_key(item[0], item[1])
        if key is None:
            groups.append([item])
        elif key in buckets:
            buckets[key].append(item)
        else:
            buckets[key] = [item]
            groups.append(buckets[key])
    out = []
    for group in groups:
        group.sort(key=lambda it: order[it[0].end])
        first = order[group[0][0].end]
        together = [group[0]]
        for item in group[1:]:
            m = item[0]
            needs = [p for p in (*m.params, m.bias) if isinstance(p, fx.Node)]
            if all(order[p] < first for p in needs):
                together.append(item)
            else:
                out.append([item])
        out.append(together)
    # in graph order of where each call goes: a node one replacement emits for the next to share
    # (``Emitter.shared``) then comes before every later one's call
    out.sort(key=lambda g: order[g[0][0].end])
    return out


def _replace_group(graph: fx.Graph, group: list, memo: dict) -> fx.Node:
    """One ``qlinear_pass::linear_group`` call for sibling layers, placed before the first one's output."""
    m0, sel0, _ = group[0]
    emit = Emitter(graph, m0.end, m0.anchor, memo)
    x, params, bias, spec = _op_inputs(emit, m0, sel0)
    shared_scale = _quantized_in_graph(m0, sel0)
    flat, biases, specs = list(params), [bias], [spec]
    for m, _, _ in group[1:]:
        p = canonical_params(emit, m)
        s = m.spec
        if shared_scale:  # the same quantization of the same activation: the first one's
            p = [*p, params[-1]]
            s = dataclasses.replace(s, act_input="static", act_dtype=spec.act_dtype)
        flat += p
        biases.append(m.bias)
        specs.append(s)
    outs = emit(torch.ops.qlinear_pass.linear_group.default, x, flat, biases, sel0.kernel_name,
                json.dumps([s.to_json() for s in specs]))
    names = [m.spec.module or m.end.name for m, _, _ in group]
    for i, (m, sel, decision) in enumerate(group):
        _take_over(emit, m, emit(operator.getitem, outs, i), sel.kernel)
        others = ", ".join(nm for j, nm in enumerate(names) if j != i)
        decision.note = "; ".join(filter(None, [decision.note, f"one launch with {others}"]))
    return outs
