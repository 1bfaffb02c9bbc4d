"""Decisions kept beside Inductor's cached graphs.

When Inductor's FX-graph cache (or AOTAutograd's) returns a compiled graph, the pass does not
run, so it decides nothing.  The decisions of each compile are therefore stored on disk, under
Inductor's cache directory, keyed by what they depend on: the Dynamo graph's code, its inputs'
shapes, dtypes and devices, the pass's cache key (config, package, registered kernels), the
Inductor options and torch's version.  A hit reads them back; if they are missing (deleted, or
written by another version), the backend runs the pass again over the graph without code
generation.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Optional

import torch

from . import config as C
from .graph_pass import CompileRecord


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ["tensor", str(x.dtype), x.device.type, [str(s) for s in x.shape], [str(s) for s in x.stride()],
                bool(x.requires_grad)]
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ["sym", type(x).__name__]
    return [type(x).__name__, repr(x) if isinstance(x, (int, float, bool, str, type(None))) else ""]


def key(gm: torch.fx.GraphModule, example_inputs, pass_uuid: str, options: dict, device: str) -> str:
    h = hashlib.sha256()
    parts = [torch.__version__, pass_uuid, repr(sorted(options.items())), device, gm.code,
             json.dumps([_describe(x) for x in example_inputs])]
    for name, t in list(gm.named_buffers()) + list(gm.named_parameters()):
        parts.append(f"{name}:{_describe(t)}")
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def directory() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        base = cache_dir()
    except Exception:  # pragma: no cover - older layouts
        base = os.path.join(tempfile.gettempdir(), "torchinductor_qlinear_pass")
    return os.path.join(base, "qlinear_pass_records")


def save(k: str, record: CompileRecord) -> None:
    """Write the record for key ``k`` (atomically; a failure to write only costs a re-derivation)."""
    d = directory()
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(record.to_json())
        os.replace(tmp, os.path.join(d, k + ".json"))
    except OSError:
        pass


def load(k: str, config: C.LinearBackendConfig, source: str) -> Optional[CompileRecord]:
    path = os.path.join(directory(), k + ".json")
    try:
        with open(path) as f:
            text = f.read()
        return CompileRecord.from_json(text, config, source, origin="cache")
    except (OSError, ValueError, KeyError, TypeError):
        return None
