"""The compressed-tensors format (what llm-compressor writes and vLLM / transformers read)
<-> the parameters of our schemes.

A checkpoint's ``quantization_config`` has ``config_groups``: each a list of
``targets`` (module class names, exact module names, or ``re:`` regexes) with
``weights`` / ``input_activations`` arguments (``num_bits``, ``type`` int|float,
``strategy`` tensor|channel|group|block|token, ``symmetric``, ``dynamic``,
``group_size``, ``block_structure``, ``actorder``) and a ``format``; an
``ignore`` list of modules kept in float.  Per quantized linear ``p``:

* ``float-quantized`` / ``int-quantized`` / ``naive-quantized``: ``p.weight``
  (float8_e4m3fn or int8, [N, K]) and ``p.weight_scale``;
* ``pack-quantized``: ``p.weight_packed`` (int32 [N, ceil(K * bits / 32)]:
  value ``i`` of a row sits at bits ``bits * (i % (32 / bits))`` of word
  ``i // (32 / bits)``, stored as ``q + 2^(bits-1)``), ``p.weight_shape``
  ([N, K]), ``p.weight_scale`` and, when asymmetric, ``p.weight_zero_point``
  packed the same way along the output dimension (int32 [ceil(N * bits / 32), G]);
* ``weight_scale``: [1] (tensor), [N, 1] (channel), [N, K/g] (group),
  [ceil(N/128), K/128] (128x128 block); dequantised ``w = (q - zero) * scale``.

Our ``w4a16`` keeps the same nibbles (``q + 8``, even k in the low nibble of a
byte) and zero points ``zero + 8``, so both directions move integers and
scales without any rounding.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

import torch
from torch import nn

from .. import schemes as S
from .errors import CheckpointError

QUANT_METHOD = "compressed-tensors"
#: formats whose tensors we read (per config group, or global)
READABLE_FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")
#: our metadata in config.json (and in a single file's safetensors metadata)
OUR_KEY = "qlinear_pass"
OUR_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LayerFormat:
    """How one quantized linear is stored, and which of our schemes holds it exactly."""

    scheme: str
    storage: str  # float-quantized | int-quantized | naive-quantized | pack-quantized
    num_bits: int
    strategy: str  # tensor | channel | group | block
    ct_group_size: Optional[int] = None  # group strategy only
    zero_points: bool = False

    @property
    def packed(self) -> bool:
        return self.storage == "pack-quantized"

    def our_group_size(self, k: int) -> Optional[int]:
        if self.scheme != "w4a16":
            return None
        if self.strategy == "group":
            return self.ct_group_size
        for g in sorted(S.GROUP_SIZES, reverse=True):  # channel-wise: one scale repeated per group
            if k % g == 0:
                return g
        return None


class Unsupported(Exception):
    """A config group we cannot hold; raised per layer with the layer's name."""


def _args(d: Optional[dict], what: str) -> Optional[dict]:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise Unsupported(f"{what} arguments are not an object: {d!r}")
    out = dict(d)
    out.setdefault("num_bits", 8)
    out.setdefault("type", "int")
    out.setdefault("symmetric", True)
    out.setdefault("dynamic", False)
    if out.get("strategy") is None:
        if out.get("group_size") not in (None, -1):
            out["strategy"] = "group"
        elif out.get("block_structure") is not None:
            out["strategy"] = "block"
        else:
            out["strategy"] = "tensor"
    return out


def layer_format(group: dict, default_format: Optional[str]) -> LayerFormat:
    """The LayerFormat of one config group, or ``Unsupported`` naming the feature."""
    w = _args(group.get("weights"), "weights")
    a = _args(group.get("input_activations"), "input_activations")
    if group.get("output_activations") is not None:
        raise Unsupported("output activation quantization")
    if w is None:
        raise Unsupported("a config group without weight quantization (activation-only)")
    fmt = group.get("format") or default_format
    if fmt in (None, "mixed-precision"):
        fmt = "pack-quantized" if (w["type"] == "int" and w["num_bits"] < 8) else ("float-quantized" if w["type"] == "float" else "int-quantized")
    if fmt not in READABLE_FORMATS:
        feature = {
            "nvfp4-pack-quantized": "NVFP4 weights",
            "mxfp4-pack-quantized": "MXFP4 weights",
            "mxfp6-pack-quantized": "MXFP6 weights",
            "mxfp8-quantized": "MXFP8 weights",
            "marlin-24": "2:4 sparsity (marlin-24)",
            "sparse-24-bitmask": "2:4 sparsity (sparse-24-bitmask)",
            "sparse-bitmask": "sparse-bitmask sparsity",
            "dense": "a quantization group stored dense (fake-quantized float weights)",
        }.get(fmt, f"the {fmt!r} format")
        raise Unsupported(feature)
    if w.get("actorder") not in (None, "static", "weight", False):
        raise Unsupported(f"act-order (actorder={w['actorder']!r}, weight_g_idx)")
    bits, wtype, strat = w["num_bits"], w["type"], w["strategy"]
    if w.get("dynamic"):
        raise Unsupported("dynamic weight quantization")
    if wtype == "float" and bits != 8:
        raise Unsupported(f"FP{bits} weights (NVFP4 / MXFP4 style)")
    if wtype == "float" and fmt == "pack-quantized":
        raise Unsupported("float weights in the pack-quantized format")
    if a is not None:
        if not a.get("dynamic"):
            raise Unsupported("static activation scales (input_scale); only dynamic activation quantization is supported")
        if not a.get("symmetric", True):
            raise Unsupported("asymmetric activation quantization")
        if a["num_bits"] != 8 or a["type"] != wtype or bits != 8:
            raise Unsupported(f"W{bits}{wtype} weights with A{a['num_bits']}{a['type']} activations")
    if not w["symmetric"] and not (wtype == "int" and bits == 4):
        raise Unsupported(f"asymmetric {bits}-bit {wtype} weights (zero points)")

    def fmt_(scheme, **kw):
        return LayerFormat(scheme, fmt, bits, strat, **kw)

    if wtype == "float":
        if a is None:
            if strat in ("tensor", "channel"):
                return fmt_("fp8_weight_only")
            raise Unsupported(f"FP8 weight-only quantization with {strat} weight scales")
        astrat = a["strategy"]
        if strat == "tensor" and astrat == "tensor":
            return fmt_("fp8_tensor")
        if strat in ("tensor", "channel") and astrat == "token":
            return fmt_("fp8_rowwise")
        if strat == "block":
            if list(w.get("block_structure") or []) != [S.BLOCK, S.BLOCK]:
                raise Unsupported(f"FP8 block structure {w.get('block_structure')} (only 128x128)")
            if astrat != "group" or a.get("group_size") != S.BLOCK:
                raise Unsupported(f"FP8 128x128 block weights with {astrat} activation scales (only 1x128 groups)")
            return fmt_("fp8_block")
        raise Unsupported(f"FP8 {strat} weight scales with {astrat} activation scales")
    if wtype != "int":
        raise Unsupported(f"weight type {wtype!r}")
    if bits == 8:
        if strat == "group":
            raise Unsupported(f"group-wise int8 weights (group_size={w.get('group_size')})")
        if strat not in ("tensor", "channel"):
            raise Unsupported(f"int8 weights with {strat} scales")
        if a is None:
            return fmt_("int8_weight_only")
        if a["strategy"] != "token":
            raise Unsupported(f"INT8 W8A8 with {a['strategy']} activation scales (only per token)")
        return fmt_("int8_rowwise")
    if bits == 4:
        if a is not None:
            raise Unsupported("int4 weights with quantized activations")
        if strat == "group":
            if w.get("group_size") not in S.GROUP_SIZES:
                raise Unsupported(f"int4 group size {w.get('group_size')} (supported: {S.GROUP_SIZES})")
            return fmt_("w4a16", ct_group_size=int(w["group_size"]), zero_points=not w["symmetric"])
        if strat == "channel":
            return fmt_("w4a16", zero_points=not w["symmetric"])
        raise Unsupported(f"int4 weights with {strat} scales")
    raise Unsupported(f"{bits}-bit integer weights")


# --- which modules a config names -------------------------------------------------


def _match(name: str, module: nn.Module, target: str) -> int:
    """0: no match; 3: exact name; 2: regex; 1: class name (CT's precedence)."""
    if target.startswith("re:"):
        return 2 if re.match(target[3:], name) else 0
    if target == name:
        return 3
    return 1 if any(c.__name__ == target for c in type(module).__mro__) else 0


def assign_groups(model: nn.Module, qc: dict) -> dict[str, tuple[str, dict]]:
    """module name -> (group name, group) for every module a config group targets and
    ``ignore`` does not name; the most specific target wins (name, then regex, then class)."""
    groups = qc.get("config_groups") or {}
    ignore = list(qc.get("ignore") or [])
    out: dict[str, tuple[str, dict]] = {}
    for name, mod in model.named_modules():
        if not name or any(_match(name, mod, t) for t in ignore):
            continue
        best, best_rank = None, 0
        for gname, g in groups.items():
            if not isinstance(g, dict):
                raise CheckpointError(f"quantization_config: config group {gname!r} is {g!r}; preset names are not read, expand them")
            for t in g.get("targets") or []:
                r = _match(name, mod, t)
                if r > best_rank:
                    best, best_rank = (gname, g), r
        if best is not None:
            out[name] = best
    return out


# --- tensors ------------------------------------------------------------------------


def expected_tensors(fmt: LayerFormat, n: int, k: int) -> dict[str, tuple[tuple, tuple]]:
    """tensor suffix -> (allowed dtypes, allowed shapes) for one layer."""
    floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    ints = (torch.int64, torch.int32)
    if fmt.strategy == "tensor":
        scale_shapes = ((1,), ())
    elif fmt.strategy == "channel":
        scale_shapes = ((n, 1), (n,))
    elif fmt.strategy == "group":
        scale_shapes = ((n, -(-k // fmt.ct_group_size)),)
    else:
        scale_shapes = ((-(-n // S.BLOCK), -(-k // S.BLOCK)),)
    out: dict[str, tuple[tuple, tuple]] = {"weight_scale": (floats, scale_shapes)}
    if fmt.packed:
        out["weight_packed"] = ((torch.int32,), ((n, -(-k * fmt.num_bits // 32)),))
        out["weight_shape"] = (ints, ((2,),))
        if fmt.zero_points:
            g = scale_shapes[0][1] if len(scale_shapes[0]) == 2 else 1
            out["weight_zero_point"] = ((torch.int32,), ((-(-n * fmt.num_bits // 32), g),))
    else:
        wdtype = S.FP8 if fmt.scheme.startswith("fp8") else torch.int8
        out["weight"] = ((wdtype,), ((n, k),))
    return out


def unpack_words(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 [R, W] -> the unsigned ``bits``-wide fields [R, count] (int64)."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=words.device) * bits
    vals = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(words.shape[0], -1)[:, :count]


def pack_words(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned fields [R, C] -> int32 [R, ceil(C * bits / 32)], the first field in the low bits."""
    per = 32 // bits
    v = vals.to(torch.int64)
    v = torch.nn.functional.pad(v, (0, -v.shape[1] % per)).reshape(v.shape[0], -1, per)
    shifts = torch.arange(per, dtype=torch.int64, device=vals.device) * bits
    w = (v << shifts).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _scale32(t: torch.Tensor, name: str) -> torch.Tensor:
    s = t.to(torch.float32)
    if t.dtype == torch.float64 and not torch.equal(s.to(torch.float64), t):
        raise CheckpointError(f"tensor {name}: float64 scales that float32 cannot hold exactly")
    return s


def to_params(fmt: LayerFormat, get: Callable[[str], torch.Tensor], prefix: str, n: int, k: int) -> dict:
    """The checkpoint's tensors of one layer -> our scheme's parameters, exactly."""
    scale = _scale32(get("weight_scale"), prefix + "weight_scale")
    if fmt.packed:
        shape = [int(v) for v in get("weight_shape").tolist()]
        if shape != [n, k]:
            raise CheckpointError(f"tensor {prefix}weight_shape: says {shape}, the model's layer is [N, K] = [{n}, {k}]")
        q = unpack_words(get("weight_packed"), fmt.num_bits, k)  # q + 2^(bits-1)
    else:
        q = get("weight")
    if fmt.scheme == "w4a16":
        g = fmt.our_group_size(k)
        zero = None
        if fmt.zero_points:
            zp = unpack_words(get("weight_zero_point").t().contiguous(), 4, n).t()  # [N, G] nibbles = zero + 8
            zero = zp.to(torch.uint8)
        if fmt.strategy == "channel":
            scale = scale.reshape(n, 1).expand(n, k // g).contiguous()
            zero = None if zero is None else zero.reshape(n, 1).expand(n, k // g).contiguous()
        return {"weight": S.pack_int4(q.to(torch.uint8)), "weight_scale": scale, "weight_zero": zero}
    if fmt.packed:  # 8-bit pack-quantized: bytes are q + 128
        q = (q - 128).to(torch.int8)
    if fmt.scheme == "fp8_tensor":
        return {"weight": q, "weight_scale": scale.reshape(())}
    if fmt.scheme == "fp8_block":
        return {"weight": q, "weight_scale": scale}
    # per output channel; a per-tensor scale is the same value on every channel
    return {"weight": q, "weight_scale": scale.reshape(-1).expand(n).contiguous()}


# --- our modules -> compressed-tensors ----------------------------------------------------


def _wargs(num_bits, type_, strategy, *, symmetric=True, group_size=None, block=None) -> dict:
    return {
        "num_bits": num_bits, "type": type_, "symmetric": symmetric, "group_size": group_size,
        "strategy": strategy, "block_structure": block, "dynamic": False, "actorder": None,
    }


def _aargs(type_, strategy, group_size=None) -> dict:
    return {
        "num_bits": 8, "type": type_, "symmetric": True, "group_size": group_size,
        "strategy": strategy, "block_structure": None, "dynamic": True, "actorder": None,
    }


def group_of(scheme: str, group_size: Optional[int], zero_points: bool) -> dict:
    """The config group (without targets) that stores ``scheme`` exactly."""
    if scheme == "fp8_tensor":
        return {"weights": _wargs(8, "float", "tensor"), "input_activations": _aargs("float", "tensor"), "format": "float-quantized"}
    if scheme == "fp8_rowwise":
        return {"weights": _wargs(8, "float", "channel"), "input_activations": _aargs("float", "token"), "format": "float-quantized"}
    if scheme == "fp8_block":
        return {"weights": _wargs(8, "float", "block", block=[S.BLOCK, S.BLOCK]), "input_activations": _aargs("float", "group", S.BLOCK), "format": "float-quantized"}
    if scheme == "fp8_weight_only":
        return {"weights": _wargs(8, "float", "channel"), "input_activations": None, "format": "float-quantized"}
    if scheme == "int8_rowwise":
        return {"weights": _wargs(8, "int", "channel"), "input_activations": _aargs("int", "token"), "format": "int-quantized"}
    if scheme == "int8_weight_only":
        return {"weights": _wargs(8, "int", "channel"), "input_activations": None, "format": "pack-quantized"}
    if scheme == "w4a16":
        return {"weights": _wargs(4, "int", "group", symmetric=not zero_points, group_size=group_size), "input_activations": None, "format": "pack-quantized"}
    raise CheckpointError(f"scheme {scheme} has no compressed-tensors form")


def from_params(scheme: str, params: dict, n: int, k: int) -> dict[str, torch.Tensor]:
    """Our parameters of one layer -> its compressed-tensors tensors (suffix -> tensor)."""
    w, scale = params["weight"], params["weight_scale"].to(torch.float32)
    if scheme == "w4a16":
        g = scale.shape[-1]
        out = {
            "weight_packed": pack_words(S.unpack_int4(w), 4),
            "weight_shape": torch.tensor([n, k], dtype=torch.int64),
            "weight_scale": scale.reshape(n, g),
        }
        if params.get("weight_zero") is not None:
            out["weight_zero_point"] = pack_words(params["weight_zero"].t().contiguous(), 4).t().contiguous()
        return out
    if scheme == "int8_weight_only":
        return {
            "weight_packed": pack_words(w.to(torch.int16) + 128, 8),
            "weight_shape": torch.tensor([n, k], dtype=torch.int64),
            "weight_scale": scale.reshape(n, 1),
        }
    if scheme == "fp8_tensor":
        return {"weight": w, "weight_scale": scale.reshape(1)}
    if scheme == "fp8_block":
        return {"weight": w, "weight_scale": scale}
    return {"weight": w, "weight_scale": scale.reshape(n, 1)}


def check_k(fmt: LayerFormat, name: str, k: int) -> Optional[str]:
    """Why our scheme cannot hold this layer's K, or None."""
    if fmt.scheme == "w4a16" and fmt.our_group_size(k) is None:
        return f"{name}: channel-wise int4 weights need K divisible by one of {S.GROUP_SIZES}, got K={k}"
    if fmt.scheme == "w4a16" and fmt.strategy == "group" and k % fmt.ct_group_size:
        return f"{name}: K={k} is not a multiple of the int4 group size {fmt.ct_group_size}"
    if fmt.scheme == "fp8_block" and k % S.BLOCK:
        return f"{name}: fp8 block weights need K divisible by {S.BLOCK}, got K={k}"
    return None

