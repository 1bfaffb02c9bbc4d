"""Checkpoints written, and decompressed, by the compressed-tensors package itself."""
from __future__ import annotations

import copy
import os

import pytest
import torch

ct = pytest.importorskip("compressed_tensors")
safetensors_torch = pytest.importorskip("safetensors.torch")

from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402


class Net(torch.nn.Module):
    """A few linears named like a decoder layer, an ignored head, a norm."""

    def __init__(self, k: int = 256, n: int = 128, bias: bool = False) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(k)
        self.q_proj = torch.nn.Linear(k, n, bias=bias)
        self.up_proj = torch.nn.Linear(k, 2 * n, bias=bias)
        self.down_proj = torch.nn.Linear(2 * n, k, bias=bias)
        self.lm_head = torch.nn.Linear(k, 64, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return self.lm_head(self.down_proj(torch.relu(self.up_proj(h))) + self.q_proj(h).sum(-1, keepdim=True))


def float_model(k=256, n=128, bias=False, dtype=torch.bfloat16, seed=0) -> Net:
    torch.manual_seed(seed)
    m = Net(k, n, bias)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m.to(dtype)


def args(**kw) -> QuantizationArgs:
    return QuantizationArgs(**kw)


def _minmax(w: torch.Tensor, a: QuantizationArgs):
    n, k = w.shape
    st = str(a.strategy.value if hasattr(a.strategy, "value") else a.strategy)
    if st == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if st == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if st == "group":
        g = w.reshape(n, k // a.group_size, a.group_size)
        return g.amin(-1), g.amax(-1)
    if st == "block":
        bn, bk = a.block_structure
        nb = -(-n // bn)
        pad = torch.zeros(nb * bn, k, dtype=w.dtype)
        pad[:n] = w
        g = pad.reshape(nb, bn, k // bk, bk)
        return g.amin((1, 3)), g.amax((1, 3))
    raise ValueError(st)


def write(model: torch.nn.Module, path: str, weights: QuantizationArgs, input_activations=None, ignore=("lm_head",), fmt=None):
    """Quantize ``model`` (a copy) with compressed-tensors (min-max scales), compress and save it
    as llm-compressor does; returns the decompressed copy (compressed-tensors' own decompression)."""
    m = copy.deepcopy(model)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=input_activations, format=fmt)
    apply_quantization_config(m, QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore)), show_progress=False)
    for _, mod in m.named_modules():
        s = getattr(mod, "quantization_scheme", None)
        if s is None:
            continue
        lo, hi = _minmax(mod.weight.detach(), s.weights)
        scale, zp = calculate_qparams(lo, hi, s.weights)
        mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
        if hasattr(mod, "weight_zero_point"):
            mod.weight_zero_point.data.copy_(zp.reshape(mod.weight_zero_point.shape))
    comp = ModelCompressor.from_pretrained_model(m, quantization_format=fmt)
    comp.compress_model(m)
    os.makedirs(path, exist_ok=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, os.path.join(path, "model.safetensors"))
    comp.update_config(path)
    comp.decompress_model(m)
    return m


def decompress_dir(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Read a checkpoint directory with compressed-tensors as transformers does and decompress it."""
    import json

    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    m = copy.deepcopy(model)
    config = QuantizationConfig.model_validate(qc)
    comp = ModelCompressor(quantization_config=config)
    apply_quantization_config(m, config, show_progress=False)
    comp.compress_model(m)
    sd = safetensors_torch.load_file(os.path.join(path, "model.safetensors"))
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    comp.decompress_model(m)
    return m
