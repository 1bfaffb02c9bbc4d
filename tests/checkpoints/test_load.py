"""load_quantized: bad checkpoints are clear errors that leave the model untouched; meta models; progress."""
import json
import os

import pytest
import torch

import qlinear_pass as qp
from qlinear_pass.checkpoints import load as L
from qlinear_pass.checkpoints import progress as P

from . import ct_reference as R

W4_ASYM = dict(num_bits=4, type="int", strategy="group", group_size=64, symmetric=False)
FP8_W = dict(num_bits=8, type="float", strategy="channel")
FP8_A = dict(num_bits=8, type="float", strategy="token", dynamic=True)


@pytest.fixture(scope="module")
def w4_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "w4")
    R.write(R.float_model(bias=True), path, R.args(**W4_ASYM))
    return path


def _copy(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


def _edit_config(path, fn):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    fn(cfg["quantization_config"])
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def _rewrite_tensors(path, fn):
    st = R.safetensors_torch
    f = os.path.join(path, "model.safetensors")
    sd = st.load_file(f)
    fn(sd)
    st.save_file(sd, f)


def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snap):
    mods, sd = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)


def _load_fails(path, *patterns, model=None):
    model = model or R.float_model(bias=True, seed=5)
    snap = _snapshot(model)
    with pytest.raises(qp.CheckpointError) as info:
        qp.load_quantized(model, path)
    msg = str(info.value)
    for p in patterns:
        assert p in msg, msg
    _assert_untouched(model, snap)
    return msg


def test_missing_tensor_is_named(w4_dir, tmp_path):
    path = _copy(w4_dir, tmp_path / "c")
    _rewrite_tensors(path, lambda sd: sd.pop("up_proj.weight_zero_point"))
    _load_fails(path, "tensor up_proj.weight_zero_point: missing")


def test_truncated_file_names_the_tensor(w4_dir, tmp_path):
    path = _copy(w4_dir, tmp_path / "c")
    f = os.path.join(path, "model.safetensors")
    refs, _ = L.IO.read_header(f)
    last = max(refs.values(), key=lambda r: r.end)
    with open(f, "r+b") as fh:
        fh.truncate(last.end - 3)
    _load_fails(path, f"tensor {last.name}", "truncated")


def test_mismatched_shape_and_wrong_scheme_dtype_are_named(w4_dir, tmp_path):
    path = _copy(w4_dir, tmp_path / "c")

    def damage(sd):
        sd["q_proj.weight_scale"] = sd["q_proj.weight_scale"][:, :2].contiguous()
        sd["down_proj.weight_packed"] = sd["down_proj.weight_packed"].to(torch.int16)

    _rewrite_tensors(path, damage)
    _load_fails(path, "tensor q_proj.weight_scale: shape [128, 2]", "tensor down_proj.weight_packed: dtype int16")


def test_checkpoint_of_another_model_is_refused(w4_dir):
    other = R.float_model(k=256, n=64, bias=True)  # q_proj is [64, 256] here
    _load_fails(w4_dir, "q_proj", model=other)


def test_wrong_scheme_in_config(w4_dir, tmp_path):
    """The config says FP8 but the tensors are packed int4."""
    path = _copy(w4_dir, tmp_path / "c")
    _edit_config(path, lambda qc: qc["config_groups"]["group_0"].update(weights=dict(FP8_W, symmetric=True, dynamic=False), format="float-quantized"))
    _load_fails(path, "tensor q_proj.weight: missing", "tensor q_proj.weight_packed: unexpected")


@pytest.mark.parametrize(
    "edit, feature",
    [
        (lambda qc: qc["config_groups"]["group_0"]["weights"].update(actorder="group"), "act-order"),
        (lambda qc: qc.update(sparsity_config={"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": ["lm_head"]}), "sparsity 2:4"),
        (lambda qc: qc["config_groups"]["group_0"].update(format="nvfp4-pack-quantized"), "NVFP4"),
        (lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=4, type="float"), "FP4 weights"),
        (lambda qc: qc.update(quant_method="gptq"), "quant_method 'gptq'"),
        (lambda qc: qc.update(transform_config={"config_groups": {"R1": {}}}), "transforms"),
    ],
)
def test_unsupported_variants_name_layer_and_feature(w4_dir, tmp_path, edit, feature):
    path = _copy(w4_dir, tmp_path / "c")
    _edit_config(path, edit)
    msg = _load_fails(path, feature)
    if "quant_method" not in feature and "transforms" not in feature:
        assert "q_proj" in msg


def test_act_order_g_idx_tensor_is_refused(w4_dir, tmp_path):
    path = _copy(w4_dir, tmp_path / "c")
    _rewrite_tensors(path, lambda sd: sd.__setitem__("q_proj.weight_g_idx", torch.arange(256, dtype=torch.int32) // 64))
    _load_fails(path, "q_proj: act-order (tensor q_proj.weight_g_idx)")


def test_group_wise_int8_weights_are_refused(tmp_path):
    path = str(tmp_path / "w8g")
    R.write(R.float_model(bias=True), path, R.args(num_bits=8, type="int", strategy="group", group_size=128))
    _load_fails(path, "q_proj: group-wise int8 weights (group_size=128)")


def test_static_activation_scales_are_refused(tmp_path):
    path = str(tmp_path / "fp8static")
    R.write(R.float_model(bias=True), path, R.args(num_bits=8, type="float", strategy="tensor"), R.args(num_bits=8, type="float", strategy="tensor", dynamic=False))
    _load_fails(path, "static activation scales")


def test_quantized_model_is_refused(w4_dir):
    model = qp.quantize(R.float_model(bias=True), "int8_weight_only")
    _load_fails(w4_dir, "already has quantized layers", model=model)


def test_meta_model_materialises_from_the_checkpoint(w4_dir):
    with torch.device("meta"):
        model = R.Net(256, 128, True).to(torch.bfloat16)
    qp.load_quantized(model, w4_dir)
    ref = qp.load_quantized(R.float_model(bias=True, seed=9), w4_dir)
    assert not any(t.is_meta for t in model.state_dict().values())
    for (a, x), (b, y) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert a == b and torch.equal(x, y), a
    x = torch.randn(2, 256).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_meta_model_with_a_tensor_not_in_the_checkpoint(w4_dir, tmp_path):
    path = _copy(w4_dir, tmp_path / "c")
    _rewrite_tensors(path, lambda sd: sd.pop("norm.bias"))
    with torch.device("meta"):
        model = R.Net(256, 128, True).to(torch.bfloat16)
    with pytest.raises(qp.CheckpointError, match="tensor norm.bias: on the meta device and not in the checkpoint"):
        qp.load_quantized(model, path)
    assert model.norm.weight.is_meta and type(model.q_proj) is torch.nn.Linear


def test_meta_model_with_a_non_persistent_buffer(w4_dir):
    """A buffer computed at construction (RoPE's inv_freq in Hugging Face models) is never saved:
    left on the meta device it is an error that says how to build the model instead."""
    with torch.device("meta"):
        model = R.Net(256, 128, True).to(torch.bfloat16)
        model.register_buffer("inv_freq", torch.ones(4), persistent=False)
    with pytest.raises(qp.CheckpointError, match="inv_freq: a non-persistent buffer .*init_empty_weights"):
        qp.load_quantized(model, w4_dir)
    model.inv_freq = torch.ones(4)  # built for real, as init_empty_weights() leaves buffers
    qp.load_quantized(model, w4_dir)
    assert not any(t.is_meta for t in model.state_dict().values())


def test_progress_lines(w4_dir, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # the plain stderr lines
    qp.load_quantized(R.float_model(bias=True), w4_dir, progress=True)
    err = capsys.readouterr().err
    assert "qlinear_pass: loading w4:" in err and "tensors" in err
    qp.load_quantized(R.float_model(bias=True), w4_dir)  # quick: nothing shown
    assert capsys.readouterr().err == ""


def test_progress_appears_only_after_the_delay(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)
    clock = [100.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    bar = P.Progress(4, "loading x", None)
    bar.update()
    assert capsys.readouterr().err == ""
    clock[0] += P.DELAY_S + 1
    bar.update()
    assert "loading x: 2/4 tensors" in capsys.readouterr().err
