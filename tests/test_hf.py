"""Hugging Face decoders end to end: quantize, compile with the pass, ``generate`` with a static
cache; the same tokens as the eager quantized model, logits within the scheme's tolerance, one
compiled forward reused by every decode step, and layers named as ``named_modules()`` names them."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import qlinear_pass as qp
from qlinear_pass import graph_pass
from qlinear_pass import schemes as S

from .helpers import ALL_SCHEMES

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the transformers package")

#: tiny sizes every scheme can hold: K = 128 (attention, MLP in) and 256 (MLP out), one 128 block
TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=64, pad_token_id=0, eos_token_id=None,
            bos_token_id=1)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),  # fused qkv_proj and gate_up_proj
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),  # tied lm_head
}


def tiny_model(arch: str, dtype: torch.dtype, seed: int = 0, layers: int = 2):
    cfg_name, model_name = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**{**TINY, "num_hidden_layers": layers})
    return getattr(transformers, model_name)(cfg).eval().to(dtype)


@dataclasses.dataclass(frozen=True)
class Case:
    arch: str
    scheme: str
    dtype: torch.dtype = torch.float32
    inductor: bool = False
    group_size: int | None = None
    zero_points: bool = False

    def __str__(self) -> str:
        parts = [self.arch, self.scheme, str(self.dtype).removeprefix("torch.")]
        parts += [f"g{self.group_size}"] * bool(self.group_size) + ["zp"] * self.zero_points
        return "-".join(parts + ["inductor"] * self.inductor)


# every architecture twice, every scheme at least once, one Inductor compile (the others run the
# pass over the ATen graph without code generation, which keeps the file within a minute on 2 cores)
CASES = [
    Case("llama", "w4a16", torch.bfloat16, inductor=True, group_size=128),
    Case("llama", "int8_rowwise"),
    Case("qwen2", "fp8_rowwise"),
    Case("qwen2", "w4a16", torch.bfloat16, group_size=64, zero_points=True),
    Case("mistral", "fp8_block"),
    Case("mistral", "int8_weight_only", torch.bfloat16),
    Case("phi3", "fp8_tensor"),
    Case("phi3", "w4a16", torch.bfloat16, group_size=32),
    Case("gemma", "fp8_weight_only"),
    Case("gemma", "int8_weight_only"),
]


def test_every_scheme_and_architecture_is_covered():
    assert {c.scheme for c in CASES} == set(ALL_SCHEMES)
    assert {c.arch for c in CASES} == set(ARCHS)


GENERATE = dict(max_new_tokens=5, do_sample=False, cache_implementation="static",
                output_logits=True, return_dict_in_generate=True)


def _prompt(seed: int, length: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, TINY["vocab_size"], (1, length), generator=g)


class CountingForward:
    """The compiled forward, noting for each call how many graphs were compiled during it.

    It keeps the forward's signature: ``generate`` reads it to decide which arguments to pass
    (``logits_to_keep``: without it the prefill runs lm_head over every position, and a
    per-tensor activation scale then sees other numbers than the eager model's)."""

    def __init__(self, compiled, records: list) -> None:
        self.compiled, self.records, self.compiles = compiled, records, []
        functools.update_wrapper(self, compiled)

    def __call__(self, *args, **kwargs):
        before = len(self.records)
        out = self.compiled(*args, **kwargs)
        self.compiles.append(len(self.records) - before)
        return out


def same_tokens_or_a_tie(out, ref, prompt_len: int, tol: float) -> int:
    """The steps whose logits to compare: every one where the greedy tokens agree.  They may part
    only where the eager logits of the two tokens tie within ``tol`` of their largest (16-bit
    rounding picks either; bf16 ties exactly now and then), and after that the inputs differ."""
    a, b = out.sequences[0].tolist(), ref.sequences[0].tolist()
    if a == b:
        return len(ref.logits)
    first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    step = first - prompt_len
    logits = ref.logits[step][0].float()
    gap = (logits[b[first]] - logits[a[first]]).abs().item()
    assert gap <= tol * logits.abs().max().item(), (f"greedy tokens part at step {step} ({a[first]} against eager's "
                                                     f"{b[first]}) where eager's logits differ by {gap:.3g}: not a tie")
    return step + 1


def test_a_part_only_at_a_tie_is_accepted():
    from types import SimpleNamespace as NS

    logits = [torch.tensor([[0.0, 1.0, 0.5]]), torch.tensor([[0.25, 0.5, 0.5]])]
    ref = NS(sequences=torch.tensor([[7, 1, 1]]), logits=logits)
    assert same_tokens_or_a_tie(NS(sequences=torch.tensor([[7, 1, 1]])), ref, 1, 1e-2) == 2
    assert same_tokens_or_a_tie(NS(sequences=torch.tensor([[7, 1, 2]])), ref, 1, 1e-2) == 2  # 0.5 against 0.5
    with pytest.raises(AssertionError, match="part at step 0 .* not a tie"):
        same_tokens_or_a_tie(NS(sequences=torch.tensor([[7, 2, 2]])), ref, 1, 1e-2)  # 0.5 against 1.0


@pytest.mark.parametrize("case", CASES, ids=str)
def test_generate_compiled_matches_eager(case):
    # one decoder layer: Dynamo's tracing of each layer is most of a case's time (the explain and
    # checkpoint tests below keep two: the second layer's names, and its weights from the file)
    model = tiny_model(case.arch, case.dtype, layers=1)
    qp.quantize(model, case.scheme, group_size=case.group_size, zero_points=case.zero_points)
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, qp.QuantizedLinear))
    assert "lm_head" in quantized and len(quantized) >= 5
    prompt = _prompt(1)
    with torch.no_grad():
        ref = model.generate(prompt, **GENERATE)

    # the form Hugging Face documents for static caches: the forward compiled in place
    with graph_pass.watch() as records:
        forward = CountingForward(torch.compile(model.forward, backend=qp.make("auto", inductor=case.inductor)), records)
        model.forward = forward
        with torch.no_grad():
            out = model.generate(prompt, **GENERATE)

        assert len(out.logits) == len(ref.logits) == GENERATE["max_new_tokens"]
        tol = S.TOLERANCE[case.dtype]
        steps = same_tokens_or_a_tie(out, ref, prompt.shape[1], tol)
        for step, (a, b) in enumerate(zip(out.logits[:steps], ref.logits[:steps])):
            err = S.relative_error(a, b)
            assert err <= tol, f"step {step}: logits relative error {err:.3g} > {tol}"

        # the prefill compiles, the first decode step may compile (a new shape), later steps reuse it
        assert len(forward.compiles) == GENERATE["max_new_tokens"]
        assert forward.compiles[0] >= 1 and all(c == 0 for c in forward.compiles[2:]), forward.compiles
        # a new prompt of the same length: nothing compiles again
        seen = len(records)
        with torch.no_grad():
            again = model.generate(_prompt(2), **GENERATE)
        assert len(records) == seen, "a second generate recompiled"
    assert again.sequences.shape == out.sequences.shape

    # every compiled graph ran every quantized linear through the pass, named as the model names it
    for r in records:
        assert not r.training and not r.unmatched, (r.training_reason, r.unmatched)
        assert sorted(d.spec.module for d in r.decisions) == quantized
        for d in r.decisions:
            assert d.spec.scheme == case.scheme or _same_math(d.spec, case.scheme), (d.spec.module, d.spec.scheme)
        if case.group_size:
            assert {d.spec.group_size for d in r.decisions} == {case.group_size}


def test_generate_compiles_with_our_backend_in_a_compile_config():
    """Hugging Face's own compile of the decode steps (``CompileConfig``, the default on GPUs
    with a static cache) with make()'s backend: it deep-copies the backend and passes its mode
    (one decoder layer, as above)."""
    model = tiny_model("llama", torch.float32, layers=1)
    qp.quantize(model, "int8_rowwise")
    prompt = _prompt(4)
    with torch.no_grad():
        ref = model.generate(prompt, **GENERATE)
    cc = transformers.CompileConfig(backend=qp.make("auto", inductor=False), mode=None)
    cc._compile_all_devices = True  # Hugging Face compiles on GPUs only unless told
    with graph_pass.watch() as records, torch.no_grad():
        out = model.generate(prompt, compile_config=cc, **GENERATE)
    assert out.sequences.tolist() == ref.sequences.tolist()
    assert records, "generate did not compile"
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, qp.QuantizedLinear))
    for r in records:
        assert sorted(d.spec.module for d in r.decisions) == quantized
    # its default mode ("reduce-overhead") is an Inductor setting: without Inductor, a clear error
    model = tiny_model("llama", torch.float32, layers=1)
    qp.quantize(model, "int8_rowwise")
    cc = transformers.CompileConfig(backend=qp.make("auto", inductor=False))
    cc._compile_all_devices = True
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(ValueError, match="inductor=False leaves out"):
        model.generate(prompt, compile_config=cc, **GENERATE)


def _same_math(spec, scheme: str) -> bool:
    """fp8_block on a layer of one 128x128 block fed one row is fp8_tensor: one weight scale and
    one activation scale (the matcher may name it either way)."""
    return scheme == "fp8_block" and spec.scheme == "fp8_tensor" and spec.k == S.BLOCK and spec.n <= S.BLOCK \
        and spec.m == 1


def test_explain_names_hf_layers_as_named_modules_does():
    model = tiny_model("llama", torch.float32)
    qp.quantize(model, "int8_weight_only", exclude=["lm_head"])
    model.forward = torch.compile(model.forward, backend=qp.make("emulation", inductor=False))
    with torch.no_grad():
        rep = qp.explain(model, _prompt(3))
    names = [r["module"] for r in rep.rows]
    assert "model.layers.0.mlp.down_proj" in names
    assert sorted(names) == sorted(n for n, m in model.named_modules() if isinstance(m, qp.QuantizedLinear))
    assert [u["module"] for u in rep.unmatched] == ["lm_head"]
    assert "model.layers.1.self_attn.q_proj" in str(rep) and "args." not in str(rep)


@pytest.mark.slow  # a whole example in its own process (17 s on 2 cores): `make test-all` and CI run it
def test_the_example_runs_on_a_local_model_directory(tmp_path):
    """examples/hf_generate.py on a saved tiny Mistral: its tokens equal the eager model's."""
    import pathlib
    import re
    import subprocess
    import sys

    tiny_model("mistral", torch.float32).save_pretrained(tmp_path)
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "hf_generate.py"), str(tmp_path), "--scheme", "int8_weight_only",
         "--tokens", "3", "--no-inductor"],
        capture_output=True, text=True, timeout=300, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "same tokens as the eager quantized model: True" in proc.stdout
    assert re.search(r"^model\.layers\.1\.mlp\.down_proj +int8_weight_only ", proc.stdout, re.M), proc.stdout
    assert "tokens/s" in proc.stdout


@pytest.mark.parametrize("scheme,group_size", [("w4a16", 64), ("fp8_rowwise", None)])
def test_a_saved_checkpoint_loads_compiles_and_generates_the_same_tokens(scheme, group_size, tmp_path):
    """save_quantized -> a fresh float model from the config -> load_quantized -> compile ->
    generate: the tokens of the model that was saved, run eagerly."""
    model = tiny_model("llama", torch.bfloat16)
    qp.quantize(model, scheme, group_size=group_size, exclude=["lm_head"])
    prompt = _prompt(5)
    with torch.no_grad():
        ref = model.generate(prompt, **GENERATE)
    qp.save_quantized(model, tmp_path / "ckpt")

    fresh = tiny_model("llama", torch.bfloat16, seed=7)  # other random weights: all must come from the file
    qp.load_quantized(fresh, tmp_path / "ckpt")
    fresh.forward = torch.compile(fresh.forward, backend=qp.make("auto", inductor=False))
    with graph_pass.watch() as records, torch.no_grad():
        out = fresh.generate(prompt, **GENERATE)
    assert out.sequences.tolist() == ref.sequences.tolist()
    for r in records:  # every quantized linear through the pass; only the float lm_head left alone
        assert len(r.decisions) == 14 and [u["module"] for u in r.unmatched] == ["lm_head"], r.unmatched
