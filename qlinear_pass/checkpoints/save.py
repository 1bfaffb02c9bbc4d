"""``save_quantized``: a model with quantized layers -> compressed-tensors on disk."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from ..nn import QuantizedLinear
from . import compressed_tensors as CT
from . import safetensors_io as IO
from .errors import CheckpointError
from .progress import Progress

WEIGHTS_NAME = "model.safetensors"


def _model_config(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    to_dict = getattr(cfg, "to_dict", None)
    if callable(to_dict):
        out = dict(to_dict())
        out.pop("quantization_config", None)
        return out
    return {}


def save_quantized(model: nn.Module, path: "str | os.PathLike", *, progress: Optional[bool] = None) -> str:
    """Write ``model`` (quantized with :func:`~qlinear_pass.quantize` or loaded with
    :func:`load_quantized`) to ``path`` and return ``path``.

    A directory gets ``config.json`` (the model's own config when it has a
    Hugging Face style ``config``, plus ``quantization_config`` in the
    compressed-tensors format and a ``qlinear_pass`` entry naming each layer's
    scheme) and ``model.safetensors``; a path ending in ``.safetensors`` gets one
    file with both configs in its metadata.  Every scheme has a compressed-tensors
    form, so vLLM / transformers read what this writes; float layers are listed in
    ``ignore``.  ``load_quantized(float_model, path)`` gives back exactly the
    same integers, scales and biases.
    """
    path = os.fspath(path)
    q_layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not q_layers:
        raise CheckpointError("the model has no quantized layers: quantize it first (qlinear_pass.quantize) or save it with torch")
    if "" in q_layers:
        raise CheckpointError("the model is a single QuantizedLinear; wrap it in a module (the checkpoint names layers)")
    for n, m in q_layers.items():
        if any(t.is_meta for t in m.buffers()):
            raise CheckpointError(f"{n}: its tensors are on the meta device; nothing to save")

    groups: dict[tuple, dict] = {}
    ours: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    bar = Progress(len(q_layers), f"saving {os.path.basename(path.rstrip('/'))}", progress)
    try:
        for name, m in q_layers.items():
            zp = m.weight_zero is not None
            key = (m.scheme, m.group_size, zp)
            if key not in groups:
                groups[key] = dict(CT.group_of(m.scheme, m.group_size, zp), targets=[])
            groups[key]["targets"].append(name)
            ours[name] = {"scheme": m.scheme, "group_size": m.group_size, "zero_points": zp}
            params = {"weight": m.public_weight(), "weight_scale": m.weight_scale, "weight_zero": m.weight_zero}
            for suffix, t in CT.from_params(m.scheme, params, m.out_features, m.in_features).items():
                tensors[f"{name}.{suffix}"] = t
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias
            bar.update()
    finally:
        bar.close()
    for full, t in model.state_dict().items():
        owner = full.rpartition(".")[0]
        if owner in q_layers:
            continue
        if t.is_meta:
            raise CheckpointError(f"tensor {full}: on the meta device; nothing to save")
        tensors[full] = t

    formats = sorted({g["format"] for g in groups.values()})
    qc = {
        "quant_method": CT.QUANT_METHOD,
        "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": sorted(n for n, m in model.named_modules() if type(m) is nn.Linear),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
    }
    meta = {"version": CT.OUR_FORMAT_VERSION, "layers": ours}
    if path.endswith(".safetensors"):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        IO.write(path, tensors, {"format": "pt", "quantization_config": json.dumps(qc), CT.OUR_KEY: json.dumps(meta)})
        return path
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path}: exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    config = _model_config(model)
    config["quantization_config"] = qc
    config[CT.OUR_KEY] = meta
    IO.write(os.path.join(path, WEIGHTS_NAME), tensors, {"format": "pt"})
    tmp = os.path.join(path, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, "config.json"))
    return path
