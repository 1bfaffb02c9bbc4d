"""Quantize a Hugging Face causal LM, compile it with qlinear_pass, generate with a static cache.

    python examples/hf_generate.py                         # a tiny random Llama built from a config
    python examples/hf_generate.py ./my-model --scheme w4a16 --tokens 32   # a local model directory

Prints the generated tokens (and text, when the directory has a tokenizer), eager and compiled
decode speed in tokens/s, whether the compiled tokens equal the eager ones, and explain()'s
table: which kernel runs each quantized linear. Runs on the GPU when there is one, else on the
CPU. Needs the transformers package; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import pathlib
import time

import torch

import qlinear_pass as qp
from qlinear_pass import graph_pass
from qlinear_pass import schemes as S


def build(path: "str | None", dtype: torch.dtype, device: str):
    import transformers

    if path is None:
        cfg = transformers.LlamaConfig(
            vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=None, initializer_range=0.1,
        )
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval(), None
    if not (pathlib.Path(path) / "config.json").is_file():
        raise SystemExit(f"{path}: not a model directory (no config.json)")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model.to(device).eval(), tokenizer


def generate(model, ids, tokens: int):
    """The new tokens and the decode rate (tokens/s over the whole call, prefill included)."""
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        if ids.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        if ids.is_cuda:
            torch.cuda.synchronize()
    return out[:, ids.shape[1]:], tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="a local Hugging Face model directory (default: a tiny random Llama)")
    ap.add_argument("--scheme", default="w4a16", choices=[s.name for s in S.all_schemes()])
    ap.add_argument("--backend", default="auto", help="the linear backend (default: auto)")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens to generate")
    ap.add_argument("--prompt", default="The quick brown fox", help="prompt text (needs a tokenizer)")
    ap.add_argument("--no-inductor", action="store_true", help="run the pass without Inductor code generation")
    ap.add_argument("--weight-layout", choices=("auto", "public", "mma16"), default="auto",
                    help="how w4a16 layers hold their weights; auto: mma16 (one copy, the one the CUDA / CUTLASS "
                    "kernels read) on a GPU under the auto / cuda / cutlass backends, public otherwise")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    model, tokenizer = build(args.model, dtype, device)
    # lm_head stays in float (as quantized checkpoints keep it); a layer the scheme cannot hold
    # (K not a multiple of the group) is named in the error
    layout = args.weight_layout
    if layout == "auto":
        gpu_kernels = device == "cuda" and args.backend in ("auto", "cuda", "cutlass")
        layout = "mma16" if args.scheme == "w4a16" and gpu_kernels else "public"
    kw = {"weight_layout": layout} if args.scheme == "w4a16" else {}
    qp.quantize(model, args.scheme, exclude=["lm_head"], **kw)
    if tokenizer is not None:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    else:
        ids = torch.randint(2, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1)).to(device)
    print(f"qlinear_pass {qp.__version__} on {qp.DeviceInfo.of(device)}, torch {torch.__version__}")
    held = f" ({layout} weights)" if args.scheme == "w4a16" else ""
    print(f"model: {args.model or 'tiny random Llama'}, scheme {args.scheme}{held}, backend {args.backend}, "
          f"prompt of {ids.shape[1]} tokens\n")

    eager_tokens, eager_rate = generate(model, ids, args.tokens)

    # the forward compiled in place: generate() calls it for the prefill and every decode step
    backend = qp.make(args.backend, inductor=not args.no_inductor)
    model.forward = torch.compile(model.forward, backend=backend)
    with graph_pass.watch() as records:
        started = time.perf_counter()
        tokens, _ = generate(model, ids, args.tokens)  # compiles: the prefill, then one decode graph
        compile_s = time.perf_counter() - started
        compiles = len(records)
        tokens, rate = generate(model, ids, args.tokens)  # warm: every step reuses those graphs
    if len(records) != compiles:
        print(f"warning: the second generate compiled {len(records) - compiles} more graph(s)")

    print("tokens:", tokens[0].tolist())
    if tokenizer is not None:
        print("text:  ", repr(tokenizer.decode(tokens[0], skip_special_tokens=True)))
    print("same tokens as the eager quantized model:", torch.equal(tokens, eager_tokens))
    print(f"eager    {eager_rate:8.1f} tokens/s")
    print(f"compiled {rate:8.1f} tokens/s  ({compiles} graphs compiled in {compile_s:.1f} s, then reused)\n")
    with torch.no_grad():
        print(qp.explain(model, ids, linear_backend=args.backend))


if __name__ == "__main__":
    main()
