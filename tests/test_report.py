import pytest
import torch

import qlinear_pass as qp
from qlinear_pass.examples_model import TinyBlock

from .helpers import random_activation


def test_explain_rows_and_table():
    m = qp.quantize(TinyBlock(128, 256).to(torch.bfloat16), "w4a16", group_size=64, exclude="down_proj")
    with torch.no_grad():
        rep = qp.explain(m, random_activation((2, 4, 128)), linear_backend="torch")
    assert not rep.training and rep.under_no_grad is None
    assert len(rep.rows) == 6
    row = {r["module"]: r for r in rep.rows}["up_proj"]
    for key in ("module", "scheme", "n", "k", "backend", "kernel", "rejected"):
        assert key in row
    assert (row["scheme"], row["n"], row["k"], row["backend"], row["kernel"]) == ("w4a16", 256, 128, "torch", "torch_int4pack")
    text = str(rep)
    assert "linear backend: torch (from explain's linear_backend argument)" in text and "up_proj" in text and "torch_int4pack" in text
    assert "down_proj" in text and "float weight" in text  # seen, not matched
    assert rep.kernels()["q_proj"] == "torch_int4pack"


def test_explain_lists_rejected_candidates_under_auto():
    # on a CPU with bfloat16 activations auto tries the int4pack op first (ranking.py), which needs N % 16 == 0
    m = qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 40)).to(torch.bfloat16), "w4a16")
    rep = qp.explain(m, torch.randn(3, 128, dtype=torch.bfloat16))
    (row,) = rep.rows
    assert row["kernel"] == "emulation"
    assert any(name == "torch_int4pack" and "divisible by 16" in why for name, why in row["rejected"])
    assert "torch_int4pack: _convert_weight_to_int4pack_for_cpu needs N divisible by 16" in str(rep)


def test_explain_raises_for_an_explicit_backend_without_kernel():
    m = qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 32)), "fp8_weight_only")
    with pytest.raises(qp.NoKernelError, match="fp8_weight_only"):
        qp.explain(m, torch.randn(3, 128), linear_backend="torch")


def test_explain_uses_the_context():
    m = qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 32)), "int8_rowwise")
    with qp.linear_backend("emulation"):
        rep = qp.explain(m, torch.randn(3, 128))
    assert rep.source.startswith("context") and rep.rows[0]["kernel"] == "emulation"
    assert "explain() was given no config" in str(rep)


def test_explain_reports_the_config_the_model_was_compiled_with():
    m = qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 32)), "int8_rowwise")
    cfg = qp.LinearBackendConfig("torch", per_scheme={"int8_rowwise": "emulation"})
    fast = torch.compile(m, backend=qp.make(config=cfg, inductor=False))
    rep = qp.explain(fast, torch.randn(3, 128))
    assert rep.config == cfg and rep.source == "make"
    assert rep.rows[0]["kernel"] == "emulation"
    assert str(rep).startswith("linear backend: torch[int8_rowwise=emulation] (from the compiled model's make())")


def test_explain_leaves_other_compiled_models_alone():
    from torch._dynamo.testing import CompileCounter

    other = torch.nn.Sequential(torch.nn.Linear(16, 16))
    counter = CompileCounter()
    f = torch.compile(other, backend=counter)
    x = torch.randn(2, 16)
    f(x)
    assert counter.frame_count == 1
    m = qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 32)), "int8_rowwise")
    for _ in range(2):  # the same model twice: each explain compiles (and reports) afresh
        rep = qp.explain(m, torch.randn(3, 128), linear_backend="emulation")
        assert [r["kernel"] for r in rep.rows] == ["emulation"]
    f(x)
    assert counter.frame_count == 1  # no recompile of the user's model


def test_explain_without_no_grad_says_the_graph_needs_gradients(fresh_warnings):
    """A float norm's weight requires grad: called like this, the compiled model runs no kernel
    of the pass, and explain() says so instead of listing kernels."""
    m = qp.quantize(TinyBlock(128, 256), "int8_rowwise")
    assert torch.is_grad_enabled()
    with pytest.warns(UserWarning, match="graph needs gradients"):
        rep = qp.explain(m, random_activation((2, 4, 128), torch.float32), linear_backend="emulation")
    assert rep.training and rep.rows == [] and rep.kernels() == {}
    assert any("parameter norm.weight requires grad" in r for r in rep.training_reasons)
    text = str(rep)
    assert "graph needs gradients (parameter norm.weight requires grad)" in text
    assert "torch.no_grad()" in text
    # what it would run under no_grad, labelled as such
    assert rep.under_no_grad is not None and not rep.under_no_grad.training
    assert len(rep.under_no_grad.rows) == 7
    assert "under torch.no_grad() the pass would choose:" in text and "q_proj" in text
    with torch.no_grad():
        rep2 = qp.explain(m, random_activation((2, 4, 128), torch.float32), linear_backend="emulation")
    assert not rep2.training and len(rep2.rows) == 7


def test_explain_of_a_fully_quantized_model_needs_no_no_grad():
    m = qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 32, bias=True)), "int8_weight_only")
    rep = qp.explain(m, torch.randn(3, 128), linear_backend="emulation")
    assert not rep.training and [r["kernel"] for r in rep.rows] == ["emulation"]
