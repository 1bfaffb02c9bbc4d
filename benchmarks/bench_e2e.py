#!/usr/bin/env python3
"""End to end: greedy decoding of a Llama-3-8B-shaped decoder, bf16 against each scheme x backend.

The model is plain PyTorch: hidden 4096, 32 layers, 32 heads / 8 KV heads (head dim 128),
intermediate 14336, vocab 128256, RMSNorm, RoPE, grouped-query attention over a static KV cache
(prefill through ``F.scaled_dot_product_attention``, decode through matmuls and a softmax that
split the cache length: :func:`decode_attention`), SwiGLU MLP, and q/k/v/o and
gate/up/down as separate bias-free linears (as in Hugging Face checkpoints).  Its random
weights are built on the device layer by layer, and each layer is quantized with
``qlinear_pass.quantize`` as soon as it is built; embedding and ``lm_head`` stay bf16.

Each variant (``bf16``, or ``scheme/backend``) runs in its own process, with a time limit,
and measures:

* decode tokens/s at batch 1 and 8: one decode step (embedding -> layers -> norm -> lm_head
  -> argmax -> next token and position written back) captured in one CUDA graph and replayed
  N times, median over a few runs;
* prefill of one 2048-token prompt (batch 1), CUDA events, median of a few;
* cold compile seconds (Inductor's caches off) and how many of them the pass took;
* peak GPU memory and the weight bytes of one decoder layer;
* accuracy on a 2-layer model of the same shapes: logits SQNR against the float32 model with
  the original weights, for the compiled model and for the eager reference modules;
* the kernels each quantized linear launches (torch.profiler over decode steps run outside
  the CUDA graph) and the step's top device kernels, and where the prefill's device time goes.
  These profiles run after every timed phase: a profiler session leaves CUPTI hooked into the
  process, and the host's kernel launches stay slower after it.

``--compile layer`` (default) compiles the decoder layer's forward function once (Dynamo
inlines the modules, so all layers share one graph) and captures the step in a
``torch.cuda.CUDAGraph``; ``--compile model`` compiles the whole step with Inductor's CUDA
graphs.  Writes ``bench_e2e.json`` (after every variant), ``bench_e2e.png`` and
``summary.md`` to --out (default ``benchmarks/results/<card>/e2e``).  ``--device cpu``
runs small shapes (``--small``) without CUDA graphs or kernel counts, anywhere.
``--inductor-pdl`` (or ``TORCHINDUCTOR_ENABLE_PDL=1``) compiles every variant, bf16 too, with
Inductor's programmatic dependent launch: its kernels let the next kernel start early, and our
decode kernels then load weights while the kernel before them finishes (``cuda_w4a16.pdl_for``
says which).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qlinear_pass as qp  # noqa: E402
from qlinear_pass import graph_pass  # noqa: E402
from qlinear_pass.config import normalize_backend, normalize_scheme  # noqa: E402

DEFAULT_VARIANTS = (
    "bf16",
    "fp8_rowwise/auto",
    "fp8_rowwise/torch",
    "fp8_block/auto",
    "int8_weight_only/auto",
    "fp8_weight_only/auto",
    "w4a16/auto",
    "int8_rowwise/auto",
)
#: backends that run without a GPU
CPU_BACKENDS = ("auto", "emulation", "torch")
#: profiler op names that are one linear layer, for variants whose kernels inline ATen matmuls
#: into the graph instead of running behind ``qlinear_pass::linear``
INLINE_LINEAR_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::_scaled_mm",
    "aten::_scaled_mm_v2",
    "aten::_int_mm",
    "aten::_weight_int8pack_mm",
    "aten::_weight_int4pack_mm",
)
LINEAR_OP = "qlinear_pass::linear"
#: one call for sibling layers that read the same activation (q/k/v, gate/up)
LINEAR_GROUP_OP = "qlinear_pass::linear_group"
#: one call, one or more layers, with the norm or SwiGLU before and the residual add after run in
#: the kernel (``qlinear_pass/fusion.py``): their device time counts as the linears'
LINEAR_FUSED_OP = "qlinear_pass::linear_fused"
ACT_DTYPE = torch.bfloat16


# --- model shapes and settings -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float = 500000.0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not a multiple of heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA3_8B = ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256)
SMALL = ModelShape(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=1000)


@dataclasses.dataclass
class Settings:
    device: str
    compile_mode: str  # "layer" or "model"
    shape: ModelShape
    small: bool
    inductor: bool
    inductor_pdl: bool  # Inductor's programmatic dependent launch (triton.enable_pdl), every variant
    batches: tuple
    decode_steps: int
    decode_runs: int
    warmup_steps: int
    prefill_tokens: int
    prefill_runs: int
    max_seq: int
    acc_layers: int
    acc_tokens: int
    profile_steps: int
    group_size: int
    seed: int
    #: how w4a16 layers hold their weights: "public", "mma16", or "auto" (see :func:`weight_layout`)
    w4a16_layout: str = "auto"

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def graphs(self) -> bool:
        return self.cuda

    def as_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = dataclasses.asdict(self.shape)
        d["batches"] = list(self.batches)
        d["cuda_graphs"] = self.graphs
        return d


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def settings_from(args: argparse.Namespace) -> Settings:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    small = args.small or device == "cpu"
    if device == "cpu" and not args.small and args.variant is None:
        log("--device cpu runs the --small shapes (the full model is 16 GB of bf16 weights)")
    shape = SMALL if small else LLAMA3_8B
    if args.layers is not None:
        shape = dataclasses.replace(shape, layers=args.layers)
    if args.compile == "model" and not args.inductor and device == "cuda":
        raise SystemExit("--compile model on a GPU needs Inductor (its CUDA graphs); drop --no-inductor")
    if small:
        steps, runs, warm, prefill, prefill_runs, acc_tokens = 4, 3, 2, 64, 3, 8
    elif args.quick:
        steps, runs, warm, prefill, prefill_runs, acc_tokens = 32, 3, 2, 2048, 3, 16
    else:
        steps, runs, warm, prefill, prefill_runs, acc_tokens = 64, 5, 3, 2048, 5, 16
    steps = args.decode_steps or steps
    prefill = args.prefill_tokens or prefill
    if steps < 1 or prefill < 1:
        raise SystemExit("--decode-steps and --prefill-tokens must be >= 1")
    # decode runs from position `prefill` (as after the prompt) for `steps` positions
    max_seq = _round_up(max(prefill + max(steps, warm + 1) + 1, acc_tokens + 1), 128)
    return Settings(
        device=device,
        compile_mode=args.compile,
        shape=shape,
        small=small,
        inductor=args.inductor,
        inductor_pdl=args.inductor_pdl or os.environ.get("TORCHINDUCTOR_ENABLE_PDL") == "1",
        batches=tuple(args.batch_sizes),
        decode_steps=steps,
        decode_runs=runs,
        warmup_steps=warm,
        prefill_tokens=prefill,
        prefill_runs=prefill_runs,
        max_seq=max_seq,
        acc_layers=min(2, shape.layers),
        acc_tokens=acc_tokens,
        profile_steps=2,
        group_size=args.group_size,
        seed=args.seed,
        w4a16_layout=args.w4a16_layout,
    )


# --- variants ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    scheme: Optional[str]
    backend: Optional[str]
    #: the pass's ``fuse`` (``LinearBackendConfig``); ``scheme/backend/nofuse`` turns it off
    fuse: bool = True

    @classmethod
    def parse(cls, text: str) -> "Variant":
        t = text.strip()
        if t.lower() == "bf16":
            return cls("bf16", None, None)
        parts = t.split("/")
        if len(parts) not in (2, 3) or len(parts) == 3 and parts[2].strip().lower() != "nofuse":
            raise ValueError(f"variant {text!r}: expected 'bf16', 'scheme/backend' or 'scheme/backend/nofuse', "
                             "e.g. 'fp8_rowwise/auto'")
        scheme = normalize_scheme(parts[0])
        backend = normalize_backend(parts[1])
        fuse = len(parts) == 2
        return cls(f"{scheme}/{backend}{'' if fuse else '/nofuse'}", scheme, backend, fuse)

    def label(self, group_size: int) -> str:
        if self.scheme == "w4a16":
            return f"w4a16 g{group_size}/{self.backend}{'' if self.fuse else '/nofuse'}"
        return self.name


def parse_variants(text: Optional[str], device: str) -> list:
    if text:
        out = [Variant.parse(v) for v in text.split(",") if v.strip()]
    else:
        out = [Variant.parse(v) for v in DEFAULT_VARIANTS]
        if device == "cpu":
            out = [v for v in out if v.backend is None or v.backend in CPU_BACKENDS]
    names = [v.name for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"variant(s) given twice: {', '.join(dup)}")
    return out


# --- the model ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device, dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, s: ModelShape, device, dtype) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = s.heads, s.kv_heads, s.head_dim
        kv = s.kv_heads * s.head_dim
        self.q_proj = nn.Linear(s.hidden, s.hidden, bias=False, device=device, dtype=dtype)
        self.k_proj = nn.Linear(s.hidden, kv, bias=False, device=device, dtype=dtype)
        self.v_proj = nn.Linear(s.hidden, kv, bias=False, device=device, dtype=dtype)
        self.o_proj = nn.Linear(s.hidden, s.hidden, bias=False, device=device, dtype=dtype)
        # static KV cache [batch, kv_heads, max_seq, head_dim], allocated by set_cache
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)


class MLP(nn.Module):
    def __init__(self, s: ModelShape, device, dtype) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False, device=device, dtype=dtype)


class DecoderLayer(nn.Module):
    def __init__(self, s: ModelShape, device, dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden, s.eps, device, dtype)
        self.self_attn = Attention(s, device, dtype)
        self.post_attention_layernorm = RMSNorm(s.hidden, s.eps, device, dtype)
        self.mlp = MLP(s, device, dtype)


class Decoder(nn.Module):
    """Embedding, decoder layers (appended by :func:`build_model`), final norm, lm_head, RoPE tables."""

    def __init__(self, s: ModelShape, max_seq: int, device, dtype) -> None:
        super().__init__()
        self.shape = s
        self.max_seq = max_seq
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden, device="meta", dtype=dtype)
        self.layers = nn.ModuleList()
        self.norm = RMSNorm(s.hidden, s.eps, "meta", dtype)
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False, device="meta", dtype=dtype)
        self.to_empty(device=device)
        d = s.head_dim
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        angles = torch.outer(torch.arange(max_seq, device=device, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.register_buffer("positions", torch.arange(max_seq, device=device), persistent=False)


def _generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _init_linear(lin: nn.Linear, std: float, gen: torch.Generator) -> None:
    lin.weight.normal_(0.0, std, generator=gen)
    lin.weight.requires_grad_(False)


def build_layer(s: ModelShape, index: int, device: str, dtype: torch.dtype, seed: int, depth_layers: int) -> DecoderLayer:
    """Decoder layer ``index`` with random weights: normal, std 1/sqrt(fan_in); o_proj and down_proj
    further scaled by 1/sqrt(2 * depth_layers) so the residual stream stays well-conditioned in
    depth.  The weights depend only on (seed, index), so a shallower model built with the same
    ``depth_layers`` has exactly the first layers of the deeper one."""
    layer = DecoderLayer(s, "meta", dtype).to_empty(device=device)
    gen = _generator(device, seed * 1009 + index + 1)
    depth = 1.0 / math.sqrt(2 * depth_layers)
    for name, mod in layer.named_modules():
        if isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
        elif isinstance(mod, nn.Linear):
            std = 1.0 / math.sqrt(mod.in_features)
            if name.endswith(("o_proj", "down_proj")):
                std *= depth
            _init_linear(mod, std, gen)
    return layer


#: backends whose w4a16 kernels read the MMA-fragment layout (and whose auto picks them on a GPU)
MMA16_BACKENDS = ("auto", "cuda", "cutlass")


def weight_layout(variant: "Variant", settings: Settings) -> str:
    """How a w4a16 variant's layers hold their weights: ``--w4a16-layout``, or with ``auto`` the one
    copy the CUDA / CUTLASS kernels read on a GPU when the variant's backend runs them ("mma16"),
    the public layout otherwise."""
    if settings.w4a16_layout != "auto":
        return settings.w4a16_layout
    return "mma16" if settings.cuda and variant.backend in MMA16_BACKENDS else "public"


def quantize_kw(variant: "Variant", settings: Settings) -> dict:
    """quantize()'s w4a16 arguments (group size, weight layout); other schemes take none."""
    if variant.scheme != "w4a16":
        return {}
    return {"group_size": settings.group_size, "weight_layout": weight_layout(variant, settings)}


def build_model(
    s: ModelShape,
    settings: Settings,
    dtype: torch.dtype,
    variant: Optional[Variant],
    progress: Callable[[str], None] = lambda m: None,
) -> Decoder:
    """The decoder, built on the device layer by layer; each layer quantized right after it is built."""
    device = settings.device
    with torch.no_grad():
        model = Decoder(s, settings.max_seq, device, dtype)
        gen = _generator(device, settings.seed * 1009)
        model.embed_tokens.weight.normal_(0.0, 1.0, generator=gen)
        model.embed_tokens.weight.requires_grad_(False)
        model.norm.weight.fill_(1.0)
        _init_linear(model.lm_head, 1.0 / math.sqrt(s.hidden), gen)
        for i in range(s.layers):
            layer = build_layer(s, i, device, dtype, settings.seed, settings.shape.layers)
            if variant is not None and variant.scheme is not None:
                qp.quantize(layer, variant.scheme, **quantize_kw(variant, settings))
            model.layers.append(layer)
            if (i + 1) % 8 == 0 or i + 1 == s.layers:
                progress(f"built {i + 1}/{s.layers} layers")
    return model


def set_cache(model: Decoder, batch: int, dtype: torch.dtype, static_address: bool = False) -> None:
    """(Re)allocate every layer's static KV cache for ``batch`` sequences of ``model.max_seq``."""
    s = model.shape
    for layer in model.layers:
        attn = layer.self_attn
        attn.k_cache = attn.v_cache = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    device = model.positions.device
    for layer in model.layers:
        attn = layer.self_attn
        for name in ("k_cache", "v_cache"):
            buf = torch.zeros(batch, s.kv_heads, model.max_seq, s.head_dim, device=device, dtype=dtype)
            if static_address:
                torch._dynamo.mark_static_address(buf)
            setattr(attn, name, buf)


def layer_weight_bytes(layer: nn.Module) -> int:
    """Bytes of one decoder layer's weights: parameters and buffers, the KV cache left out."""
    total = sum(p.numel() * p.element_size() for p in layer.parameters())
    for name, b in layer.named_buffers():
        if b is not None and not name.endswith("_cache"):
            total += b.numel() * b.element_size()
    return total


# --- forward functions (what is compiled) ----------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def decode_attention(qg: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Decode attention over the whole static cache: ``qg`` [B, kv_heads, R, D] (the query heads of
    each KV head folded into R rows), caches [B, kv_heads, S, D], ``mask`` [1, 1, R, S] bool (True:
    attend).  Returns [B, kv_heads, R, D] in the cache's dtype.

    Plain tensor ops, not ``F.scaled_dot_product_attention``: with a mask, SDPA picks a fused
    kernel that tiles only the query rows (cuDNN's flash forward on an H200: about 8 CTAs for 4
    rows, 45-49 us per layer at batch 1 and 8), where these ops become two cuBLAS batched matmuls
    that split the cache length over the whole GPU and one Inductor softmax kernel (about 12 us
    at batch 1, 31 us at batch 8, close to reading the cache once).  Scores come out of the
    matmul in the activation dtype (fp32 accumulation) and are scaled, masked and softmaxed in
    float32.  Every variant runs this same code, so attention does not hide the linears.
    ``bench_decode_attention.py`` times it beside SDPA and ``flex_attention`` (H200: 13.2 us a layer
    at batch 1 against 51.9 and 87.6, or 38.7 with Inductor's autotuning).
    """
    scale = qg.shape[-1] ** -0.5
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)).float() * scale
    scores = torch.where(mask, scores, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v_cache.dtype), v_cache)


def sdpa_decode_attention(qg: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same attention through ``F.scaled_dot_product_attention`` (the reference in the tests)."""
    return F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=mask)


def layer_forward(layer: DecoderLayer, x, cos, sin, pos, mask, prefill: bool, attention=decode_attention):
    """One decoder layer over ``x`` [B, T, hidden] at positions ``pos`` [T] (a device tensor).

    Writes the new keys and values into the layer's static cache with ``index_copy_``.  Prefill
    (positions 0..T-1) attends causally over its own keys through SDPA (its flash kernel tiles
    the 2048 query rows well); decode attends over the whole cache under ``mask`` with
    ``attention`` (:func:`decode_attention`), the query heads of each KV head folded into the
    query length so the cache is never expanded to the query heads.
    """
    attn, mlp = layer.self_attn, layer.mlp
    b, t, _ = x.shape
    nh, nkv, d = attn.heads, attn.kv_heads, attn.head_dim
    rep = nh // nkv
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(b, t, nh, d).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, nkv, d).transpose(1, 2)
    v = attn.v_proj(h).view(b, t, nkv, d).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    attn.k_cache.index_copy_(2, pos, k)
    attn.v_cache.index_copy_(2, pos, v)
    if prefill:
        kk = k[:, :, None].expand(b, nkv, rep, t, d).reshape(b, nh, t, d)
        vv = v[:, :, None].expand(b, nkv, rep, t, d).reshape(b, nh, t, d)
        o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    else:
        qg = q.reshape(b, nkv, rep * t, d)
        o = attention(qg, attn.k_cache, attn.v_cache, mask).reshape(b, nh, t, d)
    o = o.transpose(1, 2).reshape(b, t, nh * d)
    x = x + attn.o_proj(o)
    h = layer.post_attention_layernorm(x)
    return x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))


def grouped_mask(rep: int, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[1, 1, rep*T, S] bool: query t of each of a KV head's ``rep`` query heads sees the cache
    slots (``slots`` [S], their positions) up to ``pos[t]``."""
    m = slots[None, :] <= pos[:, None]
    t, s = m.shape
    return m[None].expand(rep, t, s).reshape(1, 1, rep * t, s)


def decode_mask(model: Decoder, pos: torch.Tensor) -> torch.Tensor:
    """[1, 1, rep*T, max_seq] bool, built on the device: query t sees cache slots <= pos[t]."""
    return grouped_mask(model.shape.heads // model.shape.kv_heads, model.positions, pos)


def decode_logits(model: Decoder, layer_fn, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Logits [B, vocab] of the last position; ``tokens`` [B, T] at positions ``pos`` [T]."""
    x = model.embed_tokens(tokens)
    cos = model.rope_cos.index_select(0, pos).to(x.dtype)[None, None]
    sin = model.rope_sin.index_select(0, pos).to(x.dtype)[None, None]
    mask = decode_mask(model, pos)
    for layer in model.layers:
        x = layer_fn(layer, x, cos, sin, pos, mask, False)
    return model.lm_head(model.norm(x[:, -1]))


def decode_step(model: Decoder, tokens: torch.Tensor, pos: torch.Tensor):
    """The whole step (``--compile model``): logits and the greedy next token."""
    logits = decode_logits(model, layer_forward, tokens, pos)
    return logits, logits.argmax(-1)


def prefill_logits(model: Decoder, layer_fn, tokens: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
    """A prompt ``tokens`` [B, T] from position 0; logits of the last position (or of all)."""
    x = model.embed_tokens(tokens)
    t = tokens.shape[1]
    pos = model.positions[:t]
    cos = model.rope_cos[:t].to(x.dtype)[None, None]
    sin = model.rope_sin[:t].to(x.dtype)[None, None]
    for layer in model.layers:
        x = layer_fn(layer, x, cos, sin, pos, None, True)
    return model.lm_head(model.norm(x if all_positions else x[:, -1]))


def prefill_step(model: Decoder, tokens: torch.Tensor):
    logits = prefill_logits(model, layer_forward, tokens)
    return logits, logits.argmax(-1)


# --- compiling ------------------------------------------------------------------------------


def compile_kwargs(variant: Variant, settings: Settings, whole_model: bool) -> dict:
    """``torch.compile`` arguments of a variant; ``whole_model`` adds Inductor's CUDA graphs on a GPU."""
    graphs = whole_model and settings.cuda
    if variant.scheme is None:
        if not settings.inductor:
            return {"backend": "aot_eager"}
        return {"mode": "reduce-overhead"} if graphs else {"backend": "inductor"}
    options = {"triton.cudagraphs": True} if graphs else {}
    config = qp.LinearBackendConfig(variant.backend, fuse=variant.fuse)
    return {"backend": qp.make(config=config, inductor=settings.inductor, **options)}


def describe_compile(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in kwargs.items())


def _graph_count() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _cudagraph_skips() -> int:
    return int(torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0))


def disable_compile_caches() -> None:
    """Cold compiles: no FX-graph, AOTAutograd or autotune cache hits (the parent also sets
    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 for the variant's process).

    Also imports Inductor's compiler (``torch._inductor.compile_fx``, with its lowerings and
    kernel templates) before any timed call, for every variant: ``torch.compile(backend="inductor")``
    imports it when it is called (bf16's model build), a backend object such as qlinear_pass's in
    its first compile, so without this the quantized variants' compile seconds alone carried
    Inductor's import (0.6 s on a 2-core CPU machine; under cProfile on an H200 host, 5.3 s of
    w4a16's first batch-1 call went to the op registrations it runs, none of bf16's:
    benchmarks/results/h200/e2e/all_variants_xr/compile_profile_*.txt)."""
    import torch._inductor.compile_fx  # noqa: F401
    from torch._inductor import config as inductor_config

    for key in ("fx_graph_cache", "fx_graph_remote_cache", "autotune_local_cache", "autotune_remote_cache"):
        if hasattr(inductor_config, key):
            setattr(inductor_config, key, False)
    try:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "enable_autograd_cache"):
            functorch_config.enable_autograd_cache = False
    except ImportError:
        pass


# --- measuring ------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _short(exc: BaseException, limit: int = 800) -> str:
    """One line: the exception's type, and the start and end of its message."""
    text = " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    if len(text) > limit:
        text = f"{text[: limit // 3]} ... {text[-(2 * limit) // 3:]}"
    return f"{type(exc).__name__}: {text}"


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> Optional[float]:
    """10 log10(sum(ref^2) / sum((out - ref)^2)); None when out equals ref exactly or is not finite."""
    ref = ref.double()
    err = (out.double() - ref).pow(2).sum().item()
    sig = ref.pow(2).sum().item()
    if err == 0.0 or not math.isfinite(err) or sig == 0.0:
        return None
    return 10.0 * math.log10(sig / err)


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def to_json(obj) -> str:
    """Strict JSON: NaN and infinities (broken logits) are written as null."""
    return json.dumps(_finite_or_none(obj), indent=1, default=str, allow_nan=False)


def logits_check(logits: torch.Tensor) -> dict:
    """Are the logits usable: finite, not collapsed (spread), and how many distinct argmaxes."""
    lf = logits.float()
    finite = bool(torch.isfinite(lf).all().item())
    std = float(lf.std().item()) if lf.numel() > 1 else 0.0
    return {
        "finite": finite,
        "std": std,
        "max_abs": float(lf.abs().max().item()),
        "distinct_argmax": int(lf.argmax(-1).unique().numel()),
        "rows": int(lf.shape[0]),
        "ok": finite and std > 1e-3,
    }


class Decode:
    """Greedy decoding of ``batch`` sequences: a static token / position state and one step that
    computes the next token and writes it back, so replaying the step decodes autonomously."""

    def __init__(self, ctx: "VariantRun", batch: int) -> None:
        self.ctx = ctx
        s, model = ctx.settings, ctx.model
        self.batch = batch
        gen = _generator(s.device, s.seed + 7919 * batch)
        self.init_tokens = torch.randint(model.shape.vocab, (batch, 1), device=s.device, generator=gen)
        self.tokens = self.init_tokens.clone()
        self.start = s.prefill_tokens
        self.pos = torch.full((1,), self.start, dtype=torch.long, device=s.device)

    def reset(self) -> None:
        self.tokens.copy_(self.init_tokens)
        self.pos.fill_(self.start)

    def eager_body(self) -> torch.Tensor:
        """One step with the compiled layers (layer mode) or the compiled step (model mode)."""
        ctx = self.ctx
        if ctx.settings.compile_mode == "layer":
            logits = decode_logits(ctx.model, ctx.layer_fn, self.tokens, self.pos)
            nxt = logits.argmax(-1)
        else:
            if ctx.settings.cuda:
                torch.compiler.cudagraph_mark_step_begin()
            logits, nxt = ctx.step_fn(ctx.model, self.tokens, self.pos)
        self.tokens.copy_(nxt[:, None])
        self.pos.add_(1)
        return logits


class VariantRun:
    """Everything one variant measures, in its own process."""

    def __init__(self, variant: Variant, settings: Settings, result: dict, save: Callable[[], None]) -> None:
        self.variant = variant
        self.settings = settings
        self.result = result
        self.save = save
        self.t0 = time.monotonic()
        self.model: Optional[Decoder] = None
        self.layer_fn = None
        self.step_fn = None
        self.prefill_fn = None
        # every compile of this variant's process hands its record to this list
        self._watch = graph_pass.watch()
        self.records = self._watch.__enter__()
        self.compile_s: dict = {}
        self.graphs: dict = {}

    def log(self, msg: str) -> None:
        log(f"[{self.variant.name} {time.monotonic() - self.t0:6.1f}s] {msg}")

    # -- set-up --------------------------------------------------------------------------

    def build(self) -> None:
        s = self.settings
        t = time.perf_counter()
        if s.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.model = build_model(s.shape, s, ACT_DTYPE, self.variant, self.log)
        _sync(s.device)
        self.result["build_s"] = time.perf_counter() - t
        self.result["layer_weight_bytes"] = layer_weight_bytes(self.model.layers[0])
        self.result["model_weight_bytes"] = sum(layer_weight_bytes(m) for m in self.model.layers) + sum(
            p.numel() * p.element_size()
            for m in (self.model.embed_tokens, self.model.norm, self.model.lm_head)
            for p in m.parameters()
        )
        if s.cuda:
            self.result["peak_build_bytes"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.log(f"model built in {self.result['build_s']:.1f}s; one layer {self.result['layer_weight_bytes'] / 1e6:.1f} MB, "
                 f"model {self.result['model_weight_bytes'] / 1e9:.2f} GB")
        self.compile_functions()

    def compile_functions(self) -> None:
        s = self.settings
        if s.compile_mode == "layer":
            kw = compile_kwargs(self.variant, s, whole_model=False)
            self.layer_fn = torch.compile(layer_forward, dynamic=False, **kw)
            self.prefill_fn = lambda model, tokens: prefill_logits(model, self.layer_fn, tokens)
        else:
            kw = compile_kwargs(self.variant, s, whole_model=True)
            self.step_fn = torch.compile(decode_step, dynamic=False, **kw)
            compiled_prefill = torch.compile(prefill_step, dynamic=False, **kw)

            def prefill(model, tokens):
                if s.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                return compiled_prefill(model, tokens)[0]

            self.prefill_fn = prefill
        self.result["compile"] = {"mode": s.compile_mode, "torch_compile": describe_compile(kw)}

    def _phase_compile(self, phase: str, seconds: Optional[float], graphs_before: int) -> None:
        if seconds is not None:
            self.compile_s[phase] = seconds
        self.graphs[phase] = _graph_count() - graphs_before
        self._record_compile()

    def _record_compile(self) -> None:
        records = list(self.records)
        kernels: collections.Counter = collections.Counter()
        fallbacks = unmatched = 0
        for r in records:
            for d in r.decisions:
                kernels[d.kernel or "-"] += 1
                fallbacks += bool(d.fallback)
            unmatched += len(r.unmatched)
        c = self.result["compile"]
        c.update(
            first_call_s=dict(self.compile_s),
            compile_s=sum(self.compile_s.values()),
            pass_s=sum(r.pass_seconds for r in records),
            pass_runs=len(records),
            graphs=dict(self.graphs),
            total_graphs=sum(self.graphs.values()),
            linears_rewritten=sum(kernels.values()),
            kernels_chosen=dict(kernels),
            fallbacks=fallbacks,
            unmatched_matmuls=unmatched,
            cudagraph_skips=_cudagraph_skips(),
            caches="Inductor FX-graph, AOTAutograd and autotune caches off; Triton's own kernel cache as found; "
                   "Inductor's compiler imported before the first call",
        )
        first = f"decode_b{self.settings.batches[0]}"
        if self.settings.compile_mode == "layer" and first in self.graphs:
            # one compiled graph serves every layer (it would be one per layer otherwise)
            c["layers_share_one_graph"] = self.graphs[first] == 1

    # -- decode --------------------------------------------------------------------------

    def decode(self, batch: int) -> None:
        s, model = self.settings, self.model
        phase = f"decode_b{batch}"
        set_cache(model, batch, ACT_DTYPE, static_address=s.compile_mode == "model" and s.cuda)
        run = Decode(self, batch)
        graphs_before = _graph_count()
        row: dict = {"batch": batch, "steps": s.decode_steps, "runs": s.decode_runs, "start_position": run.start}
        self.result.setdefault("decode", {})[str(batch)] = row

        # warm-up on a side stream before capturing, as torch.cuda.graph's documentation asks
        side = torch.cuda.Stream() if s.cuda and s.compile_mode == "layer" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), (torch.cuda.stream(side) if side is not None else contextlib.nullcontext()):
            run.reset()
            t = time.perf_counter()
            run.eager_body()
            _sync(s.device)
            self._phase_compile(phase, time.perf_counter() - t, graphs_before)
            self.log(f"{phase}: first step (compile) {self.compile_s[phase]:.1f}s, {self.graphs[phase]} new graph(s)")
            for _ in range(s.warmup_steps):
                run.eager_body()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()

        graph = None
        holder: dict = {}

        def eager_step() -> None:
            holder["logits"] = run.eager_body()

        with torch.no_grad():
            step = eager_step
            row["timing"] = "Inductor CUDA graphs (compiled step)" if s.cuda else "wall clock, eager step"
            if s.cuda and s.compile_mode == "layer":
                run.reset()
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        static_logits = run.eager_body()
                    step = graph.replay
                    row["timing"] = "one torch.cuda.CUDAGraph per step, replayed"
                except Exception as exc:  # report the numbers without the graph, and why
                    graph = None
                    row["graph_error"] = _short(exc)
                    row["timing"] = "CUDA events over eager steps (the CUDA graph capture failed)"
                    self.log(f"{phase}: CUDA graph capture failed, timing eager steps: {row['graph_error']}")
                    _recover(s)
            times = [self._time_steps(run, step) for _ in range(s.decode_runs)]
            logits = static_logits if graph is not None else holder["logits"]
            row["logits_check"] = logits_check(logits)
            del logits, holder
        med = statistics.median(times)
        row.update(
            run_s=times,
            step_ms=med / s.decode_steps * 1e3,
            tok_s_per_seq=s.decode_steps / med,
            tok_s=batch * s.decode_steps / med,
        )
        check = row["logits_check"]
        self.log(f"{phase}: {row['tok_s_per_seq']:.1f} tok/s per sequence, {row['tok_s']:.1f} tok/s total "
                 f"({row['step_ms']:.2f} ms/step); logits finite={check['finite']} std={check['std']:.3g}")
        if not check["ok"]:
            self.log(f"{phase}: WARNING: logits look broken: {check}")
        self.save()
        del graph
        _free()

    def _time_steps(self, run: Decode, step: Callable[[], None]) -> float:
        s = self.settings
        run.reset()
        if s.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(s.decode_steps):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        for _ in range(s.decode_steps):
            step()
        return time.perf_counter() - t

    # -- kernels per linear ----------------------------------------------------------------

    def profile_decode(self, batch: int) -> None:
        """Kernels per linear and where a decode step's device time goes (decode steps run outside
        the CUDA graph, under torch.profiler).  Runs after every timed phase (see child_main)."""
        try:
            self._profile_decode(batch)
        except Exception as exc:
            self.result["kernels"] = {"measured": False, "reason": f"the profile failed: {_short(exc)}"}
            raise

    def _profile_decode(self, batch: int) -> None:
        s = self.settings
        set_cache(self.model, batch, ACT_DTYPE, static_address=s.compile_mode == "model" and s.cuda)
        run = Decode(self, batch)
        if not s.cuda:
            self.result["kernels"] = {"measured": False, "reason": "no kernel counts without a CUDA device"}
            return
        if s.compile_mode != "layer":
            self.result["kernels"] = {
                "measured": False,
                "reason": "--compile model runs the step as Inductor CUDA graphs, which hide the kernels from the "
                "profiler; use --compile layer",
            }
            return
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad():
            run.reset()
            for _ in range(2):
                run.eager_body()
            torch.cuda.synchronize()
            run.reset()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                for _ in range(s.profile_steps):
                    run.eager_body()
                torch.cuda.synchronize()
        out = kernel_breakdown(prof.events(), s.profile_steps, exclude_dims=(self.model.shape.vocab,),
                               linears_per_step=layer_linears(self.model))
        self.result["kernels"] = out
        if out.get("linears"):
            self.log(f"profile: {out['linears_per_step']:.0f} linears/step via {out['linear_op']}, "
                     f"{out['kernels_per_linear']:.2f} kernels and {out['us_per_linear']:.1f} us per linear")
        else:
            self.log(f"profile: no linear ops found ({out.get('note', '')})")
        self.save()

    # -- prefill ---------------------------------------------------------------------------

    def prefill(self) -> None:
        s, model = self.settings, self.model
        set_cache(model, 1, ACT_DTYPE, static_address=s.compile_mode == "model" and s.cuda)
        gen = _generator(s.device, s.seed + 31)
        tokens = torch.randint(model.shape.vocab, (1, s.prefill_tokens), device=s.device, generator=gen)
        graphs_before = _graph_count()
        with torch.no_grad():
            t = time.perf_counter()
            self.prefill_fn(model, tokens)
            _sync(s.device)
            self._phase_compile("prefill", time.perf_counter() - t, graphs_before)
            self.log(f"prefill: first call (compile) {self.compile_s['prefill']:.1f}s, {self.graphs['prefill']} new graph(s)")
            self.prefill_fn(model, tokens)
            _sync(s.device)
            times, host = [], []
            for _ in range(s.prefill_runs):
                if s.cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    t = time.perf_counter()
                    start.record()
                    self.prefill_fn(model, tokens)
                    end.record()
                    host.append(time.perf_counter() - t)  # until the last launch is queued
                    end.synchronize()
                    times.append(start.elapsed_time(end) / 1e3)
                else:
                    t = time.perf_counter()
                    self.prefill_fn(model, tokens)
                    times.append(time.perf_counter() - t)
        med = statistics.median(times)
        self.result["prefill"] = {
            "batch": 1,
            "tokens": s.prefill_tokens,
            "runs": s.prefill_runs,
            "run_s": times,
            "ms": med * 1e3,
            "tok_s": s.prefill_tokens / med,
            "timing": "CUDA events" if s.cuda else "wall clock",
        }
        if host:
            # the host's time to queue the call: near the event time, the GPU waited on the host
            self.result["prefill"]["host_enqueue_ms"] = statistics.median(host) * 1e3
        self.log(f"prefill {s.prefill_tokens} tokens: {med * 1e3:.2f} ms ({s.prefill_tokens / med:.0f} tok/s)"
                 + (f", host enqueue {statistics.median(host) * 1e3:.2f} ms" if host else ""))
        self.save()

    def profile_prefill(self) -> None:
        """Where the prefill's device time goes, and its slowest kernels (one profiled call)."""
        s, model = self.settings, self.model
        if not (s.cuda and s.compile_mode == "layer" and self.result.get("prefill")):
            return
        from torch.profiler import ProfilerActivity, profile

        set_cache(model, 1, ACT_DTYPE)
        gen = _generator(s.device, s.seed + 31)
        tokens = torch.randint(model.shape.vocab, (1, s.prefill_tokens), device=s.device, generator=gen)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            self.prefill_fn(model, tokens)
            torch.cuda.synchronize()
        k = kernel_breakdown(prof.events(), 1, exclude_dims=(model.shape.vocab,), linears_per_step=layer_linears(model))
        self.result["prefill"]["kernels"] = {key: k.get(key) for key in (
            "linears", "linear_calls_per_step", "kernels_per_linear", "us_per_linear", "device_us_per_step",
            "split_us_per_step", "by_kernels", "top_kernels")}
        self.save()

    # -- memory ----------------------------------------------------------------------------

    def memory(self) -> None:
        if self.settings.cuda:
            peak = torch.cuda.max_memory_allocated()
            self.result["memory"] = {
                "peak_bytes": peak,
                "peak_build_bytes": self.result.pop("peak_build_bytes", None),
                "note": "peak allocated while decoding and prefilling (after the model was built)",
            }
            from qlinear_pass.kernels import int4_layout

            copies = int4_layout.copied_bytes()  # the w4a16 kernels' weight copies, beside the modules' weights
            self.result["memory"]["kernel_copy_bytes"] = copies
            self.log(f"peak GPU memory {peak / 1e9:.2f} GB; kernels' weight copies {copies / 1e9:.2f} GB")
        else:
            self.result["memory"] = {"peak_bytes": None, "note": "not measured without a CUDA device"}
        self.save()

    def drop_model(self) -> None:
        self.model = None
        _free()

    # -- accuracy --------------------------------------------------------------------------

    def accuracy(self) -> None:
        """Logits SQNR of a model with the first ``acc_layers`` layers, against float32."""
        s = self.settings
        shape = dataclasses.replace(s.shape, layers=s.acc_layers)
        base = build_model(shape, s, ACT_DTYPE, None)
        ref_model = copy.deepcopy(base).float()
        model = base
        if self.variant.scheme is not None:
            for layer in model.layers:
                qp.quantize(layer, self.variant.scheme, **quantize_kw(self.variant, s))
        gen = _generator(s.device, s.seed + 97)
        tokens = torch.randint(shape.vocab, (1, s.acc_tokens), device=s.device, generator=gen)
        with torch.no_grad():
            set_cache(ref_model, 1, torch.float32)
            ref = prefill_logits(ref_model, layer_forward, tokens, all_positions=True)[0].float()
            del ref_model
            _free()
            set_cache(model, 1, ACT_DTYPE)
            eager = prefill_logits(model, layer_forward, tokens, all_positions=True)[0].float()
            # the compiled model, token by token through the decode step that was timed
            set_cache(model, 1, ACT_DTYPE, static_address=s.compile_mode == "model" and s.cuda)
            graphs_before = _graph_count()
            rows = []
            for i in range(s.acc_tokens):
                tok = tokens[:, i : i + 1]
                pos = model.positions[i : i + 1].clone()
                if s.compile_mode == "layer":
                    logits = decode_logits(model, self.layer_fn, tok, pos)
                else:
                    if s.cuda:
                        torch.compiler.cudagraph_mark_step_begin()
                    logits = self.step_fn(model, tok, pos)[0]
                rows.append(logits[0].float().clone())
            _sync(s.device)
            # not counted in compile_s: in layer mode the timed decode graph is reused (0 new graphs)
            self._phase_compile("accuracy", None, graphs_before)
            compiled = torch.stack(rows)
        self.result["accuracy"] = {
            "layers": s.acc_layers,
            "tokens": s.acc_tokens,
            "reference": "float32 model with the original (unquantized bf16) weights",
            "sqnr_db_compiled": sqnr_db(compiled, ref),
            "sqnr_db_eager": sqnr_db(eager, ref),
            "finite_compiled": bool(torch.isfinite(compiled).all().item()),
            "finite_eager": bool(torch.isfinite(eager).all().item()),
            "argmax_match_compiled": float((compiled.argmax(-1) == ref.argmax(-1)).float().mean().item()),
            "argmax_match_eager": float((eager.argmax(-1) == ref.argmax(-1)).float().mean().item()),
            "ref_logits_std": float(ref.std().item()),
        }
        a = self.result["accuracy"]
        self.log(f"accuracy ({s.acc_layers} layers, {s.acc_tokens} tokens): SQNR compiled {_fmt(a['sqnr_db_compiled'], 1)} dB, "
                 f"eager {_fmt(a['sqnr_db_eager'], 1)} dB")
        del model, base
        _free()
        self.save()


# --- the profile ------------------------------------------------------------------------------


def _is_device_event(e) -> bool:
    from torch.autograd import DeviceType

    return e.device_type == DeviceType.CUDA


def _is_device_kernel(e) -> bool:
    """A device event that is work on the device: not a profiler annotation mirrored onto the
    device timeline (``## Call CompiledFxGraph ... ##`` spans a whole compiled graph)."""
    if not _is_device_event(e) or getattr(e, "is_user_annotation", False):
        return False
    return not (e.name.startswith("## ") or e.name.endswith(" ##"))


def _is_cpu_event(e) -> bool:
    from torch.autograd import DeviceType

    return e.device_type == DeviceType.CPU


def _shapes_have(e, dims: tuple) -> bool:
    for shape in getattr(e, "input_shapes", None) or ():
        if isinstance(shape, (list, tuple)) and any(d in dims for d in shape if isinstance(d, int)):
            return True
    return False


#: CPU ops and kernel names that are attention (SDPA's ops, the decode attention's batched
#: matmuls, Inductor's softmax kernels), for the per-step split
ATTENTION_RE = re.compile(r"bmm|scaled_dot_product|attention|flash|fmha|softmax", re.IGNORECASE)
#: ops that can be ``lm_head`` (the one matmul with the vocabulary in its shapes)
LM_HEAD_OPS = (LINEAR_OP, "aten::linear", "aten::matmul", *INLINE_LINEAR_OPS)
SPLIT_KEYS = ("linears", "attention", "lm_head", "other")


def _outermost(ops: list) -> list:
    """The ops not inside another of ``ops`` on the same thread."""
    ops = sorted(ops, key=lambda e: (e.thread, e.time_range.start, -e.time_range.end))
    outer: list = []
    for e in ops:
        if outer and outer[-1].thread == e.thread and e.time_range.end <= outer[-1].time_range.end:
            continue
        outer.append(e)
    return outer


class _Spans:
    """Time ranges of outermost ops per thread: is an event inside one of them?"""

    def __init__(self, ops: list) -> None:
        import bisect

        self._bisect = bisect
        self.by_thread: dict = collections.defaultdict(list)
        for e in ops:
            self.by_thread[e.thread].append((e.time_range.start, e.time_range.end))
        self.starts = {t: [a for a, _ in lst] for t, lst in self.by_thread.items()}

    def contains(self, e) -> bool:
        lst = self.by_thread.get(e.thread)
        if not lst:
            return False
        i = self._bisect.bisect_right(self.starts[e.thread], e.time_range.start) - 1
        return i >= 0 and e.time_range.end <= lst[i][1]


def layer_linears(model) -> int:
    """The linear layers of the decoder layers (lm_head not counted): what one step runs."""
    from qlinear_pass.nn import QuantizedLinear

    return sum(isinstance(m, (torch.nn.Linear, QuantizedLinear)) for layer in model.layers for m in layer.modules())


def kernel_breakdown(events, steps: int, exclude_dims: tuple = (), top: int = 12, linears_per_step: Optional[int] = None) -> dict:
    """Kernels per linear layer and where a step's device time goes, from profiler events.

    ``linears_per_step``: the model's linear layers, when known; a ``linear_group`` call runs several
    (the profiler does not say how many), so per-linear figures divide by this count.

    A linear is a CPU op event named ``qlinear_pass::linear`` (or, where the variant has none,
    an ATen matmul op: bf16 and kernels that inline ATen ops), outermost on its thread, whose
    input shapes contain none of ``exclude_dims`` (the vocabulary: ``lm_head``).  Its kernels
    are the device kernels the profiler attached to it or to any op inside its time range on
    the same thread.

    The split puts every device kernel attached to a CPU op in one bucket: ``linears`` (inside
    a linear), ``lm_head`` (inside the vocabulary-wide matmul), ``attention`` (attached to an op,
    or named, as in :data:`ATTENTION_RE`: SDPA, batched matmuls, softmax kernels) and ``other``
    (norms, RoPE, cache writes, argmax, and device time no CPU op claimed).  ``top_kernels`` and
    the totals count device kernels only, not profiler annotations.
    """
    cpu = [e for e in events if _is_cpu_event(e)]
    ops = [e for e in cpu if e.name in (LINEAR_OP, LINEAR_GROUP_OP, LINEAR_FUSED_OP)]
    linear_op = LINEAR_OP
    note = ""
    if not ops:
        ops = [e for e in cpu if e.name in INLINE_LINEAR_OPS]
        linear_op = "ATen matmul ops"
        note = ("no qlinear_pass::linear ops: counted ATen matmul ops; Inductor kernels around them "
                "(activation quantization, epilogues) are not part of the count")
    outer = _outermost([e for e in ops if not _shapes_have(e, exclude_dims)])
    head = _outermost([e for e in cpu if e.name in LM_HEAD_OPS and _shapes_have(e, exclude_dims)]) if exclude_dims else []
    with_kernels: dict = collections.defaultdict(list)
    for e in cpu:
        if getattr(e, "kernels", None):
            with_kernels[e.thread].append(e)
    for lst in with_kernels.values():
        lst.sort(key=lambda e: e.time_range.start)
    starts = {t: [e.time_range.start for e in lst] for t, lst in with_kernels.items()}

    import bisect

    per_linear = []
    for op in outer:
        lst = with_kernels.get(op.thread, [])
        i = bisect.bisect_left(starts.get(op.thread, []), op.time_range.start)
        names, us = [], 0.0
        while i < len(lst) and lst[i].time_range.start <= op.time_range.end:
            e = lst[i]
            if e.time_range.end <= op.time_range.end:
                for k in e.kernels:
                    names.append(k.name)
                    us += float(k.duration)
            i += 1
        per_linear.append((tuple(names), us, _op_shape(op)))

    groups: dict = {}
    for names, us, shape in per_linear:
        g = groups.setdefault(names, {"kernels": list(names), "calls": 0, "total_us": 0.0, "shapes": collections.Counter()})
        g["calls"] += 1
        g["total_us"] += us
        g["shapes"][shape] += 1
    group_rows = []
    for g in sorted(groups.values(), key=lambda g: -g["total_us"]):
        group_rows.append({
            "kernels": g["kernels"],
            "calls": g["calls"],  # linear op calls (a linear_group call runs several layers)
            "mean_us": g["total_us"] / g["calls"],
            "input_shapes": {k: v for k, v in g["shapes"].most_common(6)},
        })

    device_totals: dict = {}
    device_us = 0.0
    for e in events:
        if _is_device_kernel(e):
            dur = float(e.time_range.end - e.time_range.start)
            d = device_totals.setdefault(e.name, [0, 0.0])
            d[0] += 1
            d[1] += dur
            device_us += dur
    top_rows = [
        {"kernel": name, "calls_per_step": c / steps, "us_per_step": t / steps, "share": t / device_us if device_us else None}
        for name, (c, t) in sorted(device_totals.items(), key=lambda kv: -kv[1][1])[:top]
    ]

    linear_spans, head_spans = _Spans(outer), _Spans(head)
    split = dict.fromkeys(SPLIT_KEYS, 0.0)
    claimed = 0.0
    for lst in with_kernels.values():
        for e in lst:
            if linear_spans.contains(e):
                bucket = "linears"
            elif head_spans.contains(e):
                bucket = "lm_head"
            else:
                bucket = None
            for k in e.kernels:
                if k.name.startswith("## ") or k.name.endswith(" ##"):
                    continue
                b = bucket or ("attention" if ATTENTION_RE.search(e.name) or ATTENTION_RE.search(k.name) else "other")
                split[b] += float(k.duration)
                claimed += float(k.duration)
    unclaimed = max(device_us - claimed, 0.0)
    split["other"] += unclaimed

    n = linears_per_step * steps if linears_per_step and per_linear else len(per_linear)
    total_kernels = sum(len(p[0]) for p in per_linear)
    linear_us = sum(p[1] for p in per_linear)
    out = {
        "measured": True,
        "steps": steps,
        "linear_op": linear_op,
        "linears": n,
        "linears_per_step": n / steps,
        "linear_calls_per_step": len(per_linear) / steps,
        "kernels_per_linear": total_kernels / n if n else None,
        "us_per_linear": linear_us / n if n else None,
        "linear_us_per_step": linear_us / steps,
        "device_us_per_step": device_us / steps,
        "split_us_per_step": {k: v / steps for k, v in split.items()},
        "unclaimed_us_per_step": unclaimed / steps,
        "by_kernels": group_rows,
        "top_kernels": top_rows,
    }
    if note:
        out["note"] = note
    if n and not total_kernels:
        out["note"] = (out.get("note", "") + "; " if out.get("note") else "") + "no device kernels were attributed to the linear ops"
    return out


def _op_shape(e) -> str:
    shapes = getattr(e, "input_shapes", None) or []
    first = [s for s in shapes[:2] if isinstance(s, (list, tuple)) and s]
    return " x ".join(str(list(s)) for s in first) or "?"


# --- the variant process ---------------------------------------------------------------------


def built_variant(variant: str, layers: str) -> VariantRun:
    """One variant built and compiled as a ``--quick`` run builds it (Inductor's caches off), for the
    tools that look inside one of its phases (``prefill_host.py``, ``compile_profile.py``)."""
    settings = settings_from(parse_args(["--quick", "--layers", layers, "--variants", variant]))
    disable_compile_caches()
    ctx = VariantRun(Variant.parse(variant), settings, {"errors": {}}, lambda: None)
    ctx.build()
    return ctx


def phases(ctx: VariantRun) -> list:
    """A variant's phases in order: ``(name, function, whether the variant stops when it fails)``.

    Every timed phase comes before the first profiler session: one leaves CUPTI hooked into the
    process, and the host's kernel launches stay slower after it (a prefill that queues about a
    thousand kernels took up to 2x longer after the decode profile than before it, H200)."""
    first, *others = ctx.settings.batches
    return [
        ("build", ctx.build, True),
        (f"decode_b{first}", lambda: ctx.decode(first), True),
        ("prefill", ctx.prefill, False),
        *[(f"decode_b{b}", (lambda b=b: ctx.decode(b)), False) for b in others],
        ("profile", lambda: ctx.profile_decode(first), False),
        ("profile_prefill", ctx.profile_prefill, False),
        ("memory", ctx.memory, False),
        ("drop_model", ctx.drop_model, False),
        ("accuracy", ctx.accuracy, False),
    ]


def child_main(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    variant = Variant.parse(args.variant)
    disable_compile_caches()
    if settings.inductor_pdl:
        import torch._inductor.config as inductor_config

        inductor_config.triton.enable_pdl = True
    torch.manual_seed(settings.seed)
    result: dict = {
        "variant": variant.name,
        "label": variant.label(settings.group_size),
        "scheme": variant.scheme,
        "backend": variant.backend,
        "group_size": settings.group_size if variant.scheme == "w4a16" else None,
        "weight_layout": weight_layout(variant, settings) if variant.scheme == "w4a16" else None,
        "lm_head": "bf16, not quantized",
        "status": "running",
        "phase": "start",
        "errors": {},
    }
    path = Path(args.result_file)

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(to_json(result))
        os.replace(tmp, path)

    ctx = VariantRun(variant, settings, result, save)
    ctx.log(f"{settings.device}, compile={settings.compile_mode}, shape {dataclasses.asdict(settings.shape)}")
    for name, fn, essential in phases(ctx):
        result["phase"] = name
        save()
        try:
            fn()
        except Exception as exc:
            result["errors"][name] = _short(exc)
            ctx.log(f"{name}: ERROR {result['errors'][name]}")
            save()
            if essential:
                break
            _recover(settings)
    result["phase"] = "done"
    result["wall_s"] = time.monotonic() - ctx.t0
    result["status"] = "ok" if not result["errors"] else ("partial" if _decoded(result) else "failed")
    save()
    ctx.log(f"done: {result['status']}")
    return 0


def _decoded(result: dict) -> bool:
    """Whether a variant measured any decode speed."""
    return any(row.get("tok_s") for row in (result.get("decode") or {}).values())


def _recover(settings: Settings) -> None:
    """After a failed phase: the next phase must not inherit a broken stream or half a graph."""
    try:
        _sync(settings.device)
    except Exception:
        pass
    _free()


def _fmt(x, digits: int) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


# --- the parent: one process per variant ------------------------------------------------------


def card_name(device: str) -> tuple:
    """(the device's full name, a short folder name such as 'h100')."""
    if device != "cuda":
        return (platform.processor() or platform.machine() or "cpu", "cpu")
    full = torch.cuda.get_device_name(0)
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", full.replace("NVIDIA", ""))
    short = m.group(1).lower() if m else re.sub(r"[^a-z0-9]+", "_", full.lower()).strip("_")
    return full, short


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def run_variant(variant: Variant, argv: list, timeout: float, workdir: Path) -> dict:
    """Run one variant in its own process (and process group); its result, partial if it was cut short."""
    path = workdir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", variant.name) + ".json")
    if path.exists():
        path.unlink()
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--variant", variant.name, "--result-file", str(path)]
    env = dict(os.environ)
    env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    t = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    timed_out = False
    try:
        rc = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc)
        rc = proc.returncode
    wall = time.monotonic() - t
    result: dict = {}
    if path.exists():
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:
            result = {}
    result.setdefault("variant", variant.name)
    result.setdefault("scheme", variant.scheme)
    result.setdefault("backend", variant.backend)
    result.setdefault("errors", {})
    result["process_wall_s"] = wall
    if timed_out and result.get("phase") == "done" and result.get("status") not in (None, "running"):
        result["note"] = f"the process finished its measurements but had not exited after {timeout:.0f}s; it was stopped"
    elif timed_out:
        phase = result.get("phase", "start")
        result["errors"][phase] = f"timed out after {timeout:.0f}s (during {phase})"
        result["status"] = "timeout"
    elif rc != 0:
        phase = result.get("phase", "start")
        result["errors"].setdefault(phase, f"process exited with status {rc} (during {phase})")
        result["status"] = "failed" if not _decoded(result) else "partial"
    elif result.get("status") in (None, "running"):
        result["status"] = "failed"
        result["errors"].setdefault("result", "the variant process wrote no final result")
    return result


def _stop(proc: subprocess.Popen) -> None:
    """End the variant's process group (it and Inductor's compile workers)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def add_ratios(results: list) -> None:
    """x bf16 at the same batch: tok/s ratio for decode, time ratio (bf16 / variant) for prefill."""
    base = next((r for r in results if r.get("variant") == "bf16"), None)
    for r in results:
        ratios: dict = {}
        if base is not None:
            for b, row in (r.get("decode") or {}).items():
                ref = (base.get("decode") or {}).get(b)
                if ref and row.get("tok_s") and ref.get("tok_s"):
                    ratios[f"decode_b{b}"] = row["tok_s"] / ref["tok_s"]
            p, bp = r.get("prefill"), base.get("prefill")
            if p and bp and p.get("ms") and bp.get("ms"):
                ratios["prefill"] = bp["ms"] / p["ms"]
        r["x_bf16"] = ratios


def write_outputs(out_dir: Path, doc: dict, plot_png: bool) -> list:
    add_ratios(doc["variants"])
    (out_dir / "bench_e2e.json").write_text(to_json(doc))
    table = summary(doc)
    (out_dir / "summary.md").write_text(table + "\n")
    written = [out_dir / "bench_e2e.json", out_dir / "summary.md"]
    if plot_png and plot(doc, out_dir / "bench_e2e.png"):
        written.append(out_dir / "bench_e2e.png")
    return written


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def summary(doc: dict) -> str:
    s = doc["settings"]
    shape = s["shape"]
    b = [str(x) for x in s["batches"]]
    b1, b8 = (b[0], b[1]) if len(b) > 1 else (b[0], None)
    lines = [
        f"{doc['machine']}; torch {doc['torch']}, triton {doc['triton']}; --compile {s['compile_mode']}"
        f"{'' if s['inductor'] else ' (no Inductor)'}{'; Inductor PDL on' if s.get('inductor_pdl') else ''}; "
        f"{shape['layers']} layers, hidden {shape['hidden']}, "
        f"vocab {shape['vocab']}; decode {s['decode_steps']} steps x {s['decode_runs']} runs from position "
        f"{s['prefill_tokens']}; prefill {s['prefill_tokens']} tokens; "
        f"SQNR on {s['acc_layers']} layers x {s['acc_tokens']} tokens vs float32.",
        "",
        f"| variant | decode b{b1} tok/s | x bf16 | b{b8} tok/s (batch) | x bf16 | prefill ms | x bf16 | compile s | pass s "
        f"| peak GB | layer MB | SQNR dB compiled / eager | kernels per linear |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["variants"]:
        x = r.get("x_bf16") or {}
        label = r.get("label") or r["variant"]
        if r.get("status") not in ("ok", None):
            label += f" ({r['status']})"
        peak = _get(r, "memory", "peak_bytes")
        layer = r.get("layer_weight_bytes")
        kpl = _get(r, "kernels", "kernels_per_linear")
        if _get(r, "kernels", "measured") is False:
            kpl_s = "n/m"
        else:
            kpl_s = _fmt(kpl, 2)
        sq = f"{_fmt(_get(r, 'accuracy', 'sqnr_db_compiled'), 1)} / {_fmt(_get(r, 'accuracy', 'sqnr_db_eager'), 1)}"
        lines.append(
            "| " + " | ".join([
                label,
                _fmt(_get(r, "decode", b1, "tok_s"), 1),
                _fmt(x.get(f"decode_b{b1}"), 2),
                _fmt(_get(r, "decode", b8, "tok_s"), 1) if b8 else "-",
                _fmt(x.get(f"decode_b{b8}"), 2) if b8 else "-",
                _fmt(_get(r, "prefill", "ms"), 2),
                _fmt(x.get("prefill"), 2),
                _fmt(_get(r, "compile", "compile_s"), 1),
                _fmt(_get(r, "compile", "pass_s"), 2),
                _fmt(peak / 1e9 if peak else None, 2),
                _fmt(layer / 1e6 if layer else None, 1),
                sq,
                kpl_s,
            ]) + " |"
        )
    kernel_lines = []
    for r in doc["variants"]:
        k = r.get("kernels") or {}
        if not k.get("measured") or not k.get("linears"):
            continue
        groups = "; ".join(
            f"{g.get('calls', g.get('linears'))} x [{', '.join(_short_name(n) for n in g['kernels'])}] {g['mean_us']:.1f} us"
            for g in k["by_kernels"][:3]
        )
        calls = k.get("linear_calls_per_step") or k["linears_per_step"]
        in_calls = f" in {calls:.0f} calls" if calls != k["linears_per_step"] else ""
        kernel_lines.append(f"- {r.get('label') or r['variant']}: {k['linears_per_step']:.0f} linears per step{in_calls} "
                            f"({k['linear_op']}), {k['linear_us_per_step'] / 1e3:.2f} of {k['device_us_per_step'] / 1e3:.2f} "
                            f"device ms per step; {groups}")
    if kernel_lines:
        lines += ["", f"Kernels per linear (profiled decode steps, batch {b1}, outside the CUDA graph; "
                  f"op calls x [kernels] mean device time per call):", ""] + kernel_lines
    split_rows = []
    for r in doc["variants"]:
        sp = _get(r, "kernels", "split_us_per_step")
        if not _get(r, "kernels", "measured") or not sp:
            continue
        total = _get(r, "kernels", "device_us_per_step")
        split_rows.append("| " + " | ".join(
            [r.get("label") or r["variant"]]
            + [_fmt(sp.get(k) / 1e3 if sp.get(k) is not None else None, 2) for k in SPLIT_KEYS]
            + [_fmt(total / 1e3 if total is not None else None, 2)]
        ) + " |")
    if split_rows:
        lines += ["", f"Where a decode step's device time goes (batch {b1}, ms per step, profiled outside the CUDA graph; "
                  "linears: the layers' linears; attention: decode attention's matmuls and softmax; "
                  "other: norms, RoPE, cache writes, SwiGLU, argmax):", "",
                  "| variant | linears | attention | lm_head | other | device total |",
                  "|---|---:|---:|---:|---:|---:|"] + split_rows
    prefill_rows = []
    for r in doc["variants"]:
        pk = _get(r, "prefill", "kernels")
        if not pk or not pk.get("split_us_per_step"):
            continue
        sp = pk["split_us_per_step"]
        top = "; ".join(f"{_short_name(t['kernel'], 40)} {t['us_per_step'] / 1e3:.2f}" for t in pk["top_kernels"][:3])
        prefill_rows.append("| " + " | ".join(
            [r.get("label") or r["variant"]] + [_fmt(sp.get(key) / 1e3 if sp.get(key) is not None else None, 2) for key in SPLIT_KEYS]
            + [_fmt(pk["device_us_per_step"] / 1e3, 2), _fmt(_get(r, "prefill", "ms"), 2),
               _fmt(_get(r, "prefill", "host_enqueue_ms"), 2), top]) + " |")
    if prefill_rows:
        lines += ["", "Where the prefill's device time goes (one profiled call, ms; timed: the prefill's median time; "
                  "host: the host's time to queue one call, near the timed one when the GPU waits on the host; "
                  "the three kernels that take most, ms):", "",
                  "| variant | linears | attention | lm_head | other | device total | timed | host | top kernels |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"] + prefill_rows
    errors = [(r["variant"], ph, msg) for r in doc["variants"] for ph, msg in (r.get("errors") or {}).items()]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- {v} ({ph}): {msg[:300]}" for v, ph, msg in errors]
    lines += [
        "",
        "tok/s: decode tokens per second (b1: the one sequence; batch: all sequences together); x bf16: ratio to bf16 "
        "at the same batch (prefill: bf16 time / variant time). compile s: first calls with Inductor's caches off; "
        "pass s: the part of it spent in qlinear_pass's graph pass. layer MB: weight bytes of one decoder layer. "
        "n/m: not measured.",
    ]
    if doc.get("stopped_early"):
        lines += ["", f"Stopped early: {doc['stopped_early']}"]
    return "\n".join(lines)


def _short_name(kernel: str, limit: int = 48) -> str:
    return kernel if len(kernel) <= limit else kernel[: limit - 3] + "..."


def plot(doc: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        log(f"plot skipped: {_short(exc)}")
        return False
    rows = [r for r in doc["variants"] if r.get("decode") or r.get("prefill")]
    if not rows:
        log("plot skipped: nothing measured")
        return False
    b = [str(x) for x in doc["settings"]["batches"]]
    panels = [(f"decode batch {bb}: tok/s (all sequences)", ("decode", bb, "tok_s"), f"decode_b{bb}") for bb in b[:2]]
    panels.append((f"prefill {doc['settings']['prefill_tokens']} tokens: ms (lower is better)", ("prefill", "ms"), "prefill"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    labels = [r.get("label") or r["variant"] for r in rows]
    for ax, (title, keys, ratio_key) in zip(axes[0], panels):
        vals = [_get(r, *keys) or 0.0 for r in rows]
        colors = ["#777777" if r["variant"] == "bf16" else "#3b75af" for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=colors)
        for bar, r, v in zip(bars, rows, vals):
            ratio = (r.get("x_bf16") or {}).get(ratio_key)
            if v:
                ax.text(bar.get_x() + bar.get_width() / 2, v, f"{ratio:.2f}x" if ratio else "", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    shape = doc["settings"]["shape"]
    fig.suptitle(f"{doc['machine']}: {shape['layers']}-layer decoder, hidden {shape['hidden']}, "
                 f"--compile {doc['settings']['compile_mode']} (labels: x bf16)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


#: settings that must agree for --resume to keep an earlier run's variants
_RESUME_KEYS = ("device", "compile_mode", "shape", "small", "inductor", "inductor_pdl", "batches", "decode_steps", "decode_runs",
                "warmup_steps", "prefill_tokens", "prefill_runs", "max_seq", "acc_layers", "acc_tokens", "group_size", "seed",
                "w4a16_layout")


def _resumable(out_dir: Path, doc: dict) -> dict:
    """Variants of an earlier bench_e2e.json in ``out_dir`` that finished (ok or partial) under the
    same settings, machine and torch, by name."""
    path = out_dir / "bench_e2e.json"
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        log(f"--resume: {path} is not readable JSON ({exc}); starting afresh")
        return {}
    same = all(old.get(k) == doc[k] for k in ("machine", "torch")) and all(
        old.get("settings", {}).get(k) == doc["settings"].get(k) for k in _RESUME_KEYS
    )
    if not same:
        log(f"--resume: {path} was written with other settings, machine or torch; starting afresh")
        return {}
    return {r["variant"]: r for r in old.get("variants", []) if r.get("status") in ("ok", "partial")}


def parent_main(args: argparse.Namespace, argv: list) -> int:
    settings = settings_from(args)
    variants = parse_variants(args.variants, settings.device)
    machine, short = card_name(settings.device)
    out_dir = args.out or (REPO / "benchmarks" / "results" / short / "e2e")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    deadline = start + args.deadline if args.deadline else None
    doc = {
        "benchmark": "bench_e2e",
        "machine": machine,
        "card": short,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name if sys.argv else "bench_e2e.py", *argv]),
        "settings": {
            **settings.as_json(),
            "variants": [v.name for v in variants],
            "variant_timeout_s": args.variant_timeout,
            "deadline_s": args.deadline,
            "weights": "random, normal std 1/sqrt(fan_in); o_proj/down_proj x 1/sqrt(2*32); embedding std 1; lm_head bf16",
        },
        "variants": [],
        "stopped_early": None,
    }
    kept = _resumable(out_dir, doc) if args.resume else {}
    log(f"bench_e2e: {machine}; torch {torch.__version__}; variants {', '.join(v.name for v in variants)}; out {out_dir}")
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        for i, v in enumerate(variants):
            if v.name in kept:
                doc["variants"].append(kept[v.name])
                log(f"--- {v.name}: kept from the earlier run in {out_dir} (--resume)")
                continue
            timeout = args.variant_timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left < 5:
                    doc["stopped_early"] = f"deadline reached before {v.name}"
                    for rest in variants[i:]:
                        doc["variants"].append({
                            "variant": rest.name, "label": rest.label(settings.group_size), "scheme": rest.scheme,
                            "backend": rest.backend, "status": "skipped", "errors": {"start": "not run: the --deadline was reached"},
                        })
                    log(doc["stopped_early"])
                    break
                timeout = min(timeout, left - 2)
            log(f"--- {v.name} ({i + 1}/{len(variants)}), time limit {timeout:.0f}s")
            r = run_variant(v, argv, timeout, Path(tmp))
            doc["variants"].append(r)
            write_outputs(out_dir, doc, plot_png=False)
            log(f"--- {v.name}: {r.get('status')} in {r.get('process_wall_s', 0):.0f}s"
                + ("; errors: " + "; ".join(f"{k}: {m[:200]}" for k, m in r["errors"].items()) if r.get("errors") else ""))
    written = write_outputs(out_dir, doc, plot_png=True)
    log("")
    log(summary(doc))
    log("wrote " + ", ".join(map(str, written)))
    return 0


# --- command line ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results/<card>/e2e)")
    p.add_argument("--variants", default=None,
                   help="comma-separated 'bf16' and 'scheme/backend' (default: " + ",".join(DEFAULT_VARIANTS)
                   + "; on CPU those whose backend runs there: " + ", ".join(CPU_BACKENDS) + ")")
    p.add_argument("--compile", choices=("layer", "model"), default="layer",
                   help="layer: compile the decoder layer once, CUDA-graph the step; model: compile the whole step "
                   "with Inductor's CUDA graphs (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda if available")
    p.add_argument("--small", action="store_true", help="small shapes (hidden 256, 2 layers, vocab 1000, prefill 64); implied on CPU")
    p.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: 32, or 2 with --small)")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8],
                   help="decode batch sizes (default: 1,8)")
    p.add_argument("--decode-steps", type=int, default=None, help="decode steps per timed run (default: 64, --quick 32, --small 4)")
    p.add_argument("--prefill-tokens", type=int, default=None, help="prompt length of the prefill, and the position decoding starts from: "
                   "attention reads that many cached tokens a step (default: 2048, --small 64)")
    p.add_argument("--group-size", type=int, default=128, help="w4a16 group size (default: %(default)s)")
    p.add_argument("--w4a16-layout", choices=("auto", "public", "mma16"), default="auto",
                   help="how w4a16 layers hold their weights (quantize(weight_layout=...)); auto: mma16, the one copy "
                   "the CUDA / CUTLASS kernels read, for the auto / cuda / cutlass backends on a GPU, public otherwise "
                   "(default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="fewer steps and runs")
    p.add_argument("--no-inductor", dest="inductor", action="store_false",
                   help="compile without Inductor code generation (make(..., inductor=False); bf16: aot_eager): CPU smoke tests")
    p.add_argument("--inductor-pdl", action="store_true",
                   help="every variant, bf16 too, compiled with Inductor's programmatic dependent launch "
                   "(torch._inductor.config.triton.enable_pdl; also on with TORCHINDUCTOR_ENABLE_PDL=1)")
    p.add_argument("--variant-timeout", type=float, default=600.0, help="seconds one variant may take (default: %(default)s)")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which no variant starts or runs on")
    p.add_argument("--resume", action="store_true",
                   help="keep the variants that finished in --out's bench_e2e.json under the same settings; run the rest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant is not None and not args.result_file:
        p.error("--variant needs --result-file")
    if any(b < 1 for b in args.batch_sizes) or len(set(args.batch_sizes)) != len(args.batch_sizes):
        p.error(f"--batch-sizes must be distinct positive integers, got {args.batch_sizes}")
    if args.layers is not None and args.layers < 1:
        p.error("--layers must be >= 1")
    if args.group_size not in (32, 64, 128):
        p.error("--group-size must be 32, 64 or 128")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.variant is not None:
        return child_main(args)
    try:
        parse_variants(args.variants, "cpu")
    except ValueError as exc:
        raise SystemExit(f"bench_e2e.py: {exc}") from None
    return parent_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
