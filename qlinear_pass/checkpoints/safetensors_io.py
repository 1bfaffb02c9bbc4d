"""Reading and writing ``.safetensors`` files: an 8-byte little-endian header
length, a JSON header (name -> dtype, shape, byte offsets; ``__metadata__``
string pairs), then the raw little-endian tensor bytes.

The reader checks every header entry against the file before any tensor is
read, so a truncated or inconsistent file is an error naming the tensor.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Optional

import torch

from .errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclasses.dataclass
class TensorRef:
    """One tensor of one file, read only when asked."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple
    start: int  # absolute byte offsets in the file
    end: int

    def load(self, device: "torch.device | str" = "cpu") -> torch.Tensor:
        with open(self.file, "rb") as f:
            f.seek(self.start)
            data = f.read(self.end - self.start)
        if len(data) != self.end - self.start:
            raise CheckpointError(f"tensor {self.name}: {self.file} ended while reading it (truncated file)")
        if not data:
            return torch.empty(self.shape, dtype=self.dtype, device=device)
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.dtype).reshape(self.shape)
        return t.to(device)


def _check_host() -> None:
    if sys.byteorder != "little":
        raise CheckpointError("safetensors files are little-endian; this host is big-endian")


def read_header(path: str) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """The tensors of ``path`` (not yet read) and its ``__metadata__``."""
    _check_host()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: header of {n} bytes does not fit the file of {size} bytes (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    refs: dict[str, TensorRef] = {}
    for name, e in header.items():
        try:
            dtype = DTYPES[e["dtype"]]
            shape = tuple(int(d) for d in e["shape"])
            lo, hi = (int(o) for o in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"tensor {name} in {path}: malformed header entry {e!r}") from None
        need = math.prod(shape) * dtype.itemsize
        if hi - lo != need or lo < 0:
            raise CheckpointError(
                f"tensor {name} in {path}: header gives {hi - lo} bytes for {e['dtype']}{list(shape)}, which needs {need}"
            )
        if base + hi > size:
            raise CheckpointError(
                f"tensor {name} in {path}: its bytes end at {base + hi} but the file has {size} bytes (truncated file)"
            )
        refs[name] = TensorRef(name, path, dtype, shape, base + lo, base + hi)
    return refs, {str(k): str(v) for k, v in meta.items()}


def write(path: str, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Write ``tensors`` (any device; contiguous copies are made) to ``path``, atomically."""
    _check_host()
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    order = sorted(tensors)
    for name in order:
        t = tensors[name]
        if t.dtype not in NAMES:
            raise CheckpointError(f"tensor {name}: dtype {t.dtype} has no safetensors name")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # tensors start 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in order:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
