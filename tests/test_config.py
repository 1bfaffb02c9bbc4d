import dataclasses

import pytest
import torch

import qlinear_pass as qp
from qlinear_pass import config as C


def test_names_are_normalised():
    assert C.normalize_backend("FlashInfer-cuBLAS") == "flashinfer_cublas"
    assert C.normalize_scheme(" FP8-Rowwise ") == "fp8_rowwise"
    assert qp.LinearBackendConfig("Triton").linear_backend == "triton"


def test_every_design_backend_is_known():
    for name in ["auto", "emulation", "torch", "triton", "cutlass", "flashinfer_cublas", "flashinfer_cudnn",
                 "flashinfer_deepgemm", "flashinfer_cutlass", "flashinfer_trtllm"]:
        assert C.normalize_backend(name) == name


def test_unknown_backend_lists_valid_names_and_closest():
    with pytest.raises(ValueError) as e:
        qp.LinearBackendConfig("tritn")
    msg = str(e.value)
    assert "unknown backend 'tritn'" in msg and "Did you mean 'triton'?" in msg and "cutlass" in msg


def test_unknown_scheme_in_per_scheme():
    with pytest.raises(ValueError, match=r"unknown scheme 'fp8_rowwize'.*Did you mean 'fp8_rowwise'"):
        qp.LinearBackendConfig(per_scheme={"fp8_rowwize": "triton"})
    with pytest.raises(ValueError, match="unknown backend 'cutless'"):
        qp.LinearBackendConfig(per_scheme={"w4a16": "cutless"})


def test_bad_on_unsupported():
    with pytest.raises(ValueError, match="on_unsupported value 'fallbak'.*'fallback'"):
        qp.LinearBackendConfig(on_unsupported="fallbak")


def test_config_is_frozen_hashable_and_normalised():
    a = qp.LinearBackendConfig("TORCH", per_scheme={"W4A16": "Emulation"})
    b = qp.LinearBackendConfig("torch", per_scheme={"w4a16": "emulation"})
    assert a == b and hash(a) == hash(b)
    assert a.backend_for("w4a16") == "emulation" and a.backend_for("fp8_rowwise") == "torch"
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.linear_backend = "triton"
    with pytest.raises(TypeError):
        a.per_scheme["fp8_tensor"] = "torch"


def test_precedence_make_context_env_default(monkeypatch):
    monkeypatch.delenv(C.ENV_VAR, raising=False)
    assert C.resolve() == (qp.LinearBackendConfig(), "default")
    monkeypatch.setenv(C.ENV_VAR, "emulation")
    assert C.resolve() == (qp.LinearBackendConfig("emulation"), "env")
    with qp.linear_backend("torch"):
        assert C.resolve() == (qp.LinearBackendConfig("torch"), "context")
        with qp.linear_backend("triton"):
            assert C.resolve()[0].linear_backend == "triton"  # innermost wins
        assert C.resolve()[0].linear_backend == "torch"
        assert C.resolve("cutlass") == (qp.LinearBackendConfig("cutlass"), "make")
    assert C.resolve()[1] == "env"


def test_bad_env_var_names_the_variable(monkeypatch):
    monkeypatch.setenv(C.ENV_VAR, "nope")
    with pytest.raises(ValueError, match=C.ENV_VAR):
        C.resolve()


def test_context_is_a_decorator_and_restores_on_error():
    @qp.linear_backend("emulation")
    def inside():
        return C.current_context_config()

    assert inside().linear_backend == "emulation"
    assert C.current_context_config() is None
    with pytest.raises(RuntimeError):
        with qp.linear_backend("torch"):
            raise RuntimeError("boom")
    assert C.current_context_config() is None
    assert C.active_mode_config() is None


def test_context_pushes_one_mode_class_per_config():
    with qp.linear_backend("torch") as cfg:
        assert C.active_mode_config() == cfg
        first = C._mode_class(cfg)
    with qp.linear_backend(qp.LinearBackendConfig("torch")):
        assert C._mode_class(C.active_mode_config()) is first
    with qp.linear_backend("emulation"):
        assert C._mode_class(C.active_mode_config()) is not first


def test_context_takes_options_with_a_name():
    with qp.linear_backend("triton", on_unsupported="fallback") as cfg:
        assert cfg.on_unsupported == "fallback"
    with pytest.raises(TypeError):
        qp.linear_backend(qp.LinearBackendConfig(), on_unsupported="fallback")


def test_bad_env_var_is_reported_by_make(monkeypatch):
    monkeypatch.setenv(C.ENV_VAR, "trition")
    with pytest.raises(qp.EnvConfigError) as e:
        qp.make()
    msg = str(e.value)
    assert f"{C.ENV_VAR}='trition'" in msg and "Did you mean 'triton'" in msg and "unset it" in msg
    assert isinstance(e.value, ValueError)
    qp.make("emulation")  # an explicit backend does not read it


def test_bad_env_var_reaches_the_compiled_call_unwrapped(monkeypatch):
    import traceback

    from .helpers import linear_model, random_activation

    m = linear_model(64, 32, "int8_rowwise")
    from qlinear_pass.compile import qlinear_backend  # what the "qlinear" entry point names

    f = torch.compile(m, backend=qlinear_backend)  # made before the variable was set
    monkeypatch.setenv(C.ENV_VAR, "nope")
    with pytest.raises(qp.EnvConfigError) as e, torch.no_grad():
        f(random_activation((2, 64)))
    last = traceback.format_exception(e.value)[-1]
    assert last.startswith(f"qlinear_pass.EnvConfigError: environment variable {C.ENV_VAR}='nope'"), last
