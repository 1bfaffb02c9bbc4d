"""``make()``: the ``torch.compile`` backend that runs the pass inside Inductor.

::

    torch.compile(model, backend=qlinear_pass.make(linear_backend="triton"))
    torch.compile(model, backend="qlinear")          # the config in effect at call time

``make`` caches its result per (config, options): calling ``make("triton")``
twice gives the same object, so Dynamo does not recompile.
"""
from __future__ import annotations

import functools
import inspect
import logging
import re
import time
import warnings
from typing import Any, Optional

import torch

from . import config as C
from . import record_store
from .graph_pass import CompileRecord, QLinearPass, publish
from .select import NoKernelError

log = logging.getLogger("qlinear_pass")


try:
    from torch._dynamo.exc import ShortenTraceback as _Shorten
except ImportError:  # pragma: no cover - every torch we support has it
    _Shorten = None

_VISIBLE: dict = {}


def _visible_class(base: type) -> type:
    """``base`` made into an error Dynamo lets through unwrapped, its traceback cut to our frame,
    printed under ``base``'s own name."""
    cls = _VISIBLE.get(base)
    if cls is None:

        def __init__(self, message: str, frame) -> None:
            _Shorten.__init__(self, message, first_useful_frame=frame)
            self.message = message

        cls = type(base.__name__, (base, _Shorten), {
            "__init__": __init__,
            "__str__": lambda self: self.message,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        })
        _VISIBLE[base] = cls
    return cls


def _visible_error(exc: Exception, frame) -> BaseException:
    """The error the user of the compiled model sees: still of ``exc``'s type (a NoKernelError
    is a ValueError, too), printed as ``qlinear_pass.NoKernelError`` with our message alone, and
    a traceback that goes from the user's call into this backend, without Dynamo's and
    Inductor's frames."""
    message = getattr(exc, "message", None) or str(exc)
    if _Shorten is None:
        return exc
    return _visible_class(type(exc))(message, frame)


def _find_no_kernel(exc: BaseException) -> Optional[NoKernelError]:
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NoKernelError):
            return e
        stack += [getattr(e, "inner_exception", None), e.__cause__, e.__context__]
        stack += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    return None


def _device_of_inputs(example_inputs) -> str:
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            from .spec import DeviceInfo

            return str(DeviceInfo.of(t.device))
    return "cpu"


def _source_name(node: Optional[torch.fx.Node], fallback: str) -> str:
    """``0.mlp.weight`` for a parameter Dynamo lifted as ``L['self']._modules['0']...``."""
    arg = node.meta.get("grapharg") if node is not None else None
    src = getattr(arg, "source", None)
    if src is None:
        return fallback
    name = src.name() if callable(src.name) else src.name
    parts = re.findall(r"\._(?:modules|parameters|buffers)\['([^']*)'\]", name)
    return ".".join(parts) if parts else name


def _needs_grad(gm: torch.fx.GraphModule, example_inputs) -> Optional[tuple[str, str]]:
    """Why this graph must be differentiable: ``(kind, detail)``, or None for an inference graph.

    ``kind`` is ``"input"`` (an input that requires grad) or ``"parameter"``
    (a trainable float parameter in the graph; quantized modules hold none).
    """
    if not torch.is_grad_enabled():
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params, inputs = [], []
    for i, t in enumerate(example_inputs):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            node = placeholders[i] if i < len(placeholders) else None
            (params if isinstance(t, torch.nn.Parameter) else inputs).append(_source_name(node, f"input {i}"))
    params += [name for name, p in gm.named_parameters() if p.requires_grad]
    if inputs:
        return "input", f"input {inputs[0]} requires grad"
    if params:
        more = f" (and {len(params) - 1} more)" if len(params) > 1 else ""
        return "parameter", f"parameter {params[0]}{more} requires grad"
    return None


#: the kinds of grad-needing graphs already warned about in this process
_WARNED: set = set()

_FIXES = {
    "input": "pass inputs that do not require grad, or call it under torch.no_grad()",
    "parameter": "call it under torch.no_grad() / torch.inference_mode(), or model.requires_grad_(False)",
}


def training_message(kind: str, detail: str) -> str:
    return (
        f"graph needs gradients ({detail}): compiled untouched, the quantized linears run "
        f"their float32 reference; for the fast kernels {_FIXES[kind]}"
    )


def _warn_training(kind: str, detail: str) -> None:
    if kind in _WARNED:
        return
    _WARNED.add(kind)
    warnings.warn("qlinear_pass: " + training_message(kind, detail), UserWarning, stacklevel=2)


class QLinearBackend:
    """A ``torch.compile`` backend: Inductor (or plain AOTAutograd) with the pass."""

    def __init__(self, config: Optional[C.LinearBackendConfig], inductor: bool, options: tuple) -> None:
        self.config = config
        self.inductor = inductor
        self.options = dict(options)
        self.__name__ = "qlinear"

    def __repr__(self) -> str:
        cfg = self.config.describe() if self.config else "<config in effect at call time>"
        return f"qlinear_pass.make({cfg}, inductor={self.inductor})"

    def __deepcopy__(self, memo) -> "QLinearBackend":
        # immutable once made (make() hands out one object per config): copies of a settings
        # object that holds it (Hugging Face's CompileConfig deep-copies its backend) share it
        return self

    def __copy__(self) -> "QLinearBackend":
        return self

    def with_compile_options(self, mode: Optional[str], options: Optional[dict]) -> "QLinearBackend":
        """This backend with ``torch.compile(..., mode=, options=)`` applied: Inductor's options
        for the mode, then ours (make()'s), then ``options``."""
        if not self.inductor:
            given = " and ".join(f"{x}={v!r}" for x, v in (("mode", mode), ("options", options)) if v)
            raise ValueError(
                f"torch.compile(..., {given}) given to {self!r}: mode and options configure "
                "Inductor's code generation, which inductor=False leaves out; drop them (mode=None "
                "in a Hugging Face CompileConfig) or use make(..., inductor=True)"
            )
        from torch._inductor import list_mode_options

        merged = {**(list_mode_options(mode) if mode else {}), **self.options, **(options or {})}
        if "freezing" in merged:
            raise ValueError("freezing cannot be set per compile: set torch._inductor.config.freezing = True instead")
        return _make_cached(self.config, True, _freeze(merged))

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, *, mode: Optional[str] = None,
                 options: Optional[dict] = None):
        if mode not in (None, "default") or options:
            try:
                backend = self.with_compile_options(mode if mode != "default" else None, options)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise _visible_error(exc, inspect.currentframe()) from None
            return backend(gm, example_inputs)
        started = time.perf_counter()
        try:
            cfg, source = C.resolve(self.config)
        except C.EnvConfigError as exc:
            raise _visible_error(exc, inspect.currentframe()) from None
        why = _needs_grad(gm, example_inputs)
        if why is not None:
            _warn_training(*why)
            compiled = self._compile(gm, example_inputs, None)
            record = CompileRecord(cfg, source, training=True, training_reason=training_message(*why))
        else:
            graph_pass = QLinearPass(cfg, source)
            store_key = record_store.key(gm, example_inputs, graph_pass.uuid(), self.options,
                                         str(_device_of_inputs(example_inputs))) if self.inductor else None
            try:
                compiled = self._compile(gm, example_inputs, graph_pass)
            except Exception as exc:
                nk = _find_no_kernel(exc)
                if nk is None:
                    raise
                raise _visible_error(nk, inspect.currentframe()) from None
            record = graph_pass.record
            if record is None:  # a cache returned the compiled graph: the pass did not run
                record = (record_store.load(store_key, cfg, source) if store_key else None) \
                    or self._rederive(gm, example_inputs, cfg, source)
            elif store_key is not None:
                record_store.save(store_key, record)
        record.seconds = time.perf_counter() - started
        try:
            compiled.qlinear_record = record
        except (AttributeError, TypeError):
            pass
        publish(record)
        return compiled

    @staticmethod
    def _rederive(gm, example_inputs, cfg, source) -> CompileRecord:
        """The pass once more over the ATen graph, without code generation (a cache hit whose
        decisions were not stored)."""
        import torch._functorch.config as functorch_config

        graph_pass = QLinearPass(cfg, source)
        with functorch_config.patch(enable_autograd_cache=False):
            _aot_compile(gm, example_inputs, graph_pass)
        record = graph_pass.record or CompileRecord(cfg, source)
        record.origin = "rederived"
        return record

    def _compile(self, gm, example_inputs, graph_pass: Optional[QLinearPass]):
        if self.inductor:
            from torch._inductor import config as inductor_config
            from torch._inductor.compile_fx import compile_fx

            patches = dict(self.options)
            if graph_pass is not None:
                patches["post_grad_custom_pre_pass"] = graph_pass
            with inductor_config.patch(patches):
                return compile_fx(gm, example_inputs)
        return _aot_compile(gm, example_inputs, graph_pass)


def _aot_compile(gm, example_inputs, graph_pass: Optional[QLinearPass]):
    """AOTAutograd to an ATen graph, the pass over it, no code generation."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def fw(fx_gm: torch.fx.GraphModule, inputs):
        if graph_pass is not None:
            graph_pass(fx_gm.graph, is_inference=True)
            fx_gm.recompile()
        return make_boxed_func(fx_gm.forward)

    def train_fw(fx_gm, inputs):
        return make_boxed_func(fx_gm.forward)

    backend = aot_autograd(fw_compiler=train_fw, inference_compiler=fw, decompositions=select_decomp_table())
    return backend(gm, example_inputs)


def _freeze(options: dict) -> tuple:
    out = []
    for k, v in sorted(options.items()):
        try:
            hash(v)
        except TypeError:
            raise TypeError(f"inductor option {k}={v!r} must be hashable") from None
        out.append((k, v))
    return tuple(out)


def make(
    linear_backend: "str | C.LinearBackendConfig | None" = None,
    *,
    config: Optional[C.LinearBackendConfig] = None,
    inductor: bool = True,
    **inductor_options: Any,
) -> QLinearBackend:
    """A ``torch.compile`` backend that swaps quantized linears for fast kernels.

    ``linear_backend`` (a name or a :class:`LinearBackendConfig`) or
    ``config`` fixes the backend; with neither, the config in effect when the
    compiled model is called decides (``with linear_backend(...)``, the
    environment variable, ``auto``).  Other keyword arguments are Inductor
    options (such as ``max_autotune=True``; freezing is global, see the
    README).  ``inductor=False`` runs the pass over the ATen graph
    without code generation (fast to compile; for debugging and tests).
    """
    if linear_backend is not None and config is not None:
        raise TypeError("pass either linear_backend or config, not both")
    cfg = C.as_config(config if config is not None else linear_backend)
    if cfg is None:
        C.env_config()  # a bad QLINEAR_PASS_LINEAR_BACKEND is an error here, not at the first call
    if "freezing" in inductor_options:
        raise TypeError(
            "freezing cannot be set per backend: Dynamo reads it while tracing. Set "
            "torch._inductor.config.freezing = True before calling the compiled model instead"
        )
    if not inductor and inductor_options:
        raise TypeError(f"inductor options {sorted(inductor_options)} need inductor=True")
    return _make_cached(cfg, bool(inductor), _freeze(inductor_options))


@functools.lru_cache(maxsize=None)
def _make_cached(cfg, inductor, options) -> QLinearBackend:
    if options:
        from torch._inductor import config as inductor_config

        unknown = [k for k, _ in options if not hasattr(inductor_config, k.split(".")[0])]
        if unknown:
            raise TypeError(f"unknown Inductor option(s): {', '.join(unknown)}")
    return QLinearBackend(cfg, inductor, options)


#: the backend registered as ``torch.compile(backend="qlinear")`` (importing this module must
#: not fail on a bad environment variable: the first compile reports it)
qlinear_backend = _make_cached(None, True, ())
