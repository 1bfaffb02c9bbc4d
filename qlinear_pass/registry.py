"""Kernel registration and the loading of backends and plug-ins (nothing else).

Every module of ``qlinear_pass.backends`` registers its kernels with :func:`register_kernel`,
as does any package listed under the ``qlinear_pass.backends`` entry-point group.  Selection
lives in ``select.py``.

The names kernels are written with (``Kernel``, ``LayerSpec``, ``DeviceInfo``, ``OK``) are
importable from here too, as plug-ins have done.
"""
from __future__ import annotations

import warnings

from . import config as C
from .kernel import Kernel
from .spec import OK, DeviceInfo, LayerSpec, Reason

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


def generation() -> int:
    """Changes whenever a kernel is registered or unregistered."""
    return _generation


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


#: names that moved to select.py, still importable from here (old import paths of plug-ins and tests);
#: looked up lazily, so this module never imports select.py (imports flow downward)
_IN_SELECT = {"NoKernelError", "Selection", "select", "candidates", "supported", "available_backends", "parse_plan",
              "M_BUCKETS", "m_bucket", "no_kernel_message", "_first_fit", "_warned"}


def __getattr__(name: str):
    if name in _IN_SELECT:
        from . import select

        return getattr(select, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "register_kernel",
    "unregister_kernel",
    "kernels",
    "get_kernel",
    "registry_key",
    "Kernel",
    "LayerSpec",
    "DeviceInfo",
    "Reason",
    "OK",
]
