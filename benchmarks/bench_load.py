#!/usr/bin/env python3
"""quantize / save_quantized / load_quantized on a 1.1B-parameter Llama (TinyLlama's shapes), on the CPU.

Builds the bf16 model from a config (random weights, nothing downloaded), quantizes every linear but
``lm_head``, saves the checkpoint, then loads it into a freshly built float model, timing each step
(wall seconds).  A model built on the meta device is also tried: Hugging Face's RoPE buffers are
non-persistent, so it must be built with only its parameters on meta (what the error says).
Writes ``bench_load.json`` to --out.  Needs transformers.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import qlinear_pass as qp  # noqa: E402


def build(cfg, device: str):
    from transformers import LlamaForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemes", default="w4a16,fp8_rowwise,int8_weight_only")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu" / "load_1b"))
    args = ap.parse_args(argv)
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    result = {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__, "runs": []}
    for scheme in args.schemes.split(","):
        torch.manual_seed(0)
        t = time.perf_counter()
        model = build(cfg, "cpu")
        row = {"scheme": scheme, "parameters": sum(p.numel() for p in model.parameters()), "build_s": time.perf_counter() - t}
        t = time.perf_counter()
        qp.quantize(model, scheme, exclude=["lm_head"])
        row["quantize_s"] = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            qp.save_quantized(model, d)
            row["save_s"] = time.perf_counter() - t
            del model
            try:
                qp.load_quantized(build(cfg, "meta"), d)
                row["meta_model"] = "loaded"
            except qp.CheckpointError as exc:
                row["meta_model"] = str(exc).splitlines()[1].strip()
            fresh = build(cfg, "cpu")
            t = time.perf_counter()
            qp.load_quantized(fresh, d)
            row["load_s"] = time.perf_counter() - t
        print(f"{scheme}: {row['parameters'] / 1e9:.2f} B parameters; quantize {row['quantize_s']:.1f} s, "
              f"save {row['save_s']:.1f} s, load {row['load_s']:.1f} s", flush=True)
        result["runs"].append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_load.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
