import copy

import pytest
import torch

import qlinear_pass as qp
from qlinear_pass import schemes as S
from qlinear_pass.examples_model import TinyBlock


def test_quantize_replaces_every_linear_in_place():
    m = TinyBlock(128, 256)
    out = qp.quantize(m, "fp8_rowwise")
    assert out is m
    kinds = {type(mod) for mod in m.modules()}
    assert torch.nn.Linear not in kinds and qp.QuantizedLinear in kinds
    assert m.q_proj.weight.dtype == torch.float8_e4m3fn


def test_include_exclude_globs():
    m = qp.quantize(TinyBlock(128, 256), "int8_rowwise", include=["*_proj"], exclude="down_*")
    assert isinstance(m.up_proj, qp.QuantizedLinear)
    assert type(m.down_proj) is torch.nn.Linear
    m = qp.quantize(TinyBlock(128, 256), "int8_rowwise", include="q_proj")
    assert isinstance(m.q_proj, qp.QuantizedLinear) and type(m.k_proj) is torch.nn.Linear


def test_bad_group_size_names_the_layer_and_leaves_the_model_alone():
    m = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 96), torch.nn.Linear(96, 8))
    with pytest.raises(ValueError) as e:
        qp.quantize(m, "w4a16", group_size=128)
    assert "1: K=64" in str(e.value) and "2: K=96" in str(e.value) and "exclude" in str(e.value)
    assert all(type(x) is torch.nn.Linear for x in m)  # nothing half-done
    qp.quantize(m, "w4a16", group_size=128, exclude=["1", "2"])
    assert isinstance(m[0], qp.QuantizedLinear) and type(m[1]) is torch.nn.Linear


def test_option_errors():
    with pytest.raises(ValueError, match="group size"):
        qp.quantize(torch.nn.Linear(64, 8), "w4a16", group_size=16)
    with pytest.raises(ValueError, match="zero_points is a w4a16 option"):
        qp.quantize(torch.nn.Linear(64, 8), "int8_rowwise", zero_points=True)
    with pytest.raises(ValueError, match="unknown scheme"):
        qp.quantize(torch.nn.Linear(64, 8), "int3")


def test_root_linear_is_returned_quantized():
    q = qp.quantize(torch.nn.Linear(128, 8), "fp8_tensor")
    assert isinstance(q, qp.QuantizedLinear) and "fp8_tensor" in repr(q)


@pytest.mark.parametrize("scheme", [s.name for s in S.all_schemes()])
def test_eager_forward_is_close_to_float(scheme):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64)
    x = torch.randn(2, 5, 256)
    ref = lin(x)
    q = qp.quantize(torch.nn.Sequential(lin), scheme, group_size=64 if scheme == "w4a16" else None)[0]
    y = q(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert S.relative_error(y, ref) < (0.15 if scheme == "w4a16" else 0.06)
    assert S.relative_error(q.dequantized_weight(), lin.weight) < (0.15 if scheme == "w4a16" else 0.05)


@pytest.mark.parametrize("scheme", ["fp8_rowwise", "int8_weight_only", "fp8_block"])
def test_group_size_for_a_scheme_without_groups_raises(scheme):
    with pytest.raises(ValueError, match=f"group_size is a w4a16 option; scheme {scheme} has no weight groups"):
        qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 8)), scheme, group_size=64)


def test_w4a16_group_size_defaults_to_128():
    q = qp.quantize(torch.nn.Sequential(torch.nn.Linear(256, 8)), "w4a16")[0]
    assert q.group_size == 128 and q.weight_scale.shape == (8, 2)


@pytest.mark.parametrize("name,meant", [("int4", "w4a16"), ("INT4", "w4a16"), ("fp8", "fp8_rowwise"),
                                        ("fp8-rowwize", "fp8_rowwise")])
def test_a_near_miss_scheme_name_gets_a_hint(name, meant):
    with pytest.raises(ValueError, match=f"Did you mean '{meant}'"):
        qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 8)), name)


def test_quantize_refuses_a_quantized_model():
    m = qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 32)), "fp8_rowwise")
    with pytest.raises(ValueError, match="already quantized .*2 QuantizedLinear.*fp8_rowwise"):
        qp.quantize(m, "int8_rowwise")


def test_quantize_include_that_matches_nothing_is_an_error():
    m = torch.nn.Sequential(torch.nn.Linear(128, 64))
    with pytest.raises(ValueError, match=r"leave no nn.Linear to quantize; the model's linears: '0'"):
        qp.quantize(m, "fp8_rowwise", include=["layers.*"])
    assert type(m[0]) is torch.nn.Linear  # untouched


def test_quantize_warns_about_a_glob_that_matches_nothing():
    m = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 32))
    with pytest.warns(UserWarning, match="exclude pattern 'lm_head' matches no nn.Linear"):
        qp.quantize(m, "fp8_rowwise", exclude=["lm_head"])
    from qlinear_pass.nn import QuantizedLinear

    assert all(isinstance(x, QuantizedLinear) for x in m)


def test_quantize_shows_progress_when_asked(capsys):
    m = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 32))
    qp.quantize(m, "int8_weight_only", progress=True)
    err = capsys.readouterr().err
    assert "quantizing to int8_weight_only" in err and "2/2" in err


# --- the weight layout a w4a16 layer holds ---------------------------------------------------------


def _int4_model(zero_points=False, bias=True):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 48, bias=bias), torch.nn.Linear(48, 32, bias=bias))
    return m, qp.quantize(m, "w4a16", group_size=32 if zero_points else 64, zero_points=zero_points, include=["0"])


@pytest.mark.parametrize("zero_points", [False, True])
def test_a_layer_in_the_mma16_layout_holds_one_copy_and_computes_the_same(zero_points):
    from qlinear_pass.kernels import int4_layout as L

    _, public = _int4_model(zero_points)
    packed = copy.deepcopy(public)
    layer = packed[0].repack("mma16")
    assert layer is packed[0] and layer.weight_layout == "mma16" and "weight_layout='mma16'" in repr(layer)
    assert layer.weight.shape == (3, 16, 128) and torch.equal(L.from_mma16(layer.weight), public[0].weight)
    assert [n for n, _ in layer.named_buffers()] == [n for n, _ in public[0].named_buffers()]  # replaced, not added
    x = torch.randn(3, 256)
    assert torch.equal(packed(x), public(x))
    assert torch.equal(layer.dequantized_weight(), public[0].dequantized_weight())
    # checkpoints carry the public layout, and load into either layout
    sd = packed.state_dict()
    assert sd.keys() == public.state_dict().keys()
    assert all(torch.equal(sd[key], t) for key, t in public.state_dict().items())
    fresh = copy.deepcopy(public)
    fresh[0].repack("mma16").weight.zero_()
    fresh.load_state_dict(sd)
    assert fresh[0].weight_layout == "mma16" and torch.equal(fresh[0].weight, layer.weight)
    assert torch.equal(layer.repack("public").weight, public[0].weight) and layer.weight_layout == "public"


def test_quantize_holds_the_layout_asked_for_and_says_which_layers_cannot():
    m = qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 64)), "w4a16", weight_layout="mma16")
    assert m[0].weight_layout == "mma16" and m[0].weight.shape == (4, 8, 128)
    odd = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(128, 24))
    with pytest.raises(ValueError, match=r"1: weight_layout='mma16' needs N and K divisible by 16 \(N=24, K=128\)"):
        qp.quantize(odd, "w4a16", weight_layout="mma16")
    assert all(type(x) is torch.nn.Linear for x in odd)
    with pytest.raises(ValueError, match="holds int4 weights"):
        qp.quantize(torch.nn.Linear(128, 64), "int8_weight_only", weight_layout="mma16")
    with pytest.raises(ValueError, match="not one of"):
        qp.quantize(torch.nn.Linear(128, 64), "w4a16", weight_layout="marlin")
    q = qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 64)), "fp8_rowwise")[0]
    with pytest.raises(ValueError, match="holds int4 weights"):
        q.repack("mma16")
    assert q.repack("public") is q


def test_the_mma16_layout_on_a_gpu_without_nvcc_is_a_warning(monkeypatch):
    import warnings

    from qlinear_pass import nn as QN
    from qlinear_pass.kernels import cuda_build

    monkeypatch.setattr(cuda_build, "toolchain", lambda *a: (None, "nvcc was not found"))
    with pytest.warns(UserWarning, match=r"cannot build \(nvcc was not found\).*weight_layout='public' keeps"):
        QN.warn_if_layout_unread("mma16", torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QN.warn_if_layout_unread("public", torch.device("cuda"))  # the public layout: Triton reads it
        QN.warn_if_layout_unread("mma16", torch.device("cpu"))  # a CPU: emulation either way
        qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 64)), "w4a16", weight_layout="mma16")
        monkeypatch.setattr(cuda_build, "toolchain", lambda *a: ("/usr/local/cuda/bin/nvcc", ""))
        QN.warn_if_layout_unread("mma16", torch.device("cuda"))  # nvcc: cuda_w4a16 reads it
