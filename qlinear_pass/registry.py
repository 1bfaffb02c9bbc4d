"""Kernels, their registration, and the one selection function.

A kernel implements one or more schemes and belongs to exactly one backend.
It answers two questions, each with a reason:

* ``is_supported(device) -> (ok, reason)``: can it run on this device at all
  (GPU generation, libraries installed)?
* ``can_implement(spec) -> (ok, reason)``: can it run this layer (shape
  alignment, group size, dtypes, constant weights)?

:func:`select` is the only place that decides which kernel runs a layer.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from typing import ClassVar, Optional, Sequence

import torch

from . import config as C


class NoKernelError(ValueError):
    """An explicit backend has no kernel that can run a layer.

    The message names the layer, every candidate kernel with its reason, and the fixes.
    """

    def __str__(self) -> str:
        # our message alone: torch.compile appends its own advice to args[0] on the way out
        return getattr(self, "message", None) or super().__str__()


NoKernelError.__module__ = "qlinear_pass"  # its public home: printed as qlinear_pass.NoKernelError


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What kernels need to know about a device (tests build fake ones)."""

    type: str
    capability: Optional[tuple[int, int]] = None
    name: str = ""
    index: Optional[int] = None

    @classmethod
    def of(cls, device: "torch.device | str | DeviceInfo | None" = None) -> "DeviceInfo":
        if isinstance(device, DeviceInfo):
            return device
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return cls("cuda", None, "no CUDA device visible", device.index)
            idx = device.index if device.index is not None else torch.cuda.current_device()
            return _cuda_info(idx)
        return cls(device.type, None, device.type, device.index)

    @property
    def present(self) -> bool:
        """False for a CUDA device that is not there (``DeviceInfo.of("cuda")`` without a GPU)."""
        return not (self.type == "cuda" and self.capability is None)

    @property
    def sm(self) -> Optional[int]:
        return None if self.capability is None else self.capability[0] * 10 + self.capability[1]

    def __str__(self) -> str:
        if self.type == "cuda" and self.capability:
            return f"cuda sm{self.sm} ({self.name})"
        return self.name or self.type


@functools.lru_cache(maxsize=None)
def _cuda_info(idx: int) -> DeviceInfo:
    cap = torch.cuda.get_device_capability(idx)
    return DeviceInfo("cuda", (int(cap[0]), int(cap[1])), torch.cuda.get_device_name(idx), idx)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One matched linear, as kernels see it."""

    scheme: str
    n: int
    k: int
    act_dtype: torch.dtype  # dtype of the activation the kernel receives
    out_dtype: torch.dtype
    has_bias: bool = False
    group_size: Optional[int] = None
    zero_points: bool = False
    #: "dynamic": the kernel receives the float activation and quantizes it;
    #: "static": it receives an already-quantized activation and its scale;
    #: "none": weight-only scheme
    act_input: str = "none"
    device: str = "cpu"
    weights_constant: bool = False
    #: M when it is fixed in the graph, None when it is symbolic
    m: Optional[int] = None
    module: str = ""

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["act_dtype"] = str(self.act_dtype).removeprefix("torch.")
        d["out_dtype"] = str(self.out_dtype).removeprefix("torch.")
        return json.dumps(d, sort_keys=True)

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def from_json(text: str) -> "LayerSpec":
        d = json.loads(text)
        d["act_dtype"] = getattr(torch, d["act_dtype"])
        d["out_dtype"] = getattr(torch, d["out_dtype"])
        return LayerSpec(**d)

    def short(self) -> str:
        g = f" g{self.group_size}" if self.group_size else ""
        z = "+zp" if self.zero_points else ""
        return f"{self.scheme}{g}{z} N={self.n} K={self.k}"


Reason = tuple[bool, str]
OK: Reason = (True, "")


class Kernel:
    """Base class of every kernel.

    Subclasses set ``name`` (unique), ``backend``, ``schemes`` and
    ``priority`` (lower runs first under ``auto``; see :meth:`priority_for`),
    and implement :meth:`run`.  A kernel that wants Inductor to fuse around it
    overrides :meth:`emit` instead (see ``graph_pass.py``).
    """

    name: ClassVar[str]
    backend: ClassVar[str]
    schemes: ClassVar[tuple[str, ...]]
    priority: ClassVar[int] = 50

    def is_supported(self, device: DeviceInfo) -> Reason:
        return OK

    def can_implement(self, spec: LayerSpec) -> Reason:
        return OK

    def priority_for(self, device: DeviceInfo) -> int:
        return self.priority

    def auto_priority(self, device: DeviceInfo, m_bucket: Optional[int]) -> int:
        """Rank under ``auto`` for layers whose M falls in ``m_bucket`` (see ``M_BUCKETS``).

        A kernel that measures fastest only for some M ranks itself per bucket;
        by default the rank is :meth:`priority_for`.
        """
        return self.priority_for(device)

    #: False for kernels that insert ATen ops into the graph (see emit)
    opaque: ClassVar[bool] = True

    @property
    def runs_behind_op(self) -> bool:
        """Can it run behind the custom op (it has a :meth:`run`)?  Per-M plans need that."""
        return type(self).run is not Kernel.run

    def run(
        self,
        spec: LayerSpec,
        x: torch.Tensor,
        params: Sequence[Optional[torch.Tensor]],
        bias: Optional[torch.Tensor],
    ) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<kernel {self.name} ({self.backend})>"


_KERNELS: dict[str, Kernel] = {}
_generation = 0


def register_kernel(cls: type) -> type:
    """Register a :class:`Kernel` subclass (also usable as a class decorator).

    A kernel of a backend the config does not know yet makes that backend
    name known, so other packages can add backends.
    """
    if not (isinstance(cls, type) and issubclass(cls, Kernel)):
        raise TypeError(f"register_kernel takes a Kernel subclass, got {cls!r}")
    for attr in ("name", "backend", "schemes"):
        if not getattr(cls, attr, None):
            raise TypeError(f"kernel class {cls.__name__} must set {attr!r}")
    backend = C.add_backend_name(cls.backend)
    if backend != cls.backend:
        raise ValueError(f"kernel {cls.name}: backend must be written normalised, {backend!r} not {cls.backend!r}")
    for s in cls.schemes:
        C.normalize_scheme(s)
    old = _KERNELS.get(cls.name)
    if old is not None and type(old).__qualname__ != cls.__qualname__:
        raise ValueError(f"a kernel named {cls.name!r} is already registered ({type(old).__module__}.{type(old).__qualname__})")
    _KERNELS[cls.name] = cls()
    global _generation
    _generation += 1
    return cls


def unregister_kernel(name: str) -> None:
    global _generation
    _KERNELS.pop(name, None)
    _generation += 1


def kernels() -> dict[str, Kernel]:
    _load_backends()
    return dict(_KERNELS)


def get_kernel(name: str) -> Kernel:
    _load_backends()
    try:
        return _KERNELS[name]
    except KeyError:
        raise KeyError(f"no kernel named {name!r} is registered (known: {', '.join(sorted(_KERNELS))})") from None


def registry_key() -> str:
    """Changes whenever the set of kernels changes (part of the pass's cache key)."""
    _load_backends()
    return ",".join(f"{k}:{type(v).__module__}" for k, v in sorted(_KERNELS.items()))


_loaded = False


def _load_backends() -> None:
    """Import every module of ``qlinear_pass.backends`` and the plug-ins of other packages."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    from . import backends

    for info in sorted(pkgutil.iter_modules(backends.__path__), key=lambda i: i.name):
        importlib.import_module(f"{backends.__name__}.{info.name}")
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="qlinear_pass.backends"):
            try:
                ep.load()
            except Exception as exc:  # a broken plug-in must not break the pass
                warnings.warn(f"qlinear_pass: backend plug-in {ep.name!r} failed to load: {exc}")
    except Exception:
        pass


# --- selection ---------------------------------------------------------------


#: ``auto`` ranks kernels per M bucket: M <= 1, <= 16, <= 128, <= 1024, larger (None)
M_BUCKETS: tuple = (1, 16, 128, 1024, None)


def m_bucket(m: int) -> Optional[int]:
    return next(b for b in M_BUCKETS if b is None or m <= b)


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
            return ";".join(k.name if limit is None else f"{k.name}@{limit}" for limit, k in self.plan)
        return self.kernel.name if self.kernel else None

    def describe(self) -> Optional[str]:
        if not self.plan:
            return self.kernel_name
        parts, low = [], 0
        for limit, k in self.plan:
            parts.append(f"{k.name} (M>{low})" if limit is None else f"{k.name} (M<={limit})" if low == 0 else f"{k.name} ({low}<M<={limit})")
            low = limit or low
        return ", ".join(parts)


def parse_plan(text: str) -> list:
    """``"a@1;b"`` -> [(1, "a"), (None, "b")]."""
    out = []
    for part in text.split(";"):
        name, _, limit = part.partition("@")
        out.append((int(limit) if limit else None, name))
    return out


def candidates(scheme: str, device: DeviceInfo) -> list[Kernel]:
    """Kernels registered for ``scheme``, in ``auto`` priority order for ``device``."""
    _load_backends()
    ks = [k for k in _KERNELS.values() if scheme in k.schemes]
    return sorted(ks, key=lambda k: (k.priority_for(device), k.name))


def supported(kernel: Kernel, device: DeviceInfo) -> Reason:
    """Can ``kernel`` run on ``device``: the kernel's own answer, on a device that is there."""
    if not device.present:
        return False, f"no {'CUDA' if device.type == 'cuda' else device.type} device is visible to torch"
    return kernel.is_supported(device)


def _first_fit(spec: LayerSpec, device: DeviceInfo, backend: str, bucket: Optional[int] = None,
               ranked: bool = False) -> tuple[Optional[Kernel], list[tuple[str, str]]]:
    rejected: list[tuple[str, str]] = []
    ks = candidates(spec.scheme, device)
    if ranked:
        ks = sorted(ks, key=lambda k: (k.auto_priority(device, bucket), k.name))
    for k in ks:
        if backend != "auto" and k.backend != backend:
            continue
        ok, why = supported(k, device)
        if ok:
            ok, why = k.can_implement(spec)
        if ok:
            return k, rejected
        rejected.append((k.name, why or "no reason given"))
    return None, rejected


_warned: set = set()


def select(spec: LayerSpec, cfg: C.LinearBackendConfig, device: "DeviceInfo | None" = None) -> Selection:
    """Choose the kernel for one layer: the first candidate that fits wins."""
    device = DeviceInfo.of(spec.device) if device is None else device
    backend = cfg.backend_for(spec.scheme)
    if backend == "auto":
        return _select_auto(spec, device)
    kernel, rejected = _first_fit(spec, device, backend)
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


def _select_auto(spec: LayerSpec, device: DeviceInfo) -> Selection:
    """``auto``: the first fit in priority order; with a dynamic M, the first fit of each M bucket.

    When the winners differ by bucket and all can run behind the custom op,
    the layer gets a per-M plan that the op follows at run time.
    """
    if spec.m is not None:
        kernel, rejected = _first_fit(spec, device, "auto", m_bucket(spec.m), ranked=True)
    else:
        kernel, rejected = _first_fit(spec, device, "auto")
    if kernel is None:  # emulation runs every scheme anywhere
        raise RuntimeError(f"no kernel at all for {spec.short()} on {device}: {rejected}")
    plan: list = []
    if spec.m is None:
        winners = [(b, _first_fit(spec, device, "auto", b, ranked=True)[0]) for b in M_BUCKETS]
        if len({k.name for _, k in winners}) > 1 and all(k.runs_behind_op for _, k in winners):
            for limit, k in winners:
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
    "DeviceInfo",
    "LayerSpec",
    "Kernel",
    "register_kernel",
    "select",
    "available_backends",
    "candidates",
    "Selection",
]
