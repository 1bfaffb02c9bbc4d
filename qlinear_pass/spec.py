"""Plain data every layer of the package shares: the device, the layer spec, a reason.

* :class:`DeviceInfo`: what kernels need to know about a device (tests build fake ones).
* :class:`LayerSpec`: one matched linear, as kernels see it.
* ``Reason``: ``(ok, why)``, the answer of every "can it?" question (``OK`` when it can).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Optional

import torch

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
    #: how the layer holds its weight: "public" (the scheme's layout, schemes.py), or for w4a16
    #: "mma16" (``kernels/int4_layout.py``): only kernels whose ``weight_layouts`` name it can run it
    weight_layout: str = "public"

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
        lay = f" ({self.weight_layout} layout)" if self.weight_layout != "public" else ""
        return f"{self.scheme}{g}{z} N={self.n} K={self.k}{lay}"


def plan_text(plan) -> str:
    """A per-M plan ``[(largest M or None, kernel name), ...]`` as the custom op carries it: ``"a@1;b"``."""
    return ";".join(name if limit is None else f"{name}@{limit}" for limit, name in plan)


def parse_plan(text: str) -> list:
    """``"a@1;b"`` -> [(1, "a"), (None, "b")]."""
    out = []
    for part in text.split(";"):
        name, _, limit = part.partition("@")
        out.append((int(limit) if limit else None, name))
    return out


Reason = tuple[bool, str]
OK: Reason = (True, "")

__all__ = ["DeviceInfo", "LayerSpec", "Reason", "OK", "plan_text", "parse_plan"]
