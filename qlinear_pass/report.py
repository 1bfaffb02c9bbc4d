"""``explain()``: which kernel runs each quantized linear, and why not the others."""
from __future__ import annotations

import builtins
import dataclasses
import itertools
import types

import torch

from . import config as C
from . import graph_pass
from .graph_pass import CompileRecord
from .patterns import EXPLAIN_ROOT


@dataclasses.dataclass
class Report:
    """The decisions of one compile.

    ``rows``: one dict per matched linear (keys ``module``, ``scheme``, ``n``,
    ``k``, ``backend``, ``kernel``, ``rejected``, ...); ``unmatched``: the
    matmuls seen but not matched, with the reason; ``training``: a graph
    needed gradients and was compiled untouched (``training_reasons`` say
    why), so no kernel of the pass runs in it.
    """

    config: C.LinearBackendConfig
    source: str
    rows: list[dict]
    unmatched: list[dict]
    training: bool = False
    training_reasons: list[str] = dataclasses.field(default_factory=list)
    #: for a ``training`` report: what the pass would do when called under ``torch.no_grad()``
    under_no_grad: "Report | None" = None

    @classmethod
    def from_records(cls, records: list[CompileRecord], cfg: C.LinearBackendConfig, source: str) -> "Report":
        rows, unmatched, training, reasons = [], [], False, []
        for r in records:
            rows += [d.as_row() for d in r.decisions]
            unmatched += r.unmatched
            training |= r.training
            if r.training and r.training_reason and r.training_reason not in reasons:
                reasons.append(r.training_reason)
        return cls(cfg, source, rows, unmatched, training, reasons)

    def kernels(self) -> dict[str, str]:
        """module -> kernel name."""
        return {r["module"]: r["kernel"] for r in self.rows}

    def __str__(self) -> str:
        lines = [f"linear backend: {self.config.describe()} (from {_SOURCES.get(self.source, self.source)})"]
        if self.training:
            lines += self.training_reasons or ["graph needs gradients: left untouched (the pass rewrites inference graphs only)"]
        headers = ["module", "scheme", "N", "K", "backend", "kernel", "rejected"]
        table = []
        for r in self.rows:
            scheme = r["scheme"] + (f" g{r['group_size']}" if r.get("group_size") else "")
            scheme += f" ({r['weight_layout']})" if r.get("weight_layout", "public") != "public" else ""
            kernel = (r["kernel"] or "-") + (" (fallback)" if r.get("fallback") else "") + (f" [{r['note']}]" if r.get("note") else "")
            rej = "; ".join(f"{n}: {why}" for n, why in r["rejected"]) or "-"
            table.append([r["module"] or "-", scheme, str(r["n"]), str(r["k"]), r["backend"], kernel, rej])
        if table:
            widths = [max(len(h), *(min(len(row[i]), 60) for row in table)) for i, h in enumerate(headers)]
            fmt = lambda row: "  ".join(c.ljust(w) if i < len(row) - 1 else c for i, (c, w) in enumerate(zip(row, widths)))
            lines.append(fmt(headers))
            lines.append(fmt(["-" * w for w in widths]))
            lines += [fmt(row) for row in table]
        elif not self.training:
            lines.append("no quantized linears matched")
        if self.under_no_grad is not None:
            lines.append("under torch.no_grad() the pass would choose:")
            lines += ["  " + line for line in str(self.under_no_grad).splitlines()[1:]]
        if self.unmatched:
            lines.append("")
            lines.append("matmuls seen but not matched:")
            for u in self.unmatched:
                where = u["module"] or u["node"]
                lines.append(f"  {where} ({u['op']}): {u['reason']}")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(str(self))


def _qlinear_backend_of(compiled) -> "object | None":
    """The ``make()`` backend a ``torch.compile``-d module or function was compiled with, if any."""
    from .compile import QLinearBackend

    ctx = getattr(compiled, "dynamo_ctx", None)
    stack = [getattr(ctx, "callback", None)]
    seen = set()
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, QLinearBackend):
            return obj
        stack += [getattr(obj, a, None) for a in ("_torchdynamo_orig_backend", "compiler_fn", "__wrapped__")]
    return None


_SOURCES = {
    "make": "the compiled model's make()",
    "argument": "explain's linear_backend argument",
}

_explain_count = itertools.count()


def explain(
    model,
    *example_inputs,
    linear_backend: "str | C.LinearBackendConfig | None" = None,
    inductor: bool = False,
) -> Report:
    """Compile a copy of ``model`` on ``example_inputs`` and report every quantized linear.

    ``model`` may be the compiled model (``torch.compile(model, backend=make(...))``): the
    report then uses the config it was compiled with.  ``linear_backend`` names a config
    instead; with neither, the config in effect here (context, environment, ``auto``) is used
    and the report says so.  The pass runs exactly as in ``make()`` (over the ATen graph,
    without Inductor code generation unless ``inductor=True``), in the grad mode in effect:
    called outside ``torch.no_grad()`` on a model with trainable parameters, the report says
    the graph needs gradients and lists no kernel in ``rows``, since the compiled model would
    run none; what it would run under ``torch.no_grad()`` is in ``under_no_grad``.  Other
    compiled models are left alone: the copy is compiled from a new entry point, with a
    backend of its own and the on-disk caches off, so nothing of theirs is reset or reused.
    An explicit backend that cannot run a layer raises ``NoKernelError``.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from .compile import QLinearBackend

    target = getattr(model, "_orig_mod", None) or getattr(model, "_torchdynamo_orig_callable", None) or model
    compiled_with = _qlinear_backend_of(model)
    if linear_backend is not None:
        cfg, source = C.as_config(linear_backend), "argument"
    elif compiled_with is not None and compiled_with.config is not None:
        cfg, source = compiled_with.config, "make"
    else:
        cfg, source = C.resolve(None)
        source = f"{source}; explain() was given no config: the one in effect here"
    options = tuple(sorted(compiled_with.options.items())) if compiled_with is not None else ()
    backend = QLinearBackend(cfg, inductor or bool(options), options)

    def run(grad: bool) -> Report:
        # a function of its own (a new code object): Dynamo's caches are per code object, so this
        # compile neither reuses nor replaces the entries of the user's compiled models
        code = _entry.__code__.replace(co_name=f"qlinear_explain_{next(_explain_count)}")
        entry = types.FunctionType(code, {"__builtins__": builtins, EXPLAIN_ROOT: target})
        with graph_pass.watch() as records:
            with torch.set_grad_enabled(grad), inductor_config.patch(fx_graph_cache=False), \
                    functorch_config.patch(enable_autograd_cache=False):
                torch.compile(entry, backend=backend, fullgraph=False)(*example_inputs)
        return Report.from_records(records, cfg, source)

    report = run(torch.is_grad_enabled())
    if report.training and torch.is_grad_enabled():
        report.under_no_grad = run(False)
    return report


def _entry(*args):
    return _qlinear_explain_model(*args)  # noqa: F821  (a global of the function built from this code)
