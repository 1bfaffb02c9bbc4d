"""The pass: match -> select -> replace, and the record of every decision.

It runs as Inductor's ``post_grad_custom_pre_pass``, before Inductor's own
quantization patterns rewrite the same chains.  ``uuid()`` includes the
resolved config and the registered kernels, so Inductor's FX-graph and
AOTAutograd caches never hand back a graph compiled for another backend.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any, Optional

import torch
import torch.fx as fx
from torch._inductor import custom_graph_pass as _cgp

from . import config as C
from .kernels import ops as _ops  # noqa: F401  (registers qlinear_pass::linear)
from .patterns import Match, Unmatched, find_linears, val
from .registry import DeviceInfo, Kernel, LayerSpec, Selection, registry_key, select


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
    """One run of the pass over one graph."""

    config: C.LinearBackendConfig
    source: str  # where the config came from: make / context / env / default
    decisions: list[Decision] = dataclasses.field(default_factory=list)
    unmatched: list[dict] = dataclasses.field(default_factory=list)
    training: bool = False
    #: why the graph was left untouched, when ``training``
    training_reason: str = ""


#: every run of the pass in this process, newest last (bounded)
HISTORY: list[CompileRecord] = []
_HISTORY_LIMIT = 256


def last_record() -> Optional[CompileRecord]:
    return HISTORY[-1] if HISTORY else None


def _package_hash() -> str:
    h = hashlib.sha256()
    root = pathlib.Path(__file__).parent
    for p in sorted(root.rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


_PKG_HASH: Optional[str] = None

_Base: Any = getattr(_cgp, "CustomInferenceAwareGraphPass", _cgp.CustomGraphPass)


class QLinearPass(_Base):
    """Rewrites the quantized linears of one graph for one config."""

    def __init__(self, config: C.LinearBackendConfig, source: str = "make", device: Optional[DeviceInfo] = None) -> None:
        self.config = config
        self.source = source
        self.device = device

    def uuid(self) -> Any:
        global _PKG_HASH
        if _PKG_HASH is None:
            _PKG_HASH = _package_hash()
        return f"qlinear_pass:{_PKG_HASH}:{self.config.describe()}:{registry_key()}"

    def __call__(self, graph: fx.Graph, is_inference: bool = True) -> None:
        record = CompileRecord(self.config, self.source)
        _remember(record)
        if not is_inference:
            record.training = True
            record.training_reason = "AOTAutograd traced a training graph: left untouched (the pass rewrites inference graphs only)"
            return
        rewrite(graph, self.config, record, self.device)


def _remember(record: CompileRecord) -> None:
    HISTORY.append(record)
    del HISTORY[:-_HISTORY_LIMIT]


def rewrite(graph: fx.Graph, cfg: C.LinearBackendConfig, record: CompileRecord, device: Optional[DeviceInfo] = None) -> None:
    matches, misses = find_linears(graph)
    for miss in misses:
        record.unmatched.append(_miss_row(miss))
    for m in matches:
        dev = device or DeviceInfo.of(_device_of(m))
        sel = select(m.spec, cfg, dev)
        record.decisions.append(Decision(m.spec, sel.backend, sel.describe(), sel.rejected, sel.fallback, sel.note))
        _replace(graph, m, sel)
    if matches:
        graph.eliminate_dead_code()
        graph.lint()


def _device_of(m: Match) -> torch.device:
    v = val(m.anchor)
    return v.device if isinstance(v, torch.Tensor) else torch.device("cpu")


def _miss_row(miss: Unmatched) -> dict:
    return {"module": miss.module, "node": miss.node.name, "op": str(miss.node.target), "n": miss.n, "k": miss.k, "reason": miss.reason}


# --- building nodes -------------------------------------------------------------


class Emitter:
    """Creates nodes before ``anchor`` with fake values, as Inductor expects."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, meta_from: fx.Node) -> None:
        self.graph = graph
        self.anchor = anchor
        self.meta_from = meta_from
        vals = [v for v in (val(n) for n in anchor.all_input_nodes) if isinstance(v, torch.Tensor)]
        self.fake_mode = torch._guards.detect_fake_mode(vals) if vals else None

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in self.meta_from.meta:
                node.meta[key] = self.meta_from.meta[key]

        def fake(a):
            return val(a) if isinstance(a, fx.Node) else a

        fargs = fx.node.map_aggregate(args, fake)
        fkwargs = fx.node.map_aggregate(kwargs, fake)
        if self.fake_mode is not None:
            with self.fake_mode:
                node.meta["val"] = target(*fargs, **fkwargs)
        else:
            node.meta["val"] = target(*fargs, **fkwargs)
        return node

    def constant(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """A new constant of the graph module (weights prepared at compile time)."""
        gm = self.graph.owning_module
        base = f"_qlinear_{name}"
        attr = base
        i = 0
        while hasattr(gm, attr):
            i += 1
            attr = f"{base}_{i}"
        gm.register_buffer(attr, tensor)
        with self.graph.inserting_before(self.anchor):
            node = self.graph.get_attr(attr)
        if self.fake_mode is not None:
            node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        else:
            node.meta["val"] = tensor
        return node


aten = torch.ops.aten


def canonical_inputs(emit: Emitter, m: Match) -> tuple[fx.Node, list, Optional[fx.Node]]:
    """The kernel's inputs: 2-D activation, canonical parameters, bias."""
    x = m.x
    if len(val(x).shape) != 2:
        x = emit(aten.reshape.default, x, [-1, m.spec.k])
    params = []
    for p, shape in zip(m.params, m.param_shapes):
        if p is not None and shape is not None and tuple(val(p).shape) != tuple(shape):
            p = emit(aten.reshape.default, p, list(shape))
        params.append(p)
    return x, params, m.bias


def quantized_inputs(emit: Emitter, m: Match) -> tuple[fx.Node, fx.Node, list, Optional[fx.Node]]:
    """For kernels that keep a dynamic activation quantization in the graph (Inductor fuses it):
    the quantized 2-D activation, its scale, the weight parameters and the bias.
    For a static activation these are the given quantized activation and scale."""
    x, params, bias = canonical_inputs(emit, m)
    if m.spec.act_input == "static":
        return x, params[-1], params[:-1], bias
    q, scale = m.act_q, m.act_scale
    if len(val(q).shape) != 2:
        q = emit(aten.reshape.default, q, [-1, m.spec.k])
    return q, scale, params, bias


def _replace(graph: fx.Graph, m: Match, sel: Selection) -> None:
    kernel: Kernel = sel.kernel
    emit = Emitter(graph, m.end, m.anchor)
    if kernel.opaque or sel.plan:
        x, params, bias = canonical_inputs(emit, m)
        new = emit(torch.ops.qlinear_pass.linear.default, x, params, bias, sel.kernel_name, m.spec.to_json())
    else:
        new = kernel.emit(emit, m)
    want = val(m.end)
    got = val(new)
    if tuple(got.shape) != tuple(want.shape):
        new = emit(aten.reshape.default, new, list(want.shape))
    if got.dtype != want.dtype:
        raise AssertionError(f"{kernel.name} produced {got.dtype}, the graph expects {want.dtype}")
    m.end.replace_all_uses_with(new)
