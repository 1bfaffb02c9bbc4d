"""Checkpoints written by the compressed-tensors package itself load exactly, and ours read back in it."""

import pytest
import torch

import qlinear_pass as qp
from qlinear_pass import schemes as S

from . import ct_reference as R

LAYERS = ("q_proj", "up_proj", "down_proj")

# (compressed-tensors weights, input activations, format or None) -> our scheme, our group size
CASES = {
    "fp8_tensor_w_token_a": (dict(num_bits=8, type="float", strategy="tensor"), dict(num_bits=8, type="float", strategy="token", dynamic=True), None, "fp8_rowwise", None),
    "fp8_dynamic": (dict(num_bits=8, type="float", strategy="channel"), dict(num_bits=8, type="float", strategy="token", dynamic=True), None, "fp8_rowwise", None),
    "fp8_tensor_dynamic": (dict(num_bits=8, type="float", strategy="tensor"), dict(num_bits=8, type="float", strategy="tensor", dynamic=True), None, "fp8_tensor", None),
    "fp8_block": (dict(num_bits=8, type="float", strategy="block", block_structure=[128, 128]), dict(num_bits=8, type="float", strategy="group", group_size=128, dynamic=True), None, "fp8_block", None),
    "fp8_weight_only": (dict(num_bits=8, type="float", strategy="channel"), None, None, "fp8_weight_only", None),
    "int8_w8a8": (dict(num_bits=8, type="int", strategy="channel"), dict(num_bits=8, type="int", strategy="token", dynamic=True), None, "int8_rowwise", None),
    "int8_w8a16": (dict(num_bits=8, type="int", strategy="channel"), None, "pack-quantized", "int8_weight_only", None),
    "int8_w8a16_int_quantized": (dict(num_bits=8, type="int", strategy="channel"), None, "int-quantized", "int8_weight_only", None),
    "w4a16_g128": (dict(num_bits=4, type="int", strategy="group", group_size=128), None, None, "w4a16", 128),
    "w4a16_g64_asym": (dict(num_bits=4, type="int", strategy="group", group_size=64, symmetric=False), None, None, "w4a16", 64),
    "w4a16_g32": (dict(num_bits=4, type="int", strategy="group", group_size=32), None, None, "w4a16", 32),
    "w4a16_g32_asym": (dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False), None, None, "w4a16", 32),
    "w4a16_channel": (dict(num_bits=4, type="int", strategy="channel"), None, None, "w4a16", 128),
    "w4a16_channel_asym": (dict(num_bits=4, type="int", strategy="channel", symmetric=False), None, None, "w4a16", 128),
}


def _write(tmp_path, case, dtype=torch.bfloat16, bias=True, n=128):
    w, a, fmt, _, _ = CASES[case]
    fm = R.float_model(n=n, bias=bias, dtype=dtype)
    path = str(tmp_path / case)
    ref = R.write(fm, path, R.args(**w), R.args(**a) if a else None, fmt=fmt)
    return fm, ref, path


@pytest.mark.parametrize("case", sorted(CASES))
def test_compressed_tensors_checkpoint_loads_exactly(tmp_path, case):
    fm, ref, path = _write(tmp_path, case)
    model = qp.load_quantized(R.float_model(bias=True, seed=7), path)  # other random weights: all must come from the checkpoint
    scheme, group = CASES[case][3], CASES[case][4]
    for name in LAYERS:
        q = getattr(model, name)
        assert isinstance(q, qp.QuantizedLinear) and q.scheme == scheme and q.group_size == group
        assert list(q.parameters()) == []
        theirs = getattr(ref, name).weight.detach()
        ours = q.dequantized_weight().to(theirs.dtype)
        assert (ours.float() - theirs.float()).abs().max().item() == 0, name
        torch.testing.assert_close(q.bias, getattr(fm, name).bias, rtol=0, atol=0)
    assert type(model.lm_head) is torch.nn.Linear  # ignored: float, from the checkpoint
    assert torch.equal(model.lm_head.weight, fm.lm_head.weight) and torch.equal(model.norm.weight, fm.norm.weight)
    # eager forward against the float model computing with compressed-tensors' dequantised weights
    # (weight-only: the same math; W8A8: plus our dynamic activation quantization)
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        got, expect = model(x), ref(x)
    tol = S.TOLERANCE[torch.bfloat16] if S.get_scheme(scheme).weight_only else 0.06
    assert S.relative_error(got, expect) < tol


@pytest.mark.parametrize("case", ["fp8_dynamic", "int8_w8a8", "w4a16_g64_asym", "w4a16_channel", "fp8_block"])
def test_loaded_model_compiles_to_the_eager_reference(tmp_path, case):
    _, _, path = _write(tmp_path, case, dtype=torch.float32)
    model = qp.load_quantized(R.float_model(dtype=torch.float32, bias=True, seed=7), path)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = model(x)
        model.requires_grad_(False)
        compiled = torch.compile(model, backend=qp.make("emulation", inductor=False))(x)
    assert S.relative_error(compiled, eager) < 1e-5
