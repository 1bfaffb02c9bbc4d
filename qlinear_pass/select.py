"""The one selection loop: which kernel runs a layer, per-M plans, and NoKernelError.

For a layer spec the candidates are the kernels registered for its scheme, in ``auto``'s
order for the device, filtered by the backend in effect for that scheme; the first whose
``is_supported`` and ``can_implement`` both say yes wins.  An explicit backend with no
winner raises :class:`NoKernelError` (or falls back to ``auto`` with a warning); ``auto``
never raises for a known scheme, ``emulation`` being its last resort.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

from . import config as C
from . import ranking
from .kernel import Kernel
from .ranking import M_BUCKETS, m_bucket
from .registry import _KERNELS, _load_backends
from .spec import DeviceInfo, LayerSpec, Reason, parse_plan, plan_text  # noqa: F401  (parse_plan: old path)


class NoKernelError(ValueError):
    """An explicit backend has no kernel that can run a layer.

    The message names the layer, every candidate kernel with its reason, and the fixes.
    """

    def __str__(self) -> str:
        # our message alone: torch.compile appends its own advice to args[0] on the way out
        return getattr(self, "message", None) or super().__str__()


NoKernelError.__module__ = "qlinear_pass"  # its public home: printed as qlinear_pass.NoKernelError


@dataclasses.dataclass
class Selection:
    spec: LayerSpec
    backend: str  # the backend asked for (after per-scheme override)
    kernel: Optional[Kernel]
    rejected: list[tuple[str, str]]  # (kernel name, reason)
    fallback: bool = False  # an explicit backend fell back to auto
    note: str = ""
    #: auto with a dynamic M: [(largest M or None, kernel), ...] when the best kernel depends on M
    plan: list = dataclasses.field(default_factory=list)

    @property
    def kernel_name(self) -> Optional[str]:
        """What the custom op is given: a kernel name, or a per-M plan ``a@1;b``."""
        if self.plan:
            return plan_text((limit, k.name) for limit, k in self.plan)
        return self.kernel.name if self.kernel else None

    def describe(self) -> Optional[str]:
        if not self.plan:
            return self.kernel_name
        parts, low = [], 0
        for limit, k in self.plan:
            parts.append(f"{k.name} (M>{low})" if limit is None else f"{k.name} (M<={limit})" if low == 0 else f"{k.name} ({low}<M<={limit})")
            low = limit or low
        return ", ".join(parts)


def candidates(scheme: str, device: DeviceInfo, bucket: Optional[int] = 1, act_dtype=None,
               weight_layout: Optional[str] = None) -> list[Kernel]:
    """Kernels registered for ``scheme``, in the order ``auto`` tries them on ``device`` for
    layers whose M falls in ``bucket``, whose activation is ``act_dtype`` and whose weight is held in
    ``weight_layout`` (``ranking.py``'s table)."""
    _load_backends()
    return ranking.order([k for k in _KERNELS.values() if scheme in k.schemes], scheme, device, bucket, act_dtype,
                         weight_layout)


def supported(kernel: Kernel, device: DeviceInfo) -> Reason:
    """Can ``kernel`` run on ``device``: the kernel's own answer, on a device that is there."""
    if not device.present:
        return False, f"no {'CUDA' if device.type == 'cuda' else device.type} device is visible to torch"
    return kernel.is_supported(device)


def _first_fit(spec: LayerSpec, device: DeviceInfo, backend: str,
               bucket: Optional[int] = 1) -> tuple[Optional[Kernel], list[tuple[str, str]]]:
    """The first candidate of ``backend`` (all of them for ``auto``), in the order of M bucket
    ``bucket``, that can run ``spec`` on ``device``; and (name, reason) for each one before it."""
    rejected: list[tuple[str, str]] = []
    for k in candidates(spec.scheme, device, bucket, spec.act_dtype, spec.weight_layout):
        if backend != "auto" and k.backend != backend:
            continue
        ok, why = supported(k, device)
        if ok:
            ok, why = reads_layout(k, spec)
        if ok:
            ok, why = k.can_implement(spec)
        if ok:
            return k, rejected
        rejected.append((k.name, why or "no reason given"))
    return None, rejected


def reads_layout(kernel: Kernel, spec: LayerSpec) -> Reason:
    """Does ``kernel`` read the layout ``spec``'s weight is held in?"""
    if spec.weight_layout in kernel.weight_layouts:
        return True, ""
    return False, (f"reads the weight in the {' / '.join(kernel.weight_layouts)} layout, not the {spec.weight_layout} "
                   f"layout this layer holds (QuantizedLinear.repack('public') converts it back)")


_warned: set = set()


def select(spec: LayerSpec, cfg: C.LinearBackendConfig, device: "DeviceInfo | None" = None) -> Selection:
    """Choose the kernel for one layer: the first candidate that fits wins."""
    device = DeviceInfo.of(spec.device) if device is None else device
    backend = cfg.backend_for(spec.scheme)
    if backend == "auto":
        return _select_auto(spec, device)
    kernel, rejected = _first_fit(spec, device, backend, _bucket_of(spec))
    if kernel is not None:
        return Selection(spec, backend, kernel, rejected)
    if cfg.on_unsupported == "fallback":
        auto = _select_auto(spec, device)
        auto_kernel = auto.kernel
        key = (spec.scheme, backend, spec.n, spec.k)
        if key not in _warned:
            _warned.add(key)
            why = "; ".join(f"{n}: {r}" for n, r in rejected) or f"backend {backend!r} has no kernel for {spec.scheme}"
            warnings.warn(
                f"qlinear_pass: backend {backend!r} cannot run {_layer(spec)} ({why}); "
                f"falling back to auto, which chose {auto_kernel.name if auto_kernel else None!r}",
                stacklevel=2,
            )
        return Selection(spec, backend, auto_kernel, rejected, fallback=True, note=f"fell back from {backend}", plan=auto.plan)
    err = NoKernelError(no_kernel_message(spec, backend, rejected, device))
    err.message = err.args[0]
    raise err


def _bucket_of(spec: LayerSpec) -> Optional[int]:
    """The M bucket whose order a layer follows: its own, or M <= 1's when M is dynamic."""
    return m_bucket(spec.m) if spec.m is not None else M_BUCKETS[0]


def _select_auto(spec: LayerSpec, device: DeviceInfo) -> Selection:
    """``auto``: the first fit in the order of the layer's M bucket (``ranking.py``).

    With a dynamic M, the first fit of every bucket: one kernel when they agree; a
    per-M plan that the op follows at run time when they differ and all can run behind
    the custom op; otherwise the first fit for M = 1.
    """
    if spec.m is not None:
        kernel, rejected = _first_fit(spec, device, "auto", m_bucket(spec.m))
        if kernel is None:  # emulation runs every scheme anywhere
            raise RuntimeError(f"no kernel at all for {spec.short()} on {device}: {rejected}")
        return Selection(spec, "auto", kernel, rejected)
    fits = [(b, *_first_fit(spec, device, "auto", b)) for b in M_BUCKETS]
    missing = [(b, rejected) for b, k, rejected in fits if k is None]
    if missing:
        raise RuntimeError(f"no kernel at all for {spec.short()} on {device}: {missing}")
    _, kernel, rejected = fits[0]
    plan: list = []
    if len({k.name for _, k, _ in fits}) > 1 and all(k.runs_behind_op for _, k, _ in fits):
        for limit, k, _ in fits:
            if plan and plan[-1][1] is k:
                plan[-1] = (limit, k)
            else:
                plan.append((limit, k))
    return Selection(spec, "auto", kernel, rejected, plan=plan)


def _layer(spec: LayerSpec) -> str:
    where = f"layer {spec.module!r}" if spec.module else "a layer"
    return f"{where} ({spec.short()})"


def no_kernel_message(spec: LayerSpec, backend: str, rejected: list[tuple[str, str]], device: DeviceInfo) -> str:
    lines = [f"linear backend {backend!r} has no kernel for {_layer(spec)} on {device}."]
    if rejected:
        lines.append("Candidates:")
        lines += [f"  - {name}: {why}" for name, why in rejected]
    else:
        has_any = any(k.backend == backend for k in _KERNELS.values())
        if has_any:
            lines.append(f"Backend {backend!r} has no kernel for scheme {spec.scheme!r}.")
        else:
            lines.append(f"Backend {backend!r} has no kernels registered (not available in this installation).")
    lines.append("Fixes:")
    lines.append(f"  - pin another backend for this scheme: LinearBackendConfig(linear_backend={backend!r}, per_scheme={{{spec.scheme!r}: 'auto'}})")
    lines.append("  - or let such layers fall back to auto: LinearBackendConfig(..., on_unsupported='fallback')")
    return "\n".join(lines)


def available_backends(device=None) -> dict[str, dict[str, Reason]]:
    """For each backend and scheme: can this backend run that scheme on ``device``, and why not."""
    from .config import SCHEMES, backend_names

    dev = DeviceInfo.of(device)
    _load_backends()
    table: dict[str, dict[str, Reason]] = {}
    for b in backend_names():
        if b == "auto":
            continue
        row = {}
        for s in SCHEMES:
            ks = [k for k in candidates(s, dev) if k.backend == b]
            if not ks:
                has_any = any(k.backend == b for k in _KERNELS.values())
                row[s] = (False, "no kernel for this scheme" if has_any else "no kernels registered")
                continue
            reasons = []
            for k in ks:
                ok, why = supported(k, dev)
                if ok:
                    row[s] = (True, k.name)
                    break
                reasons.append(f"{k.name}: {why}")
            else:
                row[s] = (False, "; ".join(reasons))
        table[b] = row
    return table


__all__ = [
    "NoKernelError",
    "Selection",
    "select",
    "candidates",
    "supported",
    "available_backends",
    "parse_plan",
    "M_BUCKETS",
    "m_bucket",
]
