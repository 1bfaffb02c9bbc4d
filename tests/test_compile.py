"""make(), the call-time backend rule, errors through torch.compile, the registered backend."""
import warnings

import pytest
import torch

import qlinear_pass as qp
from qlinear_pass import schemes as S
from qlinear_pass.kernels.ops import CALLS

from .helpers import compile_and_run, kernels_of, linear_model, random_activation, recorded


def test_make_is_cached_per_config():
    assert qp.make("torch") is qp.make("TORCH") is qp.make(config=qp.LinearBackendConfig("torch"))
    assert qp.make("torch") is not qp.make("emulation")
    assert qp.make() is qp.make()
    assert qp.make("torch", inductor=False) is not qp.make("torch")


def test_make_argument_errors():
    with pytest.raises(TypeError, match="either"):
        qp.make("torch", config=qp.LinearBackendConfig())
    with pytest.raises(ValueError, match="unknown backend"):
        qp.make("trition")
    with pytest.raises(TypeError, match="unknown Inductor option"):
        qp.make("torch", not_an_option=True)
    with pytest.raises(TypeError, match="freezing"):
        qp.make("torch", freezing=True)
    with pytest.raises(TypeError, match="inductor=True"):
        qp.make("torch", inductor=False, max_autotune=True)


def test_same_backend_object_does_not_recompile():
    m = linear_model(64, 32, "fp8_rowwise")
    x = random_activation((4, 64))
    with torch.no_grad(), recorded() as recs:
        f1 = torch.compile(m, backend=qp.make("emulation", inductor=False))
        f1(x)
        f1(x)
    assert len(recs) == 1


def test_kernel_follows_the_config_in_effect_at_call_time():
    m = linear_model(64, 32, "fp8_tensor")
    x = random_activation((4, 64))
    f = torch.compile(m, backend=qp.make(inductor=False))
    with torch.no_grad():
        with qp.linear_backend("emulation"), recorded() as r1:
            f(x)
        with qp.linear_backend("torch"), recorded() as r2:
            before = CALLS["emulation"]
            f(x)
            assert CALLS["emulation"] == before  # the emulation graph did not run
        with qp.linear_backend("emulation"), recorded() as r3:
            before = CALLS["emulation"]
            f(x)
            assert CALLS["emulation"] == before + 1  # its cached graph ran again
    assert kernels_of(r1) == ["emulation"]
    assert kernels_of(r2) == ["torch_scaled_mm"]
    assert r3 == []  # no recompile: each config keeps its graph
    assert r2[0].source == "context"


def test_explicit_make_beats_the_context():
    m = linear_model(64, 32, "fp8_tensor")
    f = torch.compile(m, backend=qp.make("emulation", inductor=False))
    with torch.no_grad(), qp.linear_backend("torch"), recorded() as recs:
        f(random_activation((4, 64)))
    assert kernels_of(recs) == ["emulation"] and recs[0].source == "make"


def test_env_var_is_read_when_nothing_else_says(monkeypatch):
    monkeypatch.setenv("QLINEAR_PASS_LINEAR_BACKEND", "emulation")
    m = linear_model(64, 32, "int8_rowwise")
    _, recs = compile_and_run(m, random_activation((4, 64)), None)
    assert kernels_of(recs) == ["emulation"] and recs[0].source == "env"


def test_no_kernel_error_reaches_the_torch_compile_user():
    m = linear_model(256, 128, "fp8_block")
    with pytest.raises(qp.NoKernelError) as e:
        compile_and_run(m, random_activation((4, 256)), "torch")
    msg = str(e.value)
    for part in ["'torch'", "layer '0'", "fp8_block", "N=128", "K=256", "per_scheme", "fallback"]:
        assert part in msg, part
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("inductor", [False, True])
def test_no_kernel_error_reads_as_ours_with_a_short_traceback(inductor):
    import traceback

    m = linear_model(256, 128, "fp8_block")
    with pytest.raises(qp.NoKernelError) as e:
        compile_and_run(m, random_activation((4, 256)), "torch", inductor=inductor)
    lines = traceback.format_exception(e.value)
    text = "".join(lines)
    last = lines[-1]
    # the class prints under its public name, and the message is ours alone, first
    assert last.startswith("qlinear_pass.NoKernelError: linear backend 'torch' has no kernel for layer '0'"), last
    assert "TORCHDYNAMO_VERBOSE" not in str(e.value) and "BackendCompilerFailed" not in text
    frames = sum(1 for line in lines if line.startswith("  File "))
    assert frames <= 8, text
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_fallback_warns_and_is_reported():
    m = linear_model(256, 128, "fp8_block")
    cfg = qp.LinearBackendConfig("torch", on_unsupported="fallback")
    from qlinear_pass import select

    select._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rep = qp.explain(m, random_activation((4, 256)), linear_backend=cfg)
    (row,) = rep.rows
    assert row["fallback"] and row["kernel"] == "emulation" and row["backend"] == "torch"
    assert any("falling back to auto" in str(x.message) for x in w)
    assert "(fallback)" in str(rep)


def _installed_entry_point() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "qlinear" for ep in entry_points(group="torch_dynamo_backends"))


@pytest.mark.skipif(not _installed_entry_point(),
                    reason="qlinear_pass is not pip-installed here: the 'qlinear' backend name comes from its metadata")
def test_registered_as_qlinear_dynamo_backend():
    from torch._dynamo import list_backends

    assert "qlinear" in list_backends(exclude_tags=())
    m = linear_model(64, 32, "int8_weight_only")
    x = random_activation((3, 64))
    with torch.no_grad(), qp.linear_backend("emulation"), recorded() as recs:
        y = torch.compile(m, backend="qlinear")(x)
        assert S.relative_error(y, m(x)) < 1e-2
    assert kernels_of(recs) == ["emulation"]


@pytest.mark.inductor
def test_inductor_with_torch_kernels_matches_reference():
    m = linear_model(128, 64, "fp8_tensor", bias=True)
    x = random_activation((2, 5, 128))
    y, recs = compile_and_run(m, x, "torch", inductor=True)
    assert kernels_of(recs) == ["torch_scaled_mm"]
    with torch.no_grad():
        assert S.relative_error(y, m(x)) < S.TOLERANCE[torch.bfloat16]


def test_int4pack_repacks_module_weights_once():
    from qlinear_pass.registry import get_kernel

    kernel = get_kernel("torch_int4pack")
    m = linear_model(256, 64, "w4a16", group_size=64, zero_points=True)
    f = torch.compile(m, backend=qp.make("torch", inductor=False), dynamic=True)
    before = kernel.repacks
    with torch.no_grad(), recorded() as recs:
        for rows in (3, 7, 9):
            x = random_activation((rows, 256))
            assert S.relative_error(f(x), m(x)) < S.TOLERANCE[torch.bfloat16]
    assert kernels_of(recs) == ["torch_int4pack"]
    assert kernel.repacks == before + 1
    with torch.no_grad():
        m[0].weight_scale.mul_(2)  # an in-place change is seen
        x = random_activation((3, 256))
        assert S.relative_error(f(x), m(x)) < S.TOLERANCE[torch.bfloat16]
    assert kernel.repacks == before + 2


def test_int4pack_refuses_weights_passed_per_call():
    p = S.quantize_weight("w4a16", torch.randn(64, 256), group_size=64)

    def f(x, w, s):
        return S.reference("w4a16", x, [w, s, None])

    with pytest.raises(qp.NoKernelError, match="module parameters/buffers"):
        with torch.no_grad():
            torch.compile(f, backend=qp.make("torch", inductor=False))(random_activation((3, 256)), p["weight"], p["weight_scale"])


def test_records_belong_to_their_compile():
    m = linear_model(64, 32, "int8_rowwise")
    x = random_activation((4, 64))
    with torch.no_grad(), recorded() as outer:
        f = torch.compile(m, backend=qp.make("emulation", inductor=False))
        f(x)
        with recorded() as inner:
            torch.compile(m, backend=qp.make("torch", inductor=False))(x)
    assert kernels_of(inner) == ["torch_int_mm"]
    assert kernels_of(outer) == ["emulation", "torch_int_mm"]
    assert all(r.origin == "pass" and r.seconds is not None and r.seconds > 0 for r in outer)


@pytest.mark.inductor
def test_decisions_survive_inductor_cache_hits(tmp_path, monkeypatch):
    """A cache hit skips the pass: the decisions come back from beside the cached graph, or are
    re-derived when they were not stored."""
    import shutil

    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from qlinear_pass import record_store

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    m = linear_model(64, 32, "int8_weight_only")
    x = random_activation((4, 64))

    def compile_once():
        torch._dynamo.reset()
        with torch.no_grad(), recorded() as recs:
            torch.compile(m, backend=qp.make("emulation"))(x)
        (rec,) = recs
        return rec

    with inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True):
        first = compile_once()
        hit = compile_once()
        shutil.rmtree(record_store.directory())
        rederived = compile_once()
    assert first.origin == "pass" and hit.origin == "cache" and rederived.origin == "rederived"
    for rec in (first, hit, rederived):
        assert [(d.spec.scheme, d.kernel) for d in rec.decisions] == [("int8_weight_only", "emulation")]


def test_torch_compile_mode_and_options_reach_inductor():
    """torch.compile(backend=make(...), mode=..., options=...) hands both to the backend, as
    Hugging Face's CompileConfig does (mode="reduce-overhead" by default)."""
    import copy

    be = qp.make("emulation", max_autotune_gemm=False)
    tuned = be.with_compile_options("max-autotune", {"coordinate_descent_tuning": False})
    assert tuned.inductor and tuned.config == be.config
    # the mode's options, then make()'s, then the call's
    assert tuned.options["triton.cudagraphs"] is True
    assert tuned.options["max_autotune_gemm"] is False and tuned.options["coordinate_descent_tuning"] is False
    assert be.with_compile_options("max-autotune", {"coordinate_descent_tuning": False}) is tuned  # cached
    assert copy.deepcopy(be) is be and copy.copy(be) is be
    with pytest.raises(ValueError, match=r"mode='reduce-overhead'.*inductor=False leaves out"):
        qp.make("emulation", inductor=False).with_compile_options("reduce-overhead", None)
    with pytest.raises(ValueError, match="freezing"):
        be.with_compile_options(None, {"freezing": True})


def test_torch_compile_mode_runs_the_pass():
    model = linear_model(128, 64, "int8_weight_only", dtype=torch.float32)
    x = random_activation((3, 128), torch.float32)
    with torch.no_grad(), recorded() as recs:
        y = torch.compile(model, backend=qp.make("emulation"), mode="reduce-overhead")(x)
    assert kernels_of(recs) == ["emulation"]
    assert S.relative_error(y, model(x)) <= S.TOLERANCE[torch.float32]
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(ValueError, match="inductor=False leaves out"):
        torch.compile(model, backend=qp.make("emulation", inductor=False), mode="max-autotune")(x)
