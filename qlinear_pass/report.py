"""``explain()``: which kernel runs each quantized linear, and why not the others."""
from __future__ import annotations

import dataclasses

import torch

from . import config as C
from .graph_pass import HISTORY, CompileRecord


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
        lines = [f"linear backend: {self.config.describe()} (from {self.source})"]
        if self.training:
            lines += self.training_reasons or ["graph needs gradients: left untouched (the pass rewrites inference graphs only)"]
        headers = ["module", "scheme", "N", "K", "backend", "kernel", "rejected"]
        table = []
        for r in self.rows:
            scheme = r["scheme"] + (f" g{r['group_size']}" if r.get("group_size") else "")
            kernel = (r["kernel"] or "-") + (" (fallback)" if r.get("fallback") else "")
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


def explain(
    model: torch.nn.Module,
    *example_inputs,
    linear_backend: "str | C.LinearBackendConfig | None" = None,
    inductor: bool = False,
) -> Report:
    """Compile ``model`` on ``example_inputs`` and report every quantized linear.

    The pass runs exactly as in ``make()`` (over the ATen graph, without
    Inductor code generation unless ``inductor=True``), in the grad mode in
    effect: called outside ``torch.no_grad()`` on a model with trainable
    parameters, the report says the graph needs gradients and lists no
    kernel in ``rows``, since the compiled model would run none; what it
    would run under ``torch.no_grad()`` is in ``under_no_grad``.  An explicit
    backend that cannot run a layer raises ``NoKernelError``.
    """
    import torch._dynamo

    from .compile import make

    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    cfg, source = C.resolve(linear_backend)
    backend = make(cfg, inductor=inductor)

    def run() -> Report:
        start = len(HISTORY)
        torch._dynamo.reset()
        try:
            # a cache hit would skip the pass, and with it the decisions to report
            with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
                torch.compile(model, backend=backend, fullgraph=False)(*example_inputs)
        finally:
            torch._dynamo.reset()
        return Report.from_records(HISTORY[start:], cfg, source)

    report = run()
    if report.training and torch.is_grad_enabled():
        with torch.no_grad():
            report.under_no_grad = run()
    return report
