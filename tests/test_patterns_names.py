"""Module paths in decisions and explain(): the names ``model.named_modules()`` gives, whichever
way the model was handed to ``torch.compile``."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import example, given, strategies as st

import qlinear_pass as qp
from qlinear_pass import graph_pass
from qlinear_pass.patterns import EXPLAIN_ROOT, module_path


def _node_with(paths: list, graph_paths: list = ()) -> fx.Node:
    """A node whose nn_module_stack ends at ``paths[-1]``, in a graph whose other nodes
    reach ``graph_paths``."""
    g = fx.Graph()
    x = g.placeholder("x")
    for i, p in enumerate(graph_paths):
        other = g.call_function(torch.relu, (x,))
        other.meta["nn_module_stack"] = {f"o{i}": (p, nn.Linear)}
    n = g.call_function(torch.relu, (x,))
    n.meta["nn_module_stack"] = {f"k{i}": (p, nn.Linear) for i, p in enumerate(paths)}
    return n


@pytest.mark.parametrize("raw, name", [
    # torch 2.13: Dynamo's formatted source names
    ("L['self'].model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj"),
    ("L['args'][0].model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj"),  # HF decorated forward
    ("L['s'].fc", "fc"),  # a forward whose self is spelled otherwise
    ("L['fn'].1.1", "1.1"),
    ("G['net'].d.a-b", "d.a-b"),
    (f"G['{EXPLAIN_ROOT}'].forward._torchdynamo_inline.__self__.lm_head", "lm_head"),
    (f"G['{EXPLAIN_ROOT}'].model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.q_proj"),
    # older spellings: subscripts and _modules
    ("L['self']._modules['0']", "0"),
    ("L['self'].layers[0]._modules['mlp'].up", "layers.0.mlp.up"),
    ("L['self']['blocks']['a'].fc", "blocks.a.fc"),
    ("L['fn'].__self__._modules['2']", "2"),  # compiled bound method: its __self__ is the module
    ("L['self']", ""),  # the compiled module is the linear itself: named_modules() calls it ""
])
def test_dynamo_source_names_become_module_names(raw, name):
    assert module_path(_node_with([raw])) == name


def test_the_innermost_module_of_the_stack_names_the_node():
    n = _node_with(["L['self'].model", "L['self'].model.layers.0", "L['self'].model.layers.0.mlp.up"])
    assert module_path(n) == "model.layers.0.mlp.up"


def test_several_roots_keep_their_names():
    """A compiled function reaching two models: each name keeps the root it came from."""
    n = _node_with(["L['enc'].layers.0.fc"], ["L['dec'].layers.0.fc"])
    assert module_path(n) == "enc.layers.0.fc"
    n = _node_with(["L['args'][1].fc"], ["L['args'][0].fc"])
    assert module_path(n) == "args.1.fc"
    # explain()'s own root does not count as a second one
    n = _node_with(["L['self'].fc"], [f"G['{EXPLAIN_ROOT}'].fc"])
    assert module_path(n) == "fc"


def test_no_stack_no_name():
    g = fx.Graph()
    assert module_path(g.call_function(torch.relu, (g.placeholder("x"),))) == ""


# --- whole models, compiled as users compile them ------------------------------------------


class Tree(nn.Module):
    """A module built from a nested description: a linear, a Sequential, a ModuleList or a
    ModuleDict of children, run in order."""

    def __init__(self, spec, k: int = 16):
        super().__init__()
        self.body = _build(spec, k)

    def forward(self, x):
        return _run(self.body, x)


def _build(spec, k):
    if spec == "linear":
        return nn.Linear(k, k, bias=False)
    kind, children = spec
    mods = [_build(c, k) for c in children]
    if kind == "seq":
        return nn.Sequential(*mods)
    if kind == "list":
        return nn.ModuleList(mods)
    return nn.ModuleDict({f"m_{i}": m for i, m in enumerate(mods)})


def _run(mod, x):
    if isinstance(mod, nn.ModuleList):
        for m in mod:
            x = _run(m, x)
        return x
    if isinstance(mod, nn.ModuleDict):
        for m in mod.values():
            x = _run(m, x)
        return x
    return mod(x)


@st.composite
def trees(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        return "linear"
    kind = draw(st.sampled_from(["seq", "list", "dict"]))
    return (kind, draw(st.lists(trees(depth=depth - 1), min_size=1, max_size=3)))


def _quantized_names(model) -> list:
    return sorted(n for n, m in model.named_modules() if isinstance(m, qp.QuantizedLinear))


@given(trees())
@example(("seq", ["linear", ("seq", ["linear"])]))  # 0, 1.0
@example(("dict", [("list", ["linear", "linear"])]))  # m_0.0, m_0.1
def test_explain_names_every_layer_as_named_modules_does(spec):
    model = qp.quantize(Tree(spec), "int8_weight_only")
    x = torch.randn(3, 16)
    with torch.no_grad():
        rep = qp.explain(model, x)
    assert sorted(r["module"] for r in rep.rows) == _quantized_names(model)


def _compiled_forms(model):
    backend = qp.make("emulation", inductor=False)

    def as_module():
        return torch.compile(model, backend=backend)

    def as_forward():
        model.forward = torch.compile(model.forward, backend=backend)
        return model

    def in_place():
        model.compile(backend=backend)
        return model

    def through_a_function():
        def step(m, x):
            return m(x)

        compiled = torch.compile(step, backend=backend)
        return lambda x: compiled(model, x)

    return {"module": as_module, "forward": as_forward, "in_place": in_place, "function": through_a_function}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()))
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        return self.head(self.seq(x))


@pytest.mark.parametrize("form", ["module", "forward", "in_place", "function"])
def test_names_whichever_way_the_model_is_compiled(form):
    model = qp.quantize(Net(), "int8_weight_only")
    fn = _compiled_forms(model)[form]()
    with graph_pass.watch() as records, torch.no_grad():
        fn(torch.randn(2, 16))
    names = sorted(d.spec.module for r in records for d in r.decisions)
    assert names == ["head", "seq.0", "seq.2.0"] == _quantized_names(model)


@pytest.mark.parametrize("form", ["module", "forward", "function"])
def test_sequential_names_whichever_way_it_is_compiled(form):
    """(``Sequential.compile()`` in place is left out: Dynamo does not trace torch's own
    ``forward`` frames there and compiles each quantized linear as a model of its own.)"""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 8), nn.ReLU()))
    model = qp.quantize(model, "int8_weight_only")
    fn = _compiled_forms(model)[form]()
    with graph_pass.watch() as records, torch.no_grad():
        fn(torch.randn(2, 16))
    assert sorted(d.spec.module for r in records for d in r.decisions) == ["0", "2.0"] == _quantized_names(model)


def test_explain_of_a_model_whose_forward_was_compiled():
    """explain() reaches the model through the compiled forward's bound method: the names stay
    the model's own, matched and unmatched alike."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    qp.quantize(model, "int8_weight_only", include=["0"])
    model.forward = torch.compile(model.forward, backend=qp.make("emulation", inductor=False))
    with torch.no_grad():
        rep = qp.explain(model, torch.randn(2, 16))
    assert [r["module"] for r in rep.rows] == ["0"]
    assert [u["module"] for u in rep.unmatched] == ["2"]


def test_two_models_in_one_function_keep_their_roots():
    enc = qp.quantize(nn.Sequential(nn.Linear(16, 16)), "int8_weight_only")
    dec = qp.quantize(nn.Sequential(nn.Linear(16, 8)), "int8_weight_only")

    def both(x, enc, dec):
        return dec(enc(x))

    with graph_pass.watch() as records, torch.no_grad():
        torch.compile(both, backend=qp.make("emulation", inductor=False))(torch.randn(2, 16), enc, dec)
    assert sorted(d.spec.module for r in records for d in r.decisions) == ["dec.0", "enc.0"]
