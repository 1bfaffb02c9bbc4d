"""save_quantized writes compressed-tensors: an exact round trip, and compressed-tensors reads it."""
import json
import os

import pytest
import torch

import qlinear_pass as qp

from . import ct_reference as R

LAYERS = ("q_proj", "up_proj", "down_proj")
VARIANTS = [
    ("fp8_tensor", {}),
    ("fp8_rowwise", {}),
    ("fp8_block", {}),
    ("int8_rowwise", {}),
    ("int8_weight_only", {}),
    ("fp8_weight_only", {}),
    ("w4a16", dict(group_size=32)),
    ("w4a16", dict(group_size=128, zero_points=True)),
]


def _quantized(scheme, kw, dtype=torch.bfloat16, seed=0):
    return qp.quantize(R.float_model(bias=True, dtype=dtype, seed=seed), scheme, exclude="lm_head", **kw)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k], sb[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.dtype.itemsize == 1:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), k
    for n in LAYERS:
        qa, qb = getattr(a, n), getattr(b, n)
        assert (qa.scheme, qa.group_size) == (qb.scheme, qb.group_size)


@pytest.mark.parametrize("scheme, kw", VARIANTS, ids=[f"{s}{kw}" for s, kw in VARIANTS])
@pytest.mark.parametrize("single_file", [False, True])
def test_round_trip_is_exact(tmp_path, scheme, kw, single_file):
    model = _quantized(scheme, kw)
    path = str(tmp_path / ("m.safetensors" if single_file else "m"))
    assert qp.save_quantized(model, path) == path
    loaded = qp.load_quantized(R.float_model(bias=True, seed=3), path)
    _same_state(model, loaded)
    x = torch.randn(2, 256).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("scheme, kw", VARIANTS, ids=[f"{s}{kw}" for s, kw in VARIANTS])
def test_compressed_tensors_reads_what_we_write(tmp_path, scheme, kw):
    model = _quantized(scheme, kw, dtype=torch.float32)
    path = str(tmp_path / "m")
    qp.save_quantized(model, path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cfg["quantization_config"]["ignore"] == ["lm_head"]
    assert cfg["qlinear_pass"]["layers"]["q_proj"]["scheme"] == scheme
    theirs = R.decompress_dir(R.float_model(bias=True, dtype=torch.float32, seed=4), path)
    for n in LAYERS:
        ours = getattr(model, n).dequantized_weight()
        assert (getattr(theirs, n).weight.float() - ours).abs().max().item() == 0, n
        assert torch.equal(getattr(theirs, n).bias, getattr(model, n).bias)
    assert torch.equal(theirs.lm_head.weight, model.lm_head.weight)


def test_mixed_schemes_round_trip(tmp_path):
    model = qp.quantize(R.float_model(bias=True), "w4a16", group_size=64, zero_points=True, include="up_proj")
    model = qp.quantize(model, "fp8_rowwise", include=["q_proj", "down_proj"])
    path = qp.save_quantized(model, str(tmp_path / "m"))
    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 2
    R.QuantizationConfig.model_validate(qc)
    _same_state(model, qp.load_quantized(R.float_model(bias=True, seed=1), path))


def test_hf_style_config_is_kept(tmp_path):
    class Cfg:
        def to_dict(self):
            return {"model_type": "tiny", "hidden_size": 256}

    model = _quantized("int8_rowwise", {})
    model.config = Cfg()
    path = qp.save_quantized(model, str(tmp_path / "m"))
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "tiny" and cfg["hidden_size"] == 256 and "quantization_config" in cfg


def test_save_errors(tmp_path):
    with pytest.raises(qp.CheckpointError, match="no quantized layers"):
        qp.save_quantized(R.float_model(), str(tmp_path / "x"))
    (tmp_path / "file").write_text("")
    with pytest.raises(qp.CheckpointError, match="not a directory"):
        qp.save_quantized(_quantized("fp8_rowwise", {}), str(tmp_path / "file"))


@pytest.mark.parametrize("kw", [dict(group_size=32), dict(group_size=128, zero_points=True)])
def test_w4a16_layers_in_the_mma16_layout_save_and_load_the_public_bytes(tmp_path, kw):
    public = _quantized("w4a16", kw)
    packed = _quantized("w4a16", dict(kw, weight_layout="mma16"))
    assert all(getattr(packed, n).weight_layout == "mma16" for n in LAYERS)
    path = str(tmp_path / "m")
    qp.save_quantized(packed, path)
    back = qp.load_quantized(R.float_model(bias=True, seed=3), path)  # the public layout, as written
    assert all(getattr(back, n).weight_layout == "public" for n in LAYERS)
    _same_state(public, back)
    again = qp.load_quantized(R.float_model(bias=True, seed=3), path, weight_layout="mma16")
    for n in LAYERS:
        assert torch.equal(getattr(again, n).weight, getattr(packed, n).weight)
    x = torch.randn(2, 256).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(again(x), public(x))


def test_loading_into_a_layout_a_layer_cannot_hold_is_refused_before_anything_changes(tmp_path):
    model = qp.quantize(torch.nn.Sequential(torch.nn.Linear(128, 24)), "w4a16", group_size=32)
    path = str(tmp_path / "m")
    qp.save_quantized(model, path)
    target = torch.nn.Sequential(torch.nn.Linear(128, 24))
    with pytest.raises(qp.CheckpointError, match=r"0: weight_layout='mma16' needs N and K divisible by 16 \(N=24, K=128\)"):
        qp.load_quantized(target, path, weight_layout="mma16")
    assert type(target[0]) is torch.nn.Linear
    with pytest.raises(ValueError, match="not one of"):
        qp.load_quantized(target, path, weight_layout="tiles")
