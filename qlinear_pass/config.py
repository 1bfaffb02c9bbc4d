"""Backend and scheme names, `LinearBackendConfig`, and the `linear_backend` context.

Where the config in effect comes from, strongest first:

1. ``make(linear_backend=...)`` / ``make(config=...)``;
2. the innermost ``with linear_backend(...)``;
3. the environment variable ``QLINEAR_PASS_LINEAR_BACKEND``;
4. ``"auto"``.

The kernel that runs is the one chosen by the config in effect when the
compiled model is *called*.  ``linear_backend`` therefore does two things: it
sets a plain module variable that the compiler backend reads while compiling,
and it pushes a no-op ``TorchFunctionMode`` whose *class* is unique to the
config.  Dynamo guards on the types of the active function modes, so entering
a context with another config recompiles once, and each config's graph is
reused afterwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import threading
from types import MappingProxyType
from typing import Mapping

from torch.overrides import TorchFunctionMode

ENV_VAR = "QLINEAR_PASS_LINEAR_BACKEND"

#: Backend names a user may write.  Backends that register kernels from
#: another package are added through :func:`add_backend_name`.
_BACKENDS: list[str] = [
    "auto",
    "emulation",
    "torch",
    "triton",
    "cuda",
    "cutlass",
    "flashinfer_cublas",
    "flashinfer_cudnn",
    "flashinfer_deepgemm",
    "flashinfer_cutlass",
    "flashinfer_trtllm",
    "conch",
    "gemlite",
    "marlin",
]

#: Scheme names (the math of a quantized linear); see ``schemes.py``.
SCHEMES: tuple[str, ...] = (
    "fp8_tensor",
    "fp8_rowwise",
    "fp8_block",
    "int8_rowwise",
    "int8_weight_only",
    "fp8_weight_only",
    "w4a16",
)

ON_UNSUPPORTED = ("raise", "fallback")


def backend_names() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def add_backend_name(name: str) -> str:
    """Make ``name`` a known backend (used when a kernel of a new backend registers)."""
    norm = _norm(name)
    if not norm.isidentifier():
        raise ValueError(f"backend name {name!r} must be an identifier after normalisation, got {norm!r}")
    if norm not in _BACKENDS:
        _BACKENDS.append(norm)
    return norm


def _norm(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"expected a name (str), got {type(name).__name__}: {name!r}")
    return name.strip().lower().replace("-", "_")


#: names people write for a scheme, and the scheme they mean (only ever a hint, never accepted)
SCHEME_HINTS = {
    "int4": "w4a16",
    "int4_weight_only": "w4a16",
    "w4a16_int4": "w4a16",
    "uint4": "w4a16",
    "fp8": "fp8_rowwise",
    "fp8_dynamic": "fp8_rowwise",
    "fp8_per_tensor": "fp8_tensor",
    "fp8_blockwise": "fp8_block",
    "int8": "int8_rowwise",
    "w8a8": "int8_rowwise",
    "w8a16": "int8_weight_only",
}


def _unknown(kind: str, name: str, valid: tuple[str, ...]) -> ValueError:
    hint = SCHEME_HINTS.get(_norm(name)) if kind == "scheme" else None
    close = [hint] if hint else difflib.get_close_matches(_norm(name), valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Valid {kind}s: {', '.join(valid)}.")


def normalize_backend(name: str) -> str:
    """Lower-case, ``-`` -> ``_``; raise ``ValueError`` naming the valid backends."""
    norm = _norm(name)
    if norm not in _BACKENDS:
        raise _unknown("backend", name, tuple(_BACKENDS))
    return norm


def normalize_scheme(name: str) -> str:
    norm = _norm(name)
    if norm not in SCHEMES:
        raise _unknown("scheme", name, SCHEMES)
    return norm


@dataclasses.dataclass(frozen=True)
class LinearBackendConfig:
    """Which backend runs the quantized linears.

    ``linear_backend`` applies to every scheme; ``per_scheme`` pins a backend
    for one scheme (``{"w4a16": "triton", "fp8_rowwise": "cutlass"}``).
    ``on_unsupported`` decides what an explicit backend does when it has no
    kernel for a layer: ``"raise"`` (:class:`~qlinear_pass.NoKernelError`) or
    ``"fallback"`` (use ``auto`` for that layer, with a warning).
    ``fuse`` lets a kernel that can run the RMSNorm or SwiGLU before its layer and the residual add
    after it in its own launch take them out of the graph (``fusion.py``); ``False`` leaves them
    to Inductor.
    """

    linear_backend: str = "auto"
    per_scheme: Mapping[str, str] = dataclasses.field(default_factory=dict)
    on_unsupported: str = "raise"
    fuse: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.fuse, bool):
            raise TypeError(f"fuse must be True or False, got {type(self.fuse).__name__}: {self.fuse!r}")
        object.__setattr__(self, "linear_backend", normalize_backend(self.linear_backend))
        if not isinstance(self.per_scheme, Mapping):
            raise TypeError(f"per_scheme must be a mapping of scheme -> backend, got {type(self.per_scheme).__name__}")
        pinned = {normalize_scheme(s): normalize_backend(b) for s, b in self.per_scheme.items()}
        object.__setattr__(self, "per_scheme", MappingProxyType(dict(sorted(pinned.items()))))
        mode = _norm(self.on_unsupported)
        if mode not in ON_UNSUPPORTED:
            raise _unknown("on_unsupported value", self.on_unsupported, ON_UNSUPPORTED)
        object.__setattr__(self, "on_unsupported", mode)

    # MappingProxyType is not hashable; the config is (it keys caches).
    def _key(self) -> tuple:
        return (self.linear_backend, tuple(self.per_scheme.items()), self.on_unsupported, self.fuse)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LinearBackendConfig) and self._key() == other._key()

    def __repr__(self) -> str:
        parts = [f"linear_backend={self.linear_backend!r}"]
        if self.per_scheme:
            parts.append(f"per_scheme={dict(self.per_scheme)!r}")
        if self.on_unsupported != "raise":
            parts.append(f"on_unsupported={self.on_unsupported!r}")
        if not self.fuse:
            parts.append("fuse=False")
        return f"LinearBackendConfig({', '.join(parts)})"

    def backend_for(self, scheme: str) -> str:
        return self.per_scheme.get(scheme, self.linear_backend)

    def describe(self) -> str:
        """A short stable string (used in cache keys and reports)."""
        s = self.linear_backend
        if self.per_scheme:
            s += "[" + ",".join(f"{k}={v}" for k, v in self.per_scheme.items()) + "]"
        if self.on_unsupported != "raise":
            s += f"/{self.on_unsupported}"
        if not self.fuse:
            s += "/nofuse"
        return s


def as_config(value: "str | LinearBackendConfig | None") -> LinearBackendConfig | None:
    if value is None or isinstance(value, LinearBackendConfig):
        return value
    if isinstance(value, str):
        return LinearBackendConfig(linear_backend=value)
    raise TypeError(f"expected a backend name or a LinearBackendConfig, got {type(value).__name__}: {value!r}")


# --- the context ---------------------------------------------------------

_local = threading.local()


def _stack() -> list[LinearBackendConfig]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def current_context_config() -> LinearBackendConfig | None:
    """The innermost ``with linear_backend(...)`` config of this thread, if any."""
    stack = _stack()
    return stack[-1] if stack else None


class EnvConfigError(ValueError):
    """The environment variable ``QLINEAR_PASS_LINEAR_BACKEND`` names no backend."""


EnvConfigError.__module__ = "qlinear_pass"


def env_config() -> LinearBackendConfig | None:
    """The config the environment variable sets, if any; a bad value is an error naming it."""
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip()
    if not value:
        return None
    try:
        return LinearBackendConfig(linear_backend=value)
    except (ValueError, TypeError) as exc:
        raise EnvConfigError(
            f"environment variable {ENV_VAR}={raw!r} is not a linear backend: {exc} "
            f"Set it to one of those names, or unset it for 'auto'."
        ) from None


def resolve(explicit: "str | LinearBackendConfig | None" = None) -> tuple[LinearBackendConfig, str]:
    """The config in effect and where it came from (``make``, ``context``, ``env``, ``default``)."""
    cfg = as_config(explicit)
    if cfg is not None:
        return cfg, "make"
    cfg = current_context_config()
    if cfg is not None:
        return cfg, "context"
    cfg = env_config()
    if cfg is not None:
        return cfg, "env"
    return LinearBackendConfig(), "default"


class _ConfigModeBase(TorchFunctionMode):
    """No-op function mode; only its class matters (Dynamo guards on it)."""

    config: LinearBackendConfig

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


_MODE_CLASSES: dict[LinearBackendConfig, type] = {}


def _mode_class(cfg: LinearBackendConfig) -> type:
    cls = _MODE_CLASSES.get(cfg)
    if cls is None:
        name = "LinearBackendMode_" + "".join(c if c.isalnum() else "_" for c in cfg.describe())
        cls = type(name, (_ConfigModeBase,), {"config": cfg, "__module__": __name__})
        _MODE_CLASSES[cfg] = cls
    return cls


class linear_backend(contextlib.ContextDecorator):
    """Run compiled models with ``name_or_config`` in effect.

    >>> with qlinear_pass.linear_backend("triton"):
    ...     y = compiled(x)

    Also usable as a decorator.  Nested contexts: the innermost wins.
    """

    def __init__(self, name_or_config: "str | LinearBackendConfig", **kwargs) -> None:
        if kwargs:
            if not isinstance(name_or_config, str):
                raise TypeError("keyword options go with a backend name, not with a LinearBackendConfig")
            self.config = LinearBackendConfig(linear_backend=name_or_config, **kwargs)
        else:
            cfg = as_config(name_or_config)
            if cfg is None:
                raise TypeError("linear_backend() needs a backend name or a LinearBackendConfig")
            self.config = cfg
        self._modes: list[TorchFunctionMode] = []

    def __enter__(self) -> LinearBackendConfig:
        mode = _mode_class(self.config)()
        mode.__enter__()
        self._modes.append(mode)
        _stack().append(self.config)
        return self.config

    def __exit__(self, *exc) -> None:
        _stack().pop()
        mode = self._modes.pop()
        mode.__exit__(*exc)


def active_mode_config() -> LinearBackendConfig | None:
    """The config of the innermost active config mode (what Dynamo guards on)."""
    from torch.overrides import _get_current_function_mode_stack

    for mode in reversed(_get_current_function_mode_stack()):
        if isinstance(mode, _ConfigModeBase):
            return mode.config
    return None


__all__ = [
    "ENV_VAR",
    "SCHEMES",
    "LinearBackendConfig",
    "linear_backend",
    "backend_names",
    "add_backend_name",
    "normalize_backend",
    "normalize_scheme",
    "resolve",
]
