"""``load_quantized``: a compressed-tensors checkpoint (or one we wrote) into a float model."""
from __future__ import annotations

import glob
import json
import os
import warnings
from typing import Optional

import torch
from torch import nn

from ..kernels.int4_layout import PUBLIC, check_layout, check_shape
from ..nn import QuantizedLinear, warn_if_layout_unread
from . import compressed_tensors as CT
from . import safetensors_io as IO
from .errors import CheckpointError
from .progress import Progress

#: tensor names that only a quantized layer has
QUANT_SUFFIXES = ("weight_scale", "weight_packed", "weight_shape", "weight_zero_point", "weight_g_idx", "input_scale", "weight_global_scale")
_MAX_LISTED = 20


def _json(text: str, what: str) -> dict:
    try:
        out = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{what}: not valid JSON ({exc})") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{what}: expected a JSON object")
    return out


def open_checkpoint(path: str) -> tuple[dict[str, IO.TensorRef], Optional[dict], Optional[dict]]:
    """Tensors (not yet read), ``quantization_config`` and our metadata of a directory or file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors file in the directory")
        cfg = None
        cfg_path = os.path.join(path, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                cfg = _json(f.read(), cfg_path)
    elif os.path.isfile(path):
        files, cfg = [path], None
    else:
        raise CheckpointError(f"{path}: no such file or directory")
    refs: dict[str, IO.TensorRef] = {}
    metas = []
    for fp in files:
        r, meta = IO.read_header(fp)
        for name, ref in r.items():
            if name in refs:
                raise CheckpointError(f"tensor {name}: in both {refs[name].file} and {fp}")
            refs[name] = ref
        metas.append((fp, meta))
    if os.path.isdir(path):
        index = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        for ip in index:
            with open(ip) as f:
                wmap = _json(f.read(), ip).get("weight_map") or {}
            for name, fname in wmap.items():
                if name not in refs:
                    raise CheckpointError(f"tensor {name}: listed in {ip} (file {fname}) but in no safetensors file of {path}")
    qc = ours = None
    if cfg is not None:
        qc, ours = cfg.get("quantization_config"), cfg.get(CT.OUR_KEY)
    for fp, meta in metas:
        if qc is None and "quantization_config" in meta:
            qc = _json(meta["quantization_config"], f"{fp}: metadata quantization_config")
        if ours is None and CT.OUR_KEY in meta:
            ours = _json(meta[CT.OUR_KEY], f"{fp}: metadata {CT.OUR_KEY}")
    return refs, qc, ours


def _persistent_tensors(model: nn.Module, skip: set[str]) -> list[tuple[str, torch.Tensor, bool]]:
    """(full name, tensor, persistent) of every parameter and buffer outside the layers in ``skip``."""
    out = []
    for mname, mod in model.named_modules(remove_duplicate=False):
        if mname in skip or any(mname.startswith(s + ".") for s in skip):
            continue
        prefix = mname + "." if mname else ""
        for n, p in mod._parameters.items():
            if p is not None:
                out.append((prefix + n, p, True))
        for n, b in mod._buffers.items():
            if b is not None:
                out.append((prefix + n, b, n not in mod._non_persistent_buffers_set))
    return out


def _check_ref(ref: Optional[IO.TensorRef], name: str, dtypes, shapes, what: str) -> Optional[str]:
    if ref is None:
        return f"tensor {name}: missing ({what})"
    if ref.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        return f"tensor {name}: dtype {str(ref.dtype).removeprefix('torch.')}, {what} stores {want}"
    if tuple(ref.shape) not in [tuple(s) for s in shapes]:
        want = " or ".join(str(list(s)) for s in shapes)
        return f"tensor {name}: shape {list(ref.shape)}, {what} needs {want}"
    return None


def _fail(problems: list[str], path: str) -> None:
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise CheckpointError(
        f"cannot load {path}: {len(problems)} problem(s); the model is unchanged\n  "
        + "\n  ".join(problems[:_MAX_LISTED])
        + more
    )


def load_quantized(
    model: nn.Module,
    path: "str | os.PathLike",
    *,
    device: "torch.device | str | None" = None,
    weight_layout: str = "public",
    progress: Optional[bool] = None,
) -> nn.Module:
    """Load a quantized checkpoint into ``model``, in place, and return it.

    ``model`` is the float model (any ``nn.Module``; its parameters may be on the
    meta device).  ``path`` is a directory with ``config.json`` (its
    ``quantization_config``, compressed-tensors as llm-compressor writes it) and
    ``*.safetensors`` files, or a directory / ``.safetensors`` file written by
    :func:`save_quantized`.  Every linear layer the config quantizes becomes a
    :class:`~qlinear_pass.QuantizedLinear` holding exactly the checkpoint's
    integers and scales; every other parameter or buffer found in the checkpoint
    is copied into the model (cast to the model's dtype).  Layers named in
    ``ignore`` stay float.

    Everything is checked before anything changes: a missing, truncated or
    mismatched tensor, or a quantization no scheme of ours holds exactly
    (act-order ``g_idx``, 2:4 sparsity, NVFP4, group-wise int8, static activation
    scales, ...), raises :class:`CheckpointError` naming the tensor or layer and
    the feature, and leaves ``model`` untouched.

    ``device``: where loaded tensors go (default: each layer's current device,
    or the CPU for meta tensors).  ``weight_layout``: how the w4a16 layers hold their
    weights (``QuantizedLinear``'s ``"public"`` or ``"mma16"``, the one copy the CUDA /
    CUTLASS int4 kernels read); other schemes keep the public layout.  ``progress``: True
    always, False never, None (default) when loading takes more than a few seconds.
    """
    check_layout(weight_layout)
    path = os.fspath(path)
    refs, qc, ours = open_checkpoint(path)
    if qc is None:
        raise CheckpointError(f"{path}: no quantization_config (in config.json or the safetensors metadata); not a quantized checkpoint")
    method = qc.get("quant_method", CT.QUANT_METHOD)
    if method != CT.QUANT_METHOD:
        raise CheckpointError(
            f"{path}: quant_method {method!r}; only compressed-tensors checkpoints are read "
            "(llm-compressor writes them; GPTQ / AWQ checkpoints convert to them)"
        )
    already = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if already:
        raise CheckpointError(f"the model already has quantized layers ({', '.join(already[:5])}); load into the float model")

    problems: list[str] = []
    assigned = CT.assign_groups(model, qc)
    sparsity = qc.get("sparsity_config") or {}
    if sparsity and sparsity.get("format", "dense") != "dense":
        sp_layers = CT.assign_groups(model, {"config_groups": {"s": {"targets": sparsity.get("targets") or []}}, "ignore": sparsity.get("ignore") or []})
        where = ", ".join(sorted(sp_layers)[:5]) or "(no layer of this model)"
        problems.append(f"{where}: sparsity {sparsity.get('sparsity_structure', '')} ({sparsity.get('format')}) is not supported")
    if qc.get("transform_config"):
        problems.append(f"transforms (rotations: {sorted(qc['transform_config'].get('config_groups', {}) or qc['transform_config'])}) are not supported")
    if qc.get("kv_cache_scheme"):
        warnings.warn(f"{path}: kv_cache_scheme is not applied; attention keeps its float KV cache", UserWarning, stacklevel=2)
    our_layers = (ours or {}).get("layers") or {}

    layers: dict[str, tuple[nn.Linear, CT.LayerFormat]] = {}
    for name, (gname, group) in assigned.items():
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            if any(f"{name}.{s}" in refs for s in QUANT_SUFFIXES):
                problems.append(f"{name}: quantized {type(mod).__name__} layers are not supported (only linear layers)")
            continue
        try:
            fmt = CT.layer_format(group, qc.get("format"))
        except CT.Unsupported as exc:
            problems.append(f"{name}: {exc} is not supported (config group {gname})")
            continue
        n, k = mod.out_features, mod.in_features
        if f"{name}.weight_g_idx" in refs:
            problems.append(f"{name}: act-order (tensor {name}.weight_g_idx) is not supported")
            continue
        why = CT.check_k(fmt, name, k)
        if why:
            problems.append(why)
            continue
        if weight_layout != PUBLIC and fmt.scheme == "w4a16" and check_shape(n, k):
            problems.append(f"{name}: weight_layout={weight_layout!r} needs N and K divisible by 16 (N={n}, K={k})")
            continue
        what = f"{fmt.scheme} ({fmt.storage}, {fmt.strategy} weight scales)"
        expected = CT.expected_tensors(fmt, n, k)
        for suffix, (dtypes, shapes) in expected.items():
            p = _check_ref(refs.get(f"{name}.{suffix}"), f"{name}.{suffix}", dtypes, shapes, what)
            if p:
                problems.append(p)
        bias_ref = refs.get(f"{name}.bias")
        if bias_ref is not None:
            if mod.bias is None:
                problems.append(f"tensor {name}.bias: the model's layer {name} has no bias")
            elif tuple(bias_ref.shape) != (n,) or not bias_ref.dtype.is_floating_point:
                problems.append(f"tensor {name}.bias: {str(bias_ref.dtype).removeprefix('torch.')}{list(bias_ref.shape)}, the layer needs a float [{n}]")
        elif mod.bias is not None and mod.bias.is_meta:
            problems.append(f"tensor {name}.bias: missing, and the model's bias is on the meta device")
        extra = [r for r in refs if r.startswith(name + ".") and r[len(name) + 1:] not in expected and r[len(name) + 1:] != "bias" and "." not in r[len(name) + 1:]]
        for r in extra:
            problems.append(f"tensor {r}: unexpected for a {what} layer")
        if name in our_layers:
            mine = our_layers[name]
            g = fmt.our_group_size(k)
            if mine.get("scheme") != fmt.scheme or mine.get("group_size") != g:
                problems.append(f"{name}: {CT.OUR_KEY} metadata says {mine}, quantization_config gives {fmt.scheme} group_size={g}")
        layers[name] = (mod, fmt)
    for name in our_layers:
        if name not in layers and name not in assigned:
            problems.append(f"{name}: {CT.OUR_KEY} metadata lists it, but quantization_config does not quantize a layer of that name")
    quant_names = set(layers) | set(assigned)
    for r in refs:
        prefix, _, suffix = r.rpartition(".")
        if suffix in QUANT_SUFFIXES and prefix not in quant_names:
            problems.append(f"tensor {r}: the checkpoint quantizes {prefix}, which the config does not target (or ignores) or the model lacks")

    # float tensors
    floats: list[tuple[str, torch.Tensor, IO.TensorRef]] = []
    seen_ids: dict[int, str] = {}
    consumed = {r for r in refs if r.rpartition(".")[0] in quant_names}
    pending_meta = []
    for full, t, persistent in _persistent_tensors(model, set(layers)):
        ref = refs.get(full) if persistent else None
        if ref is None:
            if t.is_meta:
                pending_meta.append((full, t, persistent))
            continue
        consumed.add(full)
        if tuple(ref.shape) != tuple(t.shape):
            problems.append(f"tensor {full}: shape {list(ref.shape)} in the checkpoint, the model has {list(t.shape)}")
        elif ref.dtype != t.dtype and not (ref.dtype.is_floating_point and t.dtype.is_floating_point):
            problems.append(f"tensor {full}: dtype {ref.dtype} in the checkpoint, the model has {t.dtype}")
        else:
            floats.append((full, t, ref))
            seen_ids.setdefault(id(t), full)
    for full, t, persistent in pending_meta:
        if id(t) in seen_ids:  # a tied alias of a loaded tensor is fine
            continue
        if persistent:
            problems.append(f"tensor {full}: on the meta device and not in the checkpoint")
        else:
            problems.append(
                f"tensor {full}: a non-persistent buffer (computed when the module is built, never in a "
                "checkpoint) is still on the meta device; build the model with only its parameters on meta "
                "(accelerate's `init_empty_weights()`, as from_pretrained does), on a real device, or "
                "initialise that buffer before loading"
            )
    if problems:
        _fail(problems, path)
    unused = sorted(set(refs) - consumed)
    if unused:
        warnings.warn(f"{path}: {len(unused)} tensor(s) match nothing in the model and are not loaded: {', '.join(unused[:10])}", UserWarning, stacklevel=2)

    # read and convert, still without touching the model
    def where(t: torch.Tensor) -> torch.device:
        if device is not None:
            return torch.device(device)
        return torch.device("cpu") if t.is_meta else t.device

    w4 = [mod for mod, fmt in layers.values() if fmt.scheme == "w4a16"]
    if w4:
        warn_if_layout_unread(weight_layout, where(w4[0].weight), stacklevel=3)
    bar = Progress(len(layers) + len(floats), f"loading {os.path.basename(path.rstrip('/'))}", progress)
    try:
        new_layers: dict[str, QuantizedLinear] = {}
        for name, (mod, fmt) in layers.items():
            dev = where(mod.weight)
            n, k = mod.out_features, mod.in_features

            def get(suffix: str, _name=name, _dev=dev) -> torch.Tensor:
                return refs[f"{_name}.{suffix}"].load(_dev)

            params = CT.to_params(fmt, get, f"{name}.", n, k)
            bias = None
            if mod.bias is not None:
                bias = get("bias") if f"{name}.bias" in refs else mod.bias.detach()
                bias = bias.to(device=dev, dtype=mod.bias.dtype)
            layer = QuantizedLinear(fmt.scheme, k, n, params, bias, group_size=fmt.our_group_size(k))
            new_layers[name] = layer.repack(weight_layout) if fmt.scheme == "w4a16" else layer
            bar.update()
        new_floats = []
        for full, t, ref in floats:
            new_floats.append((full, t, ref.load(where(t)).to(t.dtype)))
            bar.update()
    finally:
        bar.close()

    # swap
    replaced: dict[int, torch.Tensor] = {}
    for full, old, new in new_floats:
        mname, _, attr = full.rpartition(".")
        mod = model.get_submodule(mname)
        if attr in mod._parameters:
            if id(old) in replaced:
                mod._parameters[attr] = replaced[id(old)]
            elif old.is_meta or old.device != new.device:
                replaced[id(old)] = mod._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                with torch.no_grad():
                    old.copy_(new)
        else:
            if old.is_meta or old.device != new.device:
                mod._buffers[attr] = replaced.setdefault(id(old), new)
            else:
                old.copy_(new)
    for name, q in new_layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model
