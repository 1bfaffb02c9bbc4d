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
